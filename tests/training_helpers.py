"""Helpers shared by the tests that train tiny XPs with `dora run` in a subprocess, on CPU.

A tiny MusDB-like set at 8 kHz, the overrides of a tiny model, and functions to run `dora run`
(in the foreground or in the background, to be killed), find the XP folder and read its history.
"""
import json
import os
from pathlib import Path
import subprocess
import sys
import time
import typing as tp

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
RATE = 8000
SOURCES = ["drums", "bass", "other", "vocals"]
TINY_MODELS = {
    "demucs": ["demucs.channels=4", "demucs.depth=2"],
    "hdemucs": ["hdemucs.channels=4", "hdemucs.depth=3", "hdemucs.nfft=256"],
    "htdemucs": ["htdemucs.channels=8", "htdemucs.depth=2", "htdemucs.nfft=64",
                 "htdemucs.t_layers=1", "htdemucs.t_heads=1"],
}


def write_track(folder: Path, rng: np.random.Generator, seconds: float,
                sources: tp.Sequence[str] = SOURCES) -> None:
    """A track folder of noisy tones: one float wav per source and their sum as the mixture."""
    folder.mkdir(parents=True)
    time_axis = np.arange(int(seconds * RATE)) / RATE
    stems = {}
    for index, source in enumerate(sources):
        freq = 110 * (index + 1) * (1 + rng.random())
        tone = 0.2 * np.sin(2 * np.pi * freq * time_axis)[:, None]
        stems[source] = (tone + 0.02 * rng.standard_normal((len(time_axis), 2))).astype(np.float32)
        sf.write(folder / f"{source}.wav", stems[source], RATE, subtype="FLOAT")
    sf.write(folder / "mixture.wav", sum(stems.values()), RATE, subtype="FLOAT")


def write_tiny_musdb(root: Path, sources: tp.Sequence[str] = SOURCES) -> Path:
    """MusDB layout at 8 kHz under `root`: 4 train tracks (2 with musdb validation names), 2 test
    tracks, each with one wav per source of `sources`. Returns `root`."""
    from demucs.wav import musdb_valid_tracks
    rng = np.random.default_rng(0)
    train = ["Toy - One", "Toy - Two"] + musdb_valid_tracks()[:2]
    for name in train:
        write_track(root / "train" / name, rng, seconds=3, sources=sources)
    for name in ["Toy - Test A", "Toy - Test B"]:
        write_track(root / "test" / name, rng, seconds=2, sources=sources)
    return root


def base_argv(musdb: Path, model: str = "demucs", epochs: int = 2) -> tp.List[str]:
    """Overrides of a tiny, fast XP on the set at `musdb`."""
    return [
        f"dset.musdb={musdb}", f"dset.musdb_samplerate={RATE}", f"dset.samplerate={RATE}",
        f"dset.metadata={musdb.parent / 'metadata'}", "dset.segment=1", "dset.shift=0.5",
        f"epochs={epochs}", "batch_size=2", "max_batches=2", "misc.num_workers=0",
        "test.workers=0", "test.sdr=false", "augment.repitch.proba=0",
        "augment.remix.group_size=2", f"model={model}", *TINY_MODELS[model]]


def use_dora_dir(folder: Path, monkeypatch) -> Path:
    """Make Dora keep its XPs under `folder` in this process and in `dora run` children."""
    monkeypatch.setenv("_DORA_TEST_PATH", str(folder))
    from demucs.train import main
    monkeypatch.setattr(main.dora, "dir", folder)
    return folder


def dora_env(dora_dir: Path) -> dict:
    """Environment of a `dora run` child writing its XPs under `dora_dir`."""
    return dict(os.environ, _DORA_TEST_PATH=str(dora_dir), OMP_NUM_THREADS="1",
                PYTHONPATH=str(ROOT))


def dora_run(dora_dir: Path, argv: tp.List[str], *flags: str, check: bool = True,
             timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `dora run FLAGS ARGV` to completion; raise with its log tail when it fails (`check`)."""
    proc = subprocess.run([sys.executable, "-m", "dora", "run", *flags, *argv], cwd=ROOT,
                          env=dora_env(dora_dir), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"dora run failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
    return proc


def registered_xp(argv: tp.List[str]):
    """The Dora XP of `argv`, its folder made and its argv recorded as `dora run` leaves them (so
    that the tools find it by signature), for tests that train or fake it in this process."""
    from demucs.train import main
    xp = main.get_xp(argv)
    folder = Path(xp.folder)
    folder.mkdir(parents=True)
    (folder / ".argv.json").write_text(json.dumps(list(argv)))
    return xp


def xp_folder(dora_dir: Path, argv: tp.List[str]) -> Path:
    """Folder of the XP that `argv` describes."""
    from demucs.train import main
    return dora_dir / "xps" / main.get_xp(argv).sig


def history(folder: Path) -> list:
    """The metrics Dora recorded for the XP in `folder`, one dict per epoch."""
    return json.loads((folder / "history.json").read_text())


def wait_for_history(folder: Path, proc: subprocess.Popen, log: Path, epochs: int,
                     timeout: float) -> None:
    """Wait until the running XP in `folder` has `epochs` epochs of history and a checkpoint."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before being killed: {log.read_text()[-3000:]}")
        try:
            if len(history(folder)) >= epochs and (folder / "checkpoint.th").exists():
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.1)
    raise AssertionError("no epoch finished in time")
