"""Run real programs built on Demucs against this project, offline (`make test-clients`).

    python -m tools.test_clients [--work build/clients] [--torch-spec torch==2.13.0] [--only NAME]

1. A scratch virtual environment gets torch (pinned), this project (`pip install .`, as a user
   would), the client programs of `tests/clients/clients.txt` with `--no-deps` (so the official
   demucs package they require is never installed) and their other needs (`needs.txt`).
2. A random-weight model with the released htdemucs architecture is placed where a user's caches
   would hold it, in a scratch home folder: the HuggingFace cache layout
   (`~/.cache/huggingface/hub/models--adefossez--HTDemucs`) and the torch hub cache
   (`~/.cache/torch/hub/checkpoints/955717e8-8726e21a.th`).
3. Each client's main path separates a short generated track with `HF_HUB_OFFLINE=1`, and the
   stems it writes are checked (all there, readable, finite, as long as the track).

Exits with status 1 when any client fails, after running all of them.
"""
import argparse
from dataclasses import dataclass, field
from fractions import Fraction
import hashlib
import os
from pathlib import Path
import shutil
import subprocess
import sys
import time
import typing as tp

import numpy as np
import soundfile

ROOT = Path(__file__).resolve().parent.parent
CLIENTS_DIR = ROOT / "tests" / "clients"
SOURCES = ["drums", "bass", "other", "vocals"]
HTDEMUCS_SIG = "955717e8"
HTDEMUCS_FILE = "955717e8-8726e21a.th"  # its name in the release's files.txt
RELEASED_HTDEMUCS = dict(dconv_mode=3, depth=4, t_layers=5, bottom_channels=512, t_dropout=0.02,
                         segment=Fraction(39, 5))
SAMPLERATE = 44100
TRACK_SECONDS = 3.0


@dataclass
class Client:
    """How to run one program on `{track}` writing to `{out}`, and the stems it must write."""
    name: str
    command: tp.List[str]
    stems: tp.List[str]  # paths relative to `{out}`
    torch_hub_only: bool = False  # run with an empty HuggingFace cache
    env: tp.Dict[str, str] = field(default_factory=dict)  # more variables, formatted as commands


def _python_call(code: str) -> tp.List[str]:
    return ["{python}", "-c", code, "{track}", "{out}"]


CLIENTS = [
    Client("demucs-cli", ["{python}", "-m", "demucs.separate", "--out", "{out}", "--name",
                          "htdemucs", "--device", "cpu", "-j", "1", "{track}"],
           [f"htdemucs/track/{source}.wav" for source in SOURCES]),
    Client("demucs-cli-torch-hub-cache", ["{python}", "-m", "demucs.separate", "--out", "{out}",
                                          "-n", "htdemucs", "-d", "cpu", "{track}"],
           [f"htdemucs/track/{source}.wav" for source in SOURCES], torch_hub_only=True),
    Client("stemextract", _python_call(
        "import sys, stemextract; "
        "stemextract.extract(sys.argv[1], sys.argv[2], device='cpu', progress=False)"),
        [f"{source}.wav" for source in SOURCES]),
    Client("stem-separator", ["{bin}/stem-separator", "{track}", "-o", "{out}", "--cpu"],
           [f"track_stems/track_{source}.wav" for source in SOURCES]),
    Client("phantom-audio-separation", _python_call(
        "import sys; from phantom_separation import separate_stems; "
        "separate_stems(sys.argv[1], sys.argv[2])"),
        [f"{source}.wav" for source in SOURCES], env={"PHANTOM_OUTPUT_DIR": "{out}"}),
    Client("extra-demucs", _python_call(
        "import sys; from extra_demucs.separate import extra_separator; "
        "extra_separator([sys.argv[1]], 'audio', 'medium', sys.argv[2])"),
        ["track_vocals.mp3"]),
]


class ClientError(Exception):
    """A client failed or wrote wrong stems."""


def _run(command: tp.List[str], **kwargs: tp.Any) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, **kwargs)


def _requirements_stamp(torch_spec: str) -> str:
    digest = hashlib.sha256(torch_spec.encode())
    for name in ["clients.txt", "needs.txt"]:
        digest.update((CLIENTS_DIR / name).read_bytes())
    return digest.hexdigest()


def prepare_venv(venv: Path, torch_spec: str) -> Path:
    """The scratch environment's python, with this project installed afresh at every run and
    the clients installed once per version of their requirement lists."""
    python = venv / "bin" / "python"
    if not python.exists():
        _run([sys.executable, "-m", "venv", str(venv)])
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    stamp = venv / ".clients-installed"
    wanted = _requirements_stamp(torch_spec)
    if not stamp.exists() or stamp.read_text() != wanted:
        _run(pip + [torch_spec])
        _run(pip + [torch_spec, "-r", str(CLIENTS_DIR / "needs.txt")])
        _run(pip + ["--no-deps", "-r", str(CLIENTS_DIR / "clients.txt")])
        stamp.write_text(wanted)
    _run(pip + [torch_spec, "-r", str(ROOT / "requirements_minimal.txt")])
    _run(pip + ["--force-reinstall", "--no-deps", str(ROOT)])
    _run([str(python), "-c", "import demucs.network"], cwd=venv)  # this project, not 4.1.0
    return python


def place_model(home: Path) -> None:
    """A random htdemucs (released architecture, half precision) in `home`'s HuggingFace and
    torch hub caches, as the hub client and torch.hub would have left it."""
    import torch
    from demucs.htdemucs import HTDemucs
    from demucs.states import serialize_model
    from tools.export_hf import CatalogueSource, export_model, install_in_hf_cache
    torch.manual_seed(0)
    package = serialize_model(HTDemucs(SOURCES, **RELEASED_HTDEMUCS), None, half=True)
    checkpoints = home / ".cache" / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    torch.save(package, checkpoints / HTDEMUCS_FILE)
    models = home / "models"
    models.mkdir(exist_ok=True)
    shutil.copyfile(checkpoints / HTDEMUCS_FILE, models / f"{HTDEMUCS_SIG}.th")
    (models / "htdemucs.yaml").write_text(f"models: ['{HTDEMUCS_SIG}']\n")
    folder = export_model(CatalogueSource(models), "htdemucs", home / "hub_folders")
    install_in_hf_cache(folder, "adefossez/HTDemucs", home / ".cache" / "huggingface" / "hub")


def write_track(path: Path) -> None:
    """A short stereo mixture: a bass line, a chord, a melody and noise bursts (drums)."""
    rng = np.random.default_rng(0)
    time_axis = np.arange(int(TRACK_SECONDS * SAMPLERATE)) / SAMPLERATE
    tones = sum(0.15 * np.sin(2 * np.pi * freq * time_axis) for freq in [55, 220, 277, 330, 660])
    bursts = (np.sin(2 * np.pi * 2 * time_axis) > 0.95) * rng.normal(0, 0.3, time_axis.shape)
    mono = tones + bursts
    stereo = np.stack([mono, 0.8 * mono + 0.05 * rng.normal(size=mono.shape)], axis=1)
    soundfile.write(str(path), (0.5 * stereo).astype(np.float32), SAMPLERATE, subtype="PCM_16")


def check_stem(path: Path) -> None:
    """Raise `ClientError` unless `path` decodes to finite audio as long as the track."""
    if not path.is_file():
        raise ClientError(f"missing stem {path}")
    data, samplerate = soundfile.read(str(path), dtype="float32", always_2d=True)
    seconds = len(data) / samplerate
    if abs(seconds - TRACK_SECONDS) > 0.1:
        raise ClientError(f"{path} lasts {seconds:.3f} s, the track {TRACK_SECONDS} s")
    if not np.isfinite(data).all():
        raise ClientError(f"{path} holds non-finite samples")


def _environment(home: Path, client: Client, venv: Path) -> tp.Dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("HF_", "HUGGINGFACE_", "TORCH_", "XDG_", "PYTHON"))}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    if client.torch_hub_only:
        env["HF_HUB_CACHE"] = str(home / "empty_hf_cache")
    return env


def run_client(client: Client, python: Path, work: Path, home: Path, track: Path) -> float:
    """Run `client` in its own empty folder; returns the seconds it took."""
    folder = work / "runs" / client.name
    shutil.rmtree(folder, ignore_errors=True)
    out = folder / "out"
    out.mkdir(parents=True)
    values = {"python": str(python), "bin": str(python.parent), "track": str(track),
              "out": str(out)}
    command = [part.format(**values) for part in client.command]
    start = time.monotonic()
    env = _environment(home, client, python.parent.parent)
    env.update({key: value.format(**values) for key, value in client.env.items()})
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True,
                            timeout=900)
    elapsed = time.monotonic() - start
    (folder / "log.txt").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise ClientError(f"exit status {result.returncode}; end of its output:\n"
                          + (result.stdout + result.stderr)[-3000:])
    written = sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file())
    try:
        for stem in client.stems:
            check_stem(out / stem)
    except ClientError as error:
        raise ClientError(f"{error}; it wrote {written}") from None
    return elapsed


def main(argv: tp.Optional[tp.List[str]] = None) -> None:
    parser = argparse.ArgumentParser("tools.test_clients", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "clients",
                        help="Scratch folder (virtual environment, caches, outputs).")
    parser.add_argument("--torch-spec", default="torch==2.13.0")
    parser.add_argument("--only", nargs="*", default=None, help="Names of clients to run.")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    home = work / "home"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    python = prepare_venv(work / "venv", args.torch_spec)
    place_model(home)
    track = work / "track.wav"
    write_track(track)
    failures = []
    for client in CLIENTS:
        if args.only and client.name not in args.only:
            continue
        try:
            seconds = run_client(client, python, work, home, track)
            print(f"PASS {client.name} ({seconds:.1f} s)", flush=True)
        except (ClientError, subprocess.TimeoutExpired) as error:
            failures.append(client.name)
            print(f"FAIL {client.name}: {error}", flush=True)
    if failures:
        sys.exit(f"{len(failures)} client(s) failed: {', '.join(failures)} "
                 f"(logs in {work / 'runs'})")


if __name__ == "__main__":
    main()
