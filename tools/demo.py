"""The project end to end on a CPU: `python3 -m tools.demo` (what `make demo` runs).

The demo is a list of steps run in order, each printing the real command it runs and what it did:
it generates the toy MusDB under ./data/toy_musdb, trains a small HTDemucs on it with Dora,
exports the XP to ./release_models, separates a toy test track into ./separated, and prints the
model's test nSDR beside three baselines on the same songs (`demucs.evaluate.BASELINES`): the
equal split (mixture/4 for every stem), which the verdict compares the model with, the
scalar-gain oracle (each stem as its best multiple of the mixture) and the ideal ratio mask (the
mixture's spectrogram masked knowing the stems: the ceiling). The last line says how long the
demo took and on which CPU. Everything is kept between runs: a second run finds the finished XP
(same signature) and only re-exports, re-separates and re-evaluates it.
"""
import argparse
from dataclasses import dataclass, field
import json
import logging
import os
from pathlib import Path
import shlex
import subprocess
import sys
import time
import typing as tp

from omegaconf import OmegaConf
import soundfile

from demucs.evaluate import BASELINES, EvaluationSettings, baseline_scores
from demucs.toy_musdb import MIXTURE, SOURCES, describe, ensure_toy_musdb, is_toy_musdb
from tools import machine
from tools.test_pretrained import score_table

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
TOY_CONFIG = ROOT / "conf" / "dset" / "toy.yaml"
RELEASE_DIR = "release_models"
SEPARATED_DIR = "separated"


class DemoError(Exception):
    """A demo step cannot go on (a command failed, an expected output is missing)."""


@dataclass(frozen=True)
class Setup:
    """How big the demo is.

    Args:
        toy: overrides of the toy MusDB generation settings (`dset.toy` of conf/dset/toy.yaml),
            also passed to training so that its config describes the generated set.
        train: `dora run` overrides (besides `dset=toy` and `toy`): model sizes, epochs...
    """
    toy: tp.Dict[str, tp.Any] = field(default_factory=dict)
    train: tp.Tuple[str, ...] = ()


# Training on 2 CPU cores, about 11 CPU-minutes in all, for a test nSDR of about 2 dB: 8 epochs
# of 12 batches of 4 examples, each dset.segment - dset.shift = 2 s long after the random shift
# (6 train songs of 10 s). Pitch/tempo augmentation (soundstretch) is off for speed, the museval
# SDR (slow) is not computed, and the test songs are scored in the training process.
FULL = Setup(train=(
    "model=htdemucs", "htdemucs.channels=16", "htdemucs.t_layers=1", "htdemucs.t_heads=4",
    "dset.segment=3", "batch_size=4", "epochs=8", "optim.lr=1e-3",
    "augment.repitch.proba=0", "test.sdr=false", "test.workers=0", "misc.num_workers=0"))

# The same story in seconds, for the tests: 2 train songs, 1 valid, 1 test, of 2 s each.
QUICK = Setup(
    toy={"tracks": 3, "valid_tracks": 1, "test_tracks": 1, "seconds": 2},
    train=("model=htdemucs", "htdemucs.channels=8", "htdemucs.depth=3", "htdemucs.nfft=256",
           "htdemucs.t_layers=1", "htdemucs.t_heads=2", "dset.segment=1.5", "dset.shift=0.5",
           "batch_size=2", "augment.remix.group_size=2", "max_batches=2", "epochs=1",
           "augment.repitch.proba=0", "test.sdr=false", "test.workers=0",
           "misc.num_workers=0"))


@dataclass
class Demo:
    """What the steps share: the folder the demo works in (every command runs there, so the
    relative paths of the configs and CLIs land in it), its size, and the trained XP."""
    workdir: Path
    setup: Setup = FULL
    sig: tp.Optional[str] = None

    @property
    def toy_settings(self) -> tp.Dict[str, tp.Any]:
        """`dset` settings of conf/dset/toy.yaml, with the setup's generation overrides."""
        settings = OmegaConf.to_container(OmegaConf.load(TOY_CONFIG).dset, resolve=True)
        assert isinstance(settings, dict)
        settings["toy"].update(self.setup.toy)
        return settings

    @property
    def toy_path(self) -> Path:
        return self.workdir / self.toy_settings["musdb"]

    @property
    def train_argv(self) -> tp.List[str]:
        toy = [f"dset.toy.{key}={value}" for key, value in self.setup.toy.items()]
        return ["dset=toy", *toy, *self.setup.train]

    @property
    def trained_sig(self) -> str:
        if self.sig is None:
            raise DemoError("No trained XP yet: the training step must run first.")
        return self.sig


def _console_script(name: str) -> tp.List[str]:
    """How to run the console script `name` of this environment (`python -m name` if absent)."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", name]


def _shown(command: tp.Sequence[str]) -> str:
    """The command as a user would type it (program by its name, not its full path)."""
    return shlex.join([Path(command[0]).name, *command[1:]])


def run_command(demo: Demo, command: tp.Sequence[str], capture: bool = False) -> str:
    """Print and run `command` in the demo folder; returns its stdout when `capture` (else it
    goes to the console like its stderr). Raises DemoError when it fails."""
    print(f"    $ {_shown(command)}", flush=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(list(command), cwd=demo.workdir, env=env, text=True,
                          stdout=subprocess.PIPE if capture else None)
    if proc.returncode != 0:
        raise DemoError(f"`{_shown(command)}` failed with exit code {proc.returncode} "
                        "(its output is above).")
    return proc.stdout if capture else ""


def generate_toy_musdb(demo: Demo) -> str:
    """Generate the toy MusDB where `dset=toy` training looks for it, unless it is there."""
    path = demo.toy_path
    existed = is_toy_musdb(path)
    ensure_toy_musdb(path, **demo.toy_settings["toy"])
    status = "Already present, kept as is." if existed else "Generated."
    return f"{status}\n{describe(path)}"


def xp_folder(demo: Demo, xp) -> Path:
    """Folder of the Dora `xp` as `dora run` in the demo folder creates it (`dora.dir` of the
    config is relative to the folder a command runs in)."""
    return demo.workdir / xp.cfg.dora.dir / "xps" / xp.sig


def read_history(folder: Path) -> tp.List[dict]:
    path = folder / "history.json"
    if not path.exists():
        raise DemoError(f"Training wrote no {path}: see the `dora run` output above.")
    return json.loads(path.read_text())


def summarize_history(history: tp.List[dict]) -> str:
    """Train loss, valid loss/nSDR and last test nSDR of a Dora history, one line each."""
    first, last = history[0], history[-1]
    lines = [
        f"  train loss: {first['train']['loss']:.4f} (epoch 1) -> {last['train']['loss']:.4f} "
        f"(epoch {len(history)})",
        f"  valid loss: {last['valid']['loss']:.4f}, valid nSDR: {last['valid']['nsdr']:.2f} dB "
        f"(best loss {last['valid']['best']:.4f})"]
    tests = [entry["test"] for entry in history if "test" in entry]
    if tests:
        lines.append(f"  test nSDR (best state): {tests[-1]['nsdr']:.2f} dB")
    return "\n".join(lines)


def train_xp(demo: Demo) -> str:
    """Train the demo XP with `dora run` (a finished XP only replays its history)."""
    from demucs.train import main
    argv = demo.train_argv
    xp = main.get_xp(argv)
    demo.sig = xp.sig
    run_command(demo, [*_console_script("dora"), "-P", "demucs", "run", *argv])
    folder = xp_folder(demo, xp)
    history = read_history(folder)
    return (f"XP {demo.sig}, {len(history)} epochs, in {folder}\n"
            f"{summarize_history(history)}")


def plot_curves(demo: Demo) -> str:
    """Draw the XP's loss and nSDR curves into a PNG with `tools.plot_xp`."""
    sig = demo.trained_sig
    out = demo.workdir / "outputs" / "plots" / f"{sig}.png"
    run_command(demo, [sys.executable, "-m", "tools.plot_xp", sig, "-o", str(out)])
    if not out.is_file():
        raise DemoError(f"tools.plot_xp did not write {out}.")
    return f"Training curves of {sig}: {out}"


def export_xp(demo: Demo) -> str:
    """Export the XP's best state as a release package (overwriting a previous export)."""
    sig = demo.trained_sig
    run_command(demo, [sys.executable, "-m", "tools.export", sig, "-o", RELEASE_DIR])
    path = demo.workdir / RELEASE_DIR / f"{sig}.th"
    if not path.exists():
        raise DemoError(f"tools.export did not write {path}.")
    return f"Wrote {path} ({path.stat().st_size / 2 ** 10:.0f} KiB)"


def first_test_track(demo: Demo) -> Path:
    tracks = sorted(p for p in (demo.toy_path / "test").iterdir() if p.is_dir())
    if not tracks:
        raise DemoError(f"No test track under {demo.toy_path / 'test'}.")
    return tracks[0]


def separate_track(demo: Demo) -> str:
    """Separate a toy test song with the exported model, as a user would with the CLI."""
    sig = demo.trained_sig
    track = first_test_track(demo)
    mixture = (track / f"{MIXTURE}.wav").relative_to(demo.workdir)
    run_command(demo, [*_console_script("demucs"), "--repo", f"./{RELEASE_DIR}", "-n", sig,
                       str(mixture)])
    out = demo.workdir / SEPARATED_DIR / sig / MIXTURE
    length = soundfile.info(str(track / f"{MIXTURE}.wav")).frames
    lines = [f"Stems of '{track.name}' ({length} samples) in {out}:"]
    for source in SOURCES:
        stem = out / f"{source}.wav"
        if not stem.exists():
            raise DemoError(f"demucs did not write {stem}.")
        lines.append(f"  {stem.name}: {soundfile.info(str(stem)).frames} samples")
    return "\n".join(lines)


def baselines(demo: Demo) -> tp.Dict[str, tp.Dict[str, float]]:
    """nSDR of `demucs.evaluate.BASELINES` on the toy test songs the model is scored on."""
    settings = EvaluationSettings(musdb=str(demo.toy_path),
                                  samplerate=int(demo.toy_settings["musdb_samplerate"]))
    return baseline_scores(settings, SOURCES)


def verdict(model: float, equal_split: float) -> str:
    """Whether the model's nSDR beats the equal split's, and by how much."""
    gap = model - equal_split
    if gap > 0:
        return f"The trained model BEATS the equal split by {gap:.2f} dB of nSDR."
    return f"The trained model does NOT beat the equal split ({gap:.2f} dB of nSDR)."


def evaluate_model(demo: Demo) -> str:
    """Test nSDR of the exported model (tools.test_pretrained) next to the baselines."""
    sig = demo.trained_sig
    # the baselines are scored here, for the verdict: the tool's own table would be a copy
    output = run_command(demo, [sys.executable, "-m", "tools.test_pretrained", "--repo",
                                f"./{RELEASE_DIR}", "-n", sig, "dset=toy", "test.sdr=false",
                                "test.workers=0", "--no-baselines"],
                         capture=True)
    lines = output.strip().splitlines()
    if not lines:
        raise DemoError("tools.test_pretrained printed no scores.")
    model = json.loads(lines[-1])
    references = baselines(demo)
    rows = {f"model {sig}": model}
    rows.update({BASELINES[key]: scores for key, scores in references.items()})
    test_dir = demo.toy_path / "test"
    count = sum(p.is_dir() for p in test_dir.iterdir())
    return (f"Test nSDR in dB on the {count} toy test songs of {test_dir}:\n"
            f"{score_table(rows, SOURCES)}\n"
            f"{verdict(model['nsdr'], references['equal_split']['nsdr'])}")


Step = tp.Tuple[str, tp.Callable[[Demo], str]]
STEPS: tp.List[Step] = [
    ("Generate the toy MusDB", generate_toy_musdb),
    ("Train a small HTDemucs on it with Dora", train_xp),
    ("Plot its training curves", plot_curves),
    ("Export the XP", export_xp),
    ("Separate a toy test song", separate_track),
    ("Evaluate on the toy test set", evaluate_model),
]


def run(demo: Demo, steps: tp.Sequence[Step] = STEPS) -> None:
    begin = time.time()
    for number, (title, step) in enumerate(steps, start=1):
        print(f"[{number}/{len(steps)}] {title}", flush=True)
        start = time.time()
        report = step(demo)
        print(report)
        print(f"    ({time.time() - start:.1f} s)", flush=True)
    print(f"Demo done in {time.time() - begin:.0f} s on {machine.describe()}.", flush=True)


def main(argv: tp.Optional[tp.List[str]] = None) -> int:
    parser = argparse.ArgumentParser("tools.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path.cwd(),
                        help="folder receiving data/, outputs/, release_models/ and separated/ "
                             "(default: current)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny toy set and model, trained for one short epoch (seconds, "
                             "for tests): the model is not expected to beat the baseline")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.workdir.mkdir(parents=True, exist_ok=True)
    demo = Demo(args.workdir.resolve(), QUICK if args.quick else FULL)
    try:
        run(demo)
    except DemoError as error:
        print(f"Demo stopped: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
