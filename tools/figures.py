"""Rerun the measurements behind the figures of README.md and docs/: `python3 -m tools.figures`
(`make figures`), or `--only demo,onnx` for some of them.

Each measurement runs the project's own command in a child process (the demo, a toy training,
the benchmarks against the official Demucs 4.1.0, the ONNX benchmark, the training parity check)
and records its values, with the date, commit and load average around it, into one JSON file per
CPU kind, `docs/figures/<CPU-KIND>.json` (`tools.machine.cpu_kind`); a measurement that cannot run
here (no official package in `~/.cache/demucs-peer`, no onnxruntime) is recorded as skipped with
the reason, and one that fails records its error. The table of every CPU kind measured, between
the markers of docs/figures/README.md, is then written again from the JSON files.

Docs cite a value as `NUMBER [fig:NAME.KEY]` (e.g. `2.05 dB [fig:demo.model_nsdr]`), and
tests/test_figures.py checks that the number is that value of some figures file, to its printed
rounding. The sizes are chosen so that all measurements take under 30 minutes on 2 cores.
"""
import argparse
from dataclasses import dataclass
import datetime
import json
import logging
import os
from pathlib import Path
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import typing as tp

from tools import machine

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
FIGURES_DIR = ROOT / "docs" / "figures"
TABLE_FILE = FIGURES_DIR / "README.md"
TABLE_BEGIN = "<!-- figures table: written by `python3 -m tools.figures`, do not edit -->"
TABLE_END = "<!-- end of figures table -->"
BENCH = ROOT.parent / "shared" / "bench"
PEER = Path(os.environ.get("DEMUCS_PEER_VENV", Path.home() / ".cache" / "demucs-peer"))
PEER_PYTHON = PEER / "bin" / "python"


class FigureError(Exception):
    """A measurement's command failed or printed something it cannot read."""


class Skipped(Exception):
    """A measurement cannot run on this machine (the reason is recorded in the figures file)."""


@dataclass(frozen=True)
class Value:
    """One recorded value: what it is, its unit and the decimals the table prints."""
    what: str
    unit: str
    decimals: int


@dataclass(frozen=True)
class Measurement:
    """A named measurement: what it reruns (`command`, for the reader) and how (`measure`, given
    a scratch folder, returns `{key: value}` for the keys of `values`)."""
    name: str
    command: str
    measure: tp.Callable[[Path], tp.Dict[str, float]]
    values: tp.Dict[str, Value]


def environment(checkout: bool) -> tp.Dict[str, str]:
    """The environment of the child processes: with this checkout importable from any folder
    when `checkout`, else as it is (the official Demucs of a peer run must import its own)."""
    env = dict(os.environ)
    if checkout:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run(command: tp.Sequence[str], cwd: Path, timeout: float, checkout: bool = True) -> str:
    """Run `command` in `cwd` (with this checkout on PYTHONPATH when `checkout`); its stdout
    and stderr together. Raises FigureError on failure, and when it runs over `timeout`
    seconds, after killing it with every process it started (its own process group)."""
    shown = " ".join(str(part) for part in command)
    logger.info("$ %s", shown)
    proc = subprocess.Popen([str(part) for part in command], cwd=cwd, env=environment(checkout),
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as error:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise FigureError(f"`{shown}` ran over {timeout:.0f} s (load average "
                          f"{machine.load_average()})") from error
    if proc.returncode != 0:
        raise FigureError(f"`{shown}` failed with status {proc.returncode}:\n{output[-2000:]}")
    return output


def find(pattern: str, output: str, what: str) -> tp.Tuple[str, ...]:
    """The groups of the last match of `pattern` in `output`; FigureError naming `what` if none."""
    matches = re.findall(pattern, output, re.MULTILINE)
    if not matches:
        raise FigureError(f"no {what} in the output (pattern {pattern!r}):\n{output[-2000:]}")
    last = matches[-1]
    return last if isinstance(last, tuple) else (last,)


def need_peer() -> Path:
    """The official Demucs 4.1.0 interpreter, or Skipped saying how to install it."""
    if not PEER_PYTHON.exists():
        raise Skipped(f"no official Demucs venv at {PEER} (`python3 {BENCH}/peer_compare.py` "
                      "installs it, which needs PyPI)")
    return PEER_PYTHON


PEER_TRAINING = ("dora", "hydra", "musdb", "julius", "soundfile", "treetable", "submitit")


def need_peer_training() -> Path:
    """The official interpreter when it can train (train_parity.py runs its trainer), or Skipped
    naming the packages to install into it."""
    peer = need_peer()
    probe = subprocess.run([str(peer), "-c", "import " + ", ".join(PEER_TRAINING)],
                           capture_output=True, text=True, env=environment(checkout=False))
    if probe.returncode != 0:
        raise Skipped(f"the official venv {PEER} cannot train ({probe.stderr.strip()[-200:]}): "
                      f"{peer} -m pip install torch==<its torch> dora-search hydra-core "
                      "hydra-colorlog omegaconf musdb museval julius submitit treetable soundfile")
    return peer


def mean_row(output: str, label: str) -> float:
    """The mean nSDR (last column) of the row `label` of a printed score table."""
    number = r"(-?\d+\.\d+)"
    row = rf"^{re.escape(label)}\s+" + r"\s+".join([number] * 5) + r"\s*$"
    return float(find(row, output, f"score row {label!r}")[-1])


def measure_demo(workdir: Path) -> tp.Dict[str, float]:
    """`python3 -m tools.demo` in a fresh folder (so the training is timed too)."""
    from demucs.evaluate import BASELINES
    output = run([sys.executable, "-m", "tools.demo", "--workdir", workdir], workdir, 1500)
    sig = find(r"^XP ([0-9a-f]{8}),", output, "XP signature")[0]
    model = mean_row(output, f"model {sig}")
    split = mean_row(output, BASELINES["equal_split"])
    return {"seconds": float(find(r"^Demo done in (\d+) s", output, "demo time")[0]),
            "model_nsdr": model, "equal_split_nsdr": split,
            "oracle_gain_nsdr": mean_row(output, BASELINES["oracle_gain"]),
            "oracle_mask_nsdr": mean_row(output, BASELINES["oracle_mask"]),
            "margin_nsdr": model - split}


TOY_TRAINING = ["dset=toy", "model=htdemucs", "htdemucs.channels=8", "epochs=2"]


def measure_toy_training(workdir: Path) -> tp.Dict[str, float]:
    """README's toy experiment in a fresh folder (the toy data made on the way, as a user's
    first run does)."""
    dora = Path(sys.executable).parent / "dora"
    begin = time.perf_counter()
    run([dora, "-P", "demucs", "run", *TOY_TRAINING], workdir, 1200)
    return {"seconds": time.perf_counter() - begin}


def peer_ratios(task: str, pairs: int, ours: tp.Union[str, Path] = sys.executable
                ) -> tp.Dict[str, float]:
    """`peer_compare.py --task TASK --pairs N` (ours, run by the interpreter `ours`, and the
    official alternating): the median time and peak-memory ratios ours/official."""
    output = run([sys.executable, BENCH / "peer_compare.py", "--ours", ours, "--task",
                  task, "--pairs", str(pairs)], ROOT, 1200, checkout=False)
    time_ratio, memory_ratio = find(r"time ratio ours/official median ([\d.]+), peak-memory "
                                    r"ratio median ([\d.]+)", output, "median ratios")
    return {"time_ratio": float(time_ratio), "memory_ratio": float(memory_ratio)}


def measure_separation_vs_official(workdir: Path) -> tp.Dict[str, float]:
    need_peer()
    return peer_ratios("separate", 3)


_TUNED_LAUNCH = ("import runpy, sys; from demucs.allocator import tune_malloc; tune_malloc(); "
                 "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def tuned_interpreter(folder: Path) -> Path:
    """An executable in `folder` that runs a script with this interpreter after tuning the
    allocator, as `dora run` does before training (the harness's worker starts no training, so
    it never tunes it)."""
    launcher = folder / "python-tuned-allocator"
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" -c "{_TUNED_LAUNCH}" "$@"\n')
    launcher.chmod(0o755)
    return launcher


def measure_training_vs_official(workdir: Path) -> tp.Dict[str, float]:
    """The training step against official twice: as the harness runs ours (allocator as it is)
    and as `dora run` does (allocator tuned first)."""
    need_peer()
    plain = peer_ratios("train", 3)
    tuned = peer_ratios("train", 3, ours=tuned_interpreter(workdir))
    return {**plain, "tuned_time_ratio": tuned["time_ratio"],
            "tuned_memory_ratio": tuned["memory_ratio"]}


MEMORY_MINUTES = (1, 4)


def measure_memory(workdir: Path) -> tp.Dict[str, float]:
    """`tools.bench_separate` on generated tracks of 1 and 4 minutes (the tiny test model, so
    that it is short): our peak memory must not grow with the duration; the official command's
    peak on the longer track, when its venv is here."""
    compare = ["--compare", str(PEER_PYTHON)] if PEER_PYTHON.exists() else []
    output = run([sys.executable, "-m", "tools.bench_separate", "--minutes",
                  *map(str, MEMORY_MINUTES), "--workdir", workdir, *compare], ROOT, 1200,
                 checkout=False)
    results = json.loads(output.strip().splitlines()[-1])
    short, long = (results[f"{minutes}min"] for minutes in MEMORY_MINUTES)
    values = {"ours_short_mib": short["ours"]["peak_rss_mib"],
              "ours_long_mib": long["ours"]["peak_rss_mib"],
              "growth": long["ours"]["peak_rss_mib"] / short["ours"]["peak_rss_mib"]}
    if "theirs" in long:
        values["ratio_long"] = long["ours"]["peak_rss_mib"] / long["theirs"]["peak_rss_mib"]
    return values


def measure_onnx(workdir: Path) -> tp.Dict[str, float]:
    """`tools.bench_onnx` as docs/onnx.md cites it (30 s, best of 2, float32 and int8)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as error:
        raise Skipped(f"onnxruntime is not installed ({error}): pip install '.[onnx]'")
    output = run([sys.executable, "-m", "tools.bench_onnx", "--seconds", "30", "--repeats", "2"],
                 workdir, 1200)
    values = {"pytorch_s": float(find(r"^pytorch: ([\d.]+) s", output, "PyTorch time")[0])}
    for variant in ("fp32", "int8"):
        seconds, ratio, error = find(rf"^onnxruntime {variant}: ([\d.]+) s \(([\d.]+) of "
                                     r"pytorch\), rel\. L2 to pytorch ([\d.e+-]+)", output,
                                     f"ONNX {variant} figures")
        values.update({f"{variant}_s": float(seconds), f"{variant}_ratio": float(ratio),
                       f"{variant}_rel_l2": float(error)})
    return values


PARITY_MODEL = "htdemucs"


def measure_train_parity(workdir: Path) -> tp.Dict[str, float]:
    """`train_parity.py`: a tiny htdemucs trained 2 epochs of 3 batches by ours and the official
    trainer on the same toy data; 1 when bit-identical, the largest differences."""
    peer = need_peer_training()
    data = workdir / "toy"
    run([sys.executable, "-m", "tools.toy_musdb", data, "--tracks", "4", "--seconds", "8",
         "--seed", "0"], ROOT, 300)
    report = workdir / "parity.json"
    try:
        run([sys.executable, BENCH / "train_parity.py", "--official-python", peer,
             "--ours-python", sys.executable, "--official-conf", BENCH / "official_conf",
             "--data", data, "--work", workdir / "work", "--model", PARITY_MODEL, "--augment",
             "norepitch", "--epochs", "2", "--max-batches", "3", "--workers", "1",
             "--seed-official-random", "--json", report], ROOT, 1200, checkout=False)
    except FigureError:
        if not report.exists():
            raise
    result = json.loads(report.read_text())
    values = {"bit_identical": float(result["verdict"] == "BIT-IDENTICAL"),
              "loss_max_rel_diff": float(result["loss_rel"])}
    if result["weights_diff"] is not None:  # None: a checkpoint was missing
        values["weights_max_abs_diff"] = float(result["weights_diff"])
    return values


SECONDS = "s"
DB = "dB"
RATIO = ""
MEASUREMENTS: tp.List[Measurement] = [
    Measurement("demo", "python3 -m tools.demo (fresh folder)", measure_demo, {
        "seconds": Value("`make demo`: wall time, toy data to evaluation", SECONDS, 0),
        "model_nsdr": Value("`make demo`: the trained model's test nSDR", DB, 2),
        "equal_split_nsdr": Value("`make demo`: equal split (mixture/4) nSDR", DB, 2),
        "oracle_gain_nsdr": Value("`make demo`: scalar-gain oracle nSDR", DB, 2),
        "oracle_mask_nsdr": Value("`make demo`: ideal-ratio-mask oracle nSDR", DB, 2),
        "margin_nsdr": Value("`make demo`: model minus equal split", DB, 2)}),
    Measurement("toy_training", "dora run " + " ".join(TOY_TRAINING) + " (fresh folder)",
                measure_toy_training, {
                    "seconds": Value("toy experiment of the README: wall time", SECONDS, 0)}),
    Measurement("separation_vs_official",
                "../shared/bench/peer_compare.py --task separate --pairs 3",
                measure_separation_vs_official, {
                    "time_ratio": Value("separation 30 s, ours/official time (median)", RATIO, 3),
                    "memory_ratio": Value("separation 30 s, ours/official peak memory", RATIO,
                                          3)}),
    Measurement("training_vs_official",
                "../shared/bench/peer_compare.py --task train --pairs 3 [--ours TUNED-LAUNCHER]",
                measure_training_vs_official, {
                    "time_ratio": Value("training step, ours/official time (median; without the "
                                        "allocator tuning dora run does)", RATIO, 3),
                    "memory_ratio": Value("training step, ours/official peak memory", RATIO,
                                          3),
                    "tuned_time_ratio": Value("training step, ours/official time (median; "
                                              "allocator tuned as dora run does)", RATIO, 3),
                    "tuned_memory_ratio": Value("training step, ours/official peak memory "
                                                "(allocator tuned)", RATIO, 3)}),
    Measurement("memory", "python3 -m tools.bench_separate --minutes 1 4 [--compare PEER]",
                measure_memory, {
                    "ours_short_mib": Value("`demucs` peak memory, 1-minute track", "MiB", 0),
                    "ours_long_mib": Value("`demucs` peak memory, 4-minute track", "MiB", 0),
                    "growth": Value("peak memory 4 min / 1 min (bounded: about 1)", RATIO, 2),
                    "ratio_long": Value("peak memory ours/official, 4-minute track", RATIO,
                                        2)}),
    Measurement("onnx", "python3 -m tools.bench_onnx --seconds 30 --repeats 2", measure_onnx, {
        "pytorch_s": Value("30 s separation, PyTorch backend", SECONDS, 2),
        "fp32_s": Value("30 s separation, ONNX Runtime float32", SECONDS, 2),
        "fp32_ratio": Value("ONNX Runtime float32 / PyTorch time", RATIO, 2),
        "fp32_rel_l2": Value("ONNX Runtime float32 vs PyTorch, relative L2", RATIO, 7),
        "int8_s": Value("30 s separation, ONNX Runtime int8", SECONDS, 2),
        "int8_ratio": Value("ONNX Runtime int8 / PyTorch time", RATIO, 2),
        "int8_rel_l2": Value("ONNX Runtime int8 vs PyTorch, relative L2", RATIO, 7)}),
    Measurement("train_parity", "../shared/bench/train_parity.py --model htdemucs --epochs 2 "
                "--max-batches 3 --augment norepitch --workers 1 --seed-official-random",
                measure_train_parity, {
                    "bit_identical": Value("training parity with official: 1 = bit-identical",
                                           RATIO, 0),
                    "loss_max_rel_diff": Value("training parity: largest loss rel. difference",
                                               RATIO, 7),
                    "weights_max_abs_diff": Value("training parity: largest final weight "
                                                  "difference", RATIO, 7)}),
]
BY_NAME = {measurement.name: measurement for measurement in MEASUREMENTS}


def value_info(key: str) -> Value:
    """The `Value` of a cited key `NAME.KEY`; KeyError naming what exists otherwise."""
    name, _, value = key.partition(".")
    if name not in BY_NAME or value not in BY_NAME[name].values:
        known = ", ".join(f"{m.name}.{k}" for m in MEASUREMENTS for k in m.values)
        raise KeyError(f"no figure {key!r} is measured by tools.figures (known: {known})")
    return BY_NAME[name].values[value]


def commit() -> str:
    """The checked-out commit, `+dirty` when tracked files differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, text=True,
                          capture_output=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "demucs", "tools"],
                           cwd=ROOT).returncode != 0
    return head + ("+dirty" if dirty else "")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def take(measurement: Measurement, scratch: Path) -> tp.Dict[str, tp.Any]:
    """Run one measurement in a fresh folder under `scratch`: its record for the figures file
    (`values`, or `skipped`/`error` with the reason), with the date, commit and load."""
    folder = scratch / measurement.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    record: tp.Dict[str, tp.Any] = {"command": measurement.command, "date": now(),
                                    "commit": commit(), "load_before": machine.load_average()}
    begin = time.perf_counter()
    try:
        record["values"] = measurement.measure(folder)
    except Skipped as reason:
        record["skipped"] = str(reason)
    except FigureError as error:
        record["error"] = str(error)
    record["load_after"] = machine.load_average()
    record["took_s"] = round(time.perf_counter() - begin, 1)
    shutil.rmtree(folder, ignore_errors=True)
    return record


def figures_path(kind: tp.Optional[str] = None) -> Path:
    return FIGURES_DIR / f"{kind or machine.cpu_kind()}.json"


def read_figures(path: Path) -> tp.Dict[str, tp.Any]:
    """A figures file, or a new one describing this machine when there is none."""
    if path.exists():
        return json.loads(path.read_text())
    return {"cpu_kind": path.stem, "figures": {}}


def describe_machine(figures: tp.Dict[str, tp.Any]) -> None:
    """Set the machine fields of `figures` (this CPU, torch and Python) and the update date."""
    import torch
    figures.update({"cpu_kind": machine.cpu_kind(), "cpu": machine.cpu_name(),
                    "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
                    "python": platform.python_version(), "updated": now()})


def load_all() -> tp.Dict[str, tp.Dict[str, tp.Any]]:
    """Every figures file, by CPU kind."""
    return {path.stem: json.loads(path.read_text())
            for path in sorted(FIGURES_DIR.glob("*.json"))}


def cell(record: tp.Optional[tp.Dict[str, tp.Any]], key: str, info: Value) -> str:
    """One value of a measurement record as the table prints it."""
    if record is None:
        return "not measured"
    if "values" not in record:
        return "skipped" if "skipped" in record else "failed"
    if key not in record["values"]:
        return "—"
    text = f"{record['values'][key]:.{info.decimals}f}"
    return f"{text} {info.unit}".strip()


def render_table(all_figures: tp.Dict[str, tp.Dict[str, tp.Any]]) -> str:
    """The markdown table of every figure (rows) on every CPU kind measured (columns), with a
    line per CPU kind saying what it is, when, with which torch, and the load."""
    kinds = list(all_figures)
    lines = ["| Figure | Key | " + " | ".join(f"`{kind}`" for kind in kinds) + " |",
             "|---|---|" + "---|" * len(kinds)]
    for measurement in MEASUREMENTS:
        for key, info in measurement.values.items():
            cells = [cell(all_figures[kind]["figures"].get(measurement.name), key, info)
                     for kind in kinds]
            lines.append(f"| {info.what} | `{measurement.name}.{key}` | " + " | ".join(cells)
                         + " |")
    lines.append("")
    for kind, figures in all_figures.items():
        dates = sorted({record["date"][:10] for record in figures["figures"].values()})
        loads = [record["load_before"][0] for record in figures["figures"].values()]
        span = f"{dates[0]} to {dates[-1]}" if len(dates) > 1 else "".join(dates)
        load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "?"
        took = sum(record["took_s"] for record in figures["figures"].values())
        lines.append(f"- `{kind}`: {figures.get('cpu', '?')}, {figures.get('cores', '?')} cores, "
                     f"torch {figures.get('torch', '?')}, measured {span}, 1-minute load "
                     f"average {load} at the start of each measurement, {took / 60:.1f} minutes "
                     f"for all of them together "
                     f"([{kind}.json]({kind}.json) has each one's date, commit, load and time).")
    return "\n".join(lines)


def write_table(path: Path = TABLE_FILE) -> None:
    """Replace the table between the markers of `path` with `render_table` of every file."""
    text = path.read_text()
    if TABLE_BEGIN not in text or TABLE_END not in text:
        raise FigureError(f"{path} lacks the table markers {TABLE_BEGIN!r} ... {TABLE_END!r}")
    head, rest = text.split(TABLE_BEGIN, 1)
    _, tail = rest.split(TABLE_END, 1)
    path.write_text(f"{head}{TABLE_BEGIN}\n{render_table(load_all())}\n{TABLE_END}{tail}")


def main(argv: tp.Optional[tp.List[str]] = None) -> int:
    parser = argparse.ArgumentParser("tools.figures", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None,
                        help="comma-separated measurements to rerun: "
                             + ", ".join(BY_NAME) + " (default: all)")
    parser.add_argument("--scratch", type=Path, default=None,
                        help="folder for the measurements' files (default: a temporary one)")
    parser.add_argument("--table-only", action="store_true",
                        help="measure nothing: rewrite the table of docs/figures/README.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = list(BY_NAME) if args.only is None else args.only.split(",")
    unknown = [name for name in names if name not in BY_NAME]
    if unknown:
        parser.error(f"--only {args.only}: no measurement {', '.join(unknown)} "
                     f"(known: {', '.join(BY_NAME)})")
    if args.table_only:
        write_table()
    else:
        measure_into(figures_path(), names, args.scratch)
    return 0


def measure_into(path: Path, names: tp.Sequence[str], scratch: tp.Optional[Path]) -> None:
    """Take the measurements `names` and write each into the figures file `path` as soon as it
    is taken (read again first: the others it holds are kept, even when another run wrote some
    meanwhile), and the table of docs/figures/README.md with it."""
    with tempfile.TemporaryDirectory(dir=scratch) as folder:
        for name in names:
            logger.info("== %s (load average %s)", name, machine.load_average())
            record = take(BY_NAME[name], Path(folder))
            figures = read_figures(path)
            figures["figures"][name] = record
            describe_machine(figures)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n")
            write_table()
            outcome = record.get("values") or record.get("skipped") or record.get("error")
            logger.info("%s (%.0f s): %s", name, record["took_s"], outcome)
    logger.info("Wrote %s", path)


if __name__ == "__main__":
    sys.exit(main())
