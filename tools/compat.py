"""Run a core subset of the test suite against the oldest and newest supported torch, each with
numpy 1.26 and numpy 2.x (`make test-compat`).

    python -m tools.compat [--work build/compat] [--torch-spec torch==2.13.0] [--python python3]
                           [--only NAME ...] [--dry-run]

Why: setup.py accepts `torch>=FLOOR` (read from requirements_minimal.txt, which setup.py turns into
`install_requires`) and any numpy, but the full suite only ever runs on the pinned torch with
numpy 2. This tool proves the floor and the numpy 1.26 series still work.

1. One scratch virtual environment per torch version under `--work`: the floor (on PyPI for Linux
   x86_64 that is the CUDA build, which imports and runs on a CPU-only machine) and the newest
   one the project pins (the Makefile's TORCH_SPEC, the CPU wheel that lies on disk).
2. In it, for numpy 2.x then numpy 1.26: `pip install --upgrade --upgrade-strategy eager
   "torch==X" "numpy..." -e ".[dev]"`, so that pip picks, each time and whatever the venv held
   before, the newest versions of every other package compatible with that numpy (the same set a
   fresh venv would get).
3. `pytest` on SUBSET (reference vectors, CLI separation, a training step with resume,
   checkpoint loading, ONNX export), without a cache folder, its result read from a JUnit file.

`--python` makes the venvs with another interpreter (e.g. the Python floor of setup.py); the
venvs and logs are named after its version.

Prints one table (combination, installed torch/numpy/python, passed/failed/skipped, times) and
exits with status 1 when any combination failed; the logs are under `--work`/logs.
"""
import argparse
from dataclasses import dataclass, field
import json
import os
from pathlib import Path
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import typing as tp
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parent.parent

# numpy series of the matrix: (label, requirement). numpy 2 first, so that the second install of a
# venv only moves what numpy 1.26 needs moved.
NUMPY_SERIES: tp.List[tp.Tuple[str, str]] = [("2.x", "numpy>=2,<3"), ("1.26", "numpy==1.26.*")]

# Requirements added to the install of one numpy series when pip's own choice does not work with
# it, each with the reason. None needed so far: every package pip picks for numpy 1.26 works.
PINS: tp.Dict[str, tp.List[str]] = {"2.x": [], "1.26": []}

# The core subset run in every combination: {what it proves: pytest node ids}. Run with
# `-m "not slow"`: 1 to 3.5 minutes on 2 busy CPU cores (the CUDA build of torch 2.6 the slowest).
SUBSET: tp.Dict[str, tp.List[str]] = {
    "reference vectors": ["tests/test_golden.py"],
    "CLI separation": [
        "tests/test_separate.py::test_default_outputs_wav_stems",
        "tests/test_separate.py::test_streamed_cli_output_matches_in_memory_separation",
        "tests/test_separate.py::test_lossless_formats",
        "tests/test_separate.py::test_mp3",
        "tests/test_separate.py::test_two_stems",
        "tests/test_separate.py::test_golden_unittest_package",
    ],
    "training with resume": [
        "tests/test_solver.py::test_train_validates_emas_keeps_best_and_resumes",
        "tests/test_reliability_training.py::test_resume_restores_the_random_generators",
        "tests/test_reliability_training.py"
        "::test_kill_during_checkpoint_write_then_rerun_gives_the_same_history",
    ],
    "checkpoint loading": ["tests/test_checkpoint.py", "tests/test_states.py",
                           "tests/test_pretrained.py"],
    "ONNX export": [
        "tests/test_onnx_spectrogram.py::test_real_transforms_match_torch_stft",
        "tests/test_onnx.py::test_exported_graph_matches_pytorch_forward[demucs_v2]",
        "tests/test_onnx.py::test_exported_graph_matches_pytorch_forward[htdemucs_small]",
        "tests/test_onnx.py::test_export_bag_writes_every_member_and_the_weights",
    ],
}

# Printed by the scratch venv's python as one JSON line: the versions actually installed, and
# whether the torch build (CUDA or CPU) runs on this machine's CPU.
PROBE = """
import json, platform, sys
from importlib import metadata
import numpy, torch
x = torch.arange(6.0).reshape(2, 3)
assert float((x @ x.T).sum()) == 83.0 and float(x.numpy().sum()) == 15.0
others = {}
for name in ["onnx", "onnxruntime", "scipy", "librosa", "numba"]:
    try:
        others[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        others[name] = None
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
                  "cuda_available": torch.cuda.is_available(), "numpy": numpy.__version__,
                  "python": platform.python_version(), "others": others}))
"""

INSTALL_TIMEOUT = 1800  # seconds; the CUDA torch with its nvidia packages is ~3.5 GB
TEST_TIMEOUT = 1200
HEARTBEAT = 20  # seconds between progress lines of a quiet step


class CompatError(Exception):
    """The project's files do not say what the matrix needs (no torch floor, no TORCH_SPEC)."""


@dataclass(frozen=True)
class Combination:
    """One cell of the matrix: a torch version with a numpy series, in a venv shared with the
    other numpy series of the same torch (numpy is swapped between runs)."""
    torch: str  # exact version, e.g. "2.6.0"
    numpy_label: str  # "2.x" or "1.26"
    numpy_requirement: str  # e.g. "numpy==1.26.*"
    venv: Path
    role: str  # "oldest" or "newest"

    @property
    def name(self) -> str:
        return f"torch-{self.torch}+numpy-{self.numpy_label}"

    @property
    def log_name(self) -> str:
        """Prefix of its log files: the name with the Python of its venv, so that a run with
        another `--python` keeps its own logs."""
        return f"{self.venv.name}+numpy-{self.numpy_label}"


@dataclass
class Result:
    """What running one combination gave. `error` is set when it could not be tested at all
    (install failed, pytest crashed or ran nothing)."""
    combination: Combination
    versions: tp.Dict[str, tp.Any] = field(default_factory=dict)
    passed: int = 0
    failed: int = 0  # failures and errors
    skipped: int = 0
    install_s: float = 0.0
    test_s: float = 0.0
    error: tp.Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.failed == 0 and self.passed > 0


# --------------------------------------------------------------------------- the plan
def _requirement_lines(text: str) -> tp.List[str]:
    """Requirement lines of a requirements file, as setup.py reads them (comments dropped)."""
    lines = (line.split("#")[0].strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("-r")]


def full_version(version: str) -> str:
    """`2.6` -> `2.6.0`: pip's `torch==2.6` means 2.6.0, and the table names it so."""
    parts = version.split(".")
    return ".".join(parts + ["0"] * (3 - len(parts)))


def read_torch_floor(requirements_text: str) -> str:
    """The X of `torch>=X` in requirements_minimal.txt (setup.py's install_requires), as a
    three-part version."""
    for line in _requirement_lines(requirements_text):
        match = re.fullmatch(r"torch\s*>=\s*([0-9][0-9.]*)\s*(,.*)?(;.*)?", line)
        if match:
            return full_version(match.group(1))
    raise CompatError("requirements_minimal.txt has no `torch>=X` line: the oldest torch "
                      "to test is not known")


def read_python_floor(setup_text: str) -> str:
    """The X of setup.py's `python_requires=">=X"` (shown in the header of the table)."""
    match = re.search(r"python_requires\s*=\s*[\"']>=\s*([0-9.]+)[\"']", setup_text)
    if not match:
        raise CompatError("setup.py has no python_requires='>=X'")
    return match.group(1)


def read_makefile_torch_spec(makefile_text: str) -> str:
    """The default TORCH_SPEC of the Makefile (`TORCH_SPEC ?= torch==2.13.0`)."""
    match = re.search(r"^TORCH_SPEC\s*\??=\s*(\S+)\s*$", makefile_text, re.MULTILINE)
    if not match:
        raise CompatError("the Makefile sets no TORCH_SPEC")
    return match.group(1)


def pinned_version(torch_spec: str) -> str:
    """The version of a `torch==X` spec: the matrix tests exact versions."""
    match = re.fullmatch(r"\s*torch\s*==\s*([0-9][0-9A-Za-z.+]*)\s*", torch_spec)
    if not match:
        raise CompatError(f"--torch-spec must pin one version (torch==X), not {torch_spec!r}")
    return match.group(1)


def make_plan(floor: str, newest: str, work: Path, python_tag: str) -> tp.List[Combination]:
    """The combinations to run, oldest torch first; one venv per torch version (named after the
    Python it runs, so that another `--python` gets its own)."""
    versions = [(floor, "oldest")] + ([(newest, "newest")] if newest != floor else [])
    plan = []
    for version, role in versions:
        venv = work / f"py{python_tag}-torch-{version}"
        for label, requirement in NUMPY_SERIES:
            plan.append(Combination(version, label, requirement, venv, role))
    return plan


def install_command(python: Path, combination: Combination) -> tp.List[str]:
    """pip installing this combination's torch and numpy with the project and its `dev` extra.
    Eager upgrades make pip choose every other package afresh for this numpy; `--no-compile`
    saves compiling the bytecode of thousands of modules the subset never imports."""
    return [str(python), "-m", "pip", "install", "--upgrade", "--upgrade-strategy", "eager",
            "--no-compile", "--progress-bar", "off", f"torch=={combination.torch}",
            combination.numpy_requirement, *PINS[combination.numpy_label], "-e", ".[dev]"]


def subset_ids() -> tp.List[str]:
    """Every pytest node id of SUBSET, in order."""
    return [node for nodes in SUBSET.values() for node in nodes]


def pytest_command(python: Path, junit: Path) -> tp.List[str]:
    """pytest on SUBSET, writing no cache folder (`-p no:cacheprovider`) and its counts to
    `junit`."""
    return [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "-m", "not slow and not slurm and not docs", f"--junitxml={junit}", *subset_ids()]


def parse_junit(text: str) -> tp.Tuple[int, int, int]:
    """(passed, failed, skipped) of a pytest JUnit XML report; errors count as failed."""
    root = ElementTree.fromstring(text)
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    passed = failed = skipped = 0
    for suite in suites:
        tests, skips = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
        bad = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        passed += tests - bad - skips
        failed += bad
        skipped += skips
    return passed, failed, skipped


# --------------------------------------------------------------------------- the table
def _seconds(value: float) -> str:
    return f"{int(value) // 60}m{int(value) % 60:02d}s"


def format_table(results: tp.List[Result]) -> str:
    """One row per combination: versions actually installed, test counts, times, verdict."""
    header = ["combination", "torch", "numpy", "python", "passed", "failed", "skipped",
              "install", "tests", "result"]
    rows = [header]
    for result in results:
        versions = result.versions
        verdict = "ok" if result.ok else f"FAIL: {result.error}" if result.error else "FAIL"
        rows.append([result.combination.name, versions.get("torch", "?"),
                     versions.get("numpy", "?"), versions.get("python", "?"),
                     str(result.passed), str(result.failed), str(result.skipped),
                     _seconds(result.install_s), _seconds(result.test_s), verdict])
    widths = [max(len(row[column]) for row in rows) for column in range(len(header) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        lines.append("  ".join(cells + [row[-1]]).rstrip())
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def exit_status(results: tp.List[Result]) -> int:
    """0 when every combination ran and passed, else 1."""
    return 0 if results and all(result.ok for result in results) else 1


# --------------------------------------------------------------------------- running
def _environment(venv: Path) -> tp.Dict[str, str]:
    """This process's environment with the scratch venv first on PATH (tests that call a
    console script find that venv's)."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")}
    env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    return env


def run_step(label: str, command: tp.List[str], log: Path, env: tp.Dict[str, str],
             timeout: float, echo: bool = False) -> int:
    """Run `command` in the checkout with its output in `log`; returns its exit status.

    With `echo` its output is copied to stdout as it comes (pytest's progress dots); else a
    line with the elapsed time and its last line is printed every HEARTBEAT seconds, so a long
    install shows it is alive. Past `timeout` seconds the command and the processes it
    started are killed (status -9).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[compat] {label}: {shlex.join(command)}", flush=True)
    start = time.monotonic()
    last = [""]
    shown = ""
    with open(log, "wb") as sink:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        assert proc.stdout is not None

        def pump() -> None:
            while True:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                sink.write(chunk)
                sink.flush()
                if echo:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                lines = [line for line in chunk.splitlines()
                         if line.strip() and not line.startswith(b"WARNING: Location")]
                if lines:
                    last[0] = lines[-1].decode(errors="replace").strip()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        while True:
            try:
                proc.wait(timeout=HEARTBEAT)
                break
            except subprocess.TimeoutExpired:
                elapsed = time.monotonic() - start
                if elapsed > timeout:  # the command and what it started (dora runs)
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
                if not echo:
                    line = last[0][:100] if last[0] != shown else "(working)"
                    shown = last[0]
                    print(f"[compat] {label}: {_seconds(elapsed)} ... {line}", flush=True)
        reader.join(timeout=10)
    if echo:
        print(flush=True)
    print(f"[compat] {label}: exit status {proc.returncode} after "
          f"{_seconds(time.monotonic() - start)} (log: {log})", flush=True)
    return proc.returncode


def _tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def ensure_venv(venv: Path, python: str, logs: Path) -> Path:
    """The venv's python, creating the venv (with an up-to-date pip) when missing."""
    venv_python = venv / "bin" / "python"
    if not venv_python.exists():
        env = _environment(venv)
        log = logs / f"{venv.name}-venv.log"
        if run_step(f"create {venv.name}", [python, "-m", "venv", str(venv)], log, env, 300) \
                or run_step(f"upgrade pip in {venv.name}", [str(venv_python), "-m", "pip",
                            "install", "--upgrade", "--progress-bar", "off", "pip"],
                            log.with_name(f"{venv.name}-pip.log"), env, 600):
            raise RuntimeError(f"could not create {venv}:\n{_tail(log)}")
    return venv_python


def run_combination(combination: Combination, python: str, work: Path) -> Result:
    """Install, probe and test one combination; never raises for a failure of the project."""
    result = Result(combination)
    logs = work / "logs"
    env = _environment(combination.venv)
    start = time.monotonic()
    try:
        venv_python = ensure_venv(combination.venv, python, logs)
    except RuntimeError as error:
        result.error = "venv creation failed"
        print(f"[compat] {error}", flush=True)
        return result
    install_log = logs / f"{combination.log_name}-install.log"
    status = run_step(f"install {combination.name}", install_command(venv_python, combination),
                      install_log, env, INSTALL_TIMEOUT)
    result.install_s = time.monotonic() - start
    if status != 0:
        result.error = "pip install failed"
        print(_tail(install_log), flush=True)
        return result
    probe = subprocess.run([str(venv_python), "-c", PROBE], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        result.error = "torch/numpy import or CPU check failed"
        print(probe.stdout[-3000:] + probe.stderr[-3000:], flush=True)
        return result
    result.versions = json.loads(probe.stdout.strip().splitlines()[-1])
    print(f"[compat] {combination.name}: installed {json.dumps(result.versions)}", flush=True)
    freeze = subprocess.run([str(venv_python), "-m", "pip", "freeze"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    (logs / f"{combination.log_name}-freeze.txt").write_text(freeze.stdout)

    junit = logs / f"{combination.log_name}-junit.xml"
    junit.unlink(missing_ok=True)
    start = time.monotonic()
    status = run_step(f"pytest {combination.name}", pytest_command(venv_python, junit),
                      logs / f"{combination.log_name}-pytest.log", env, TEST_TIMEOUT, echo=True)
    result.test_s = time.monotonic() - start
    if not junit.is_file():
        result.error = f"pytest exited with status {status} and wrote no report"
        return result
    result.passed, result.failed, result.skipped = parse_junit(junit.read_text())
    if status not in (0, 1) or result.passed + result.failed == 0:
        result.error = f"pytest exited with status {status}"
    return result


def _python_tag(python: str) -> str:
    """`3.11` for the interpreter `python`."""
    return subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                          capture_output=True, text=True, check=True).stdout.strip()


def main(argv: tp.Optional[tp.List[str]] = None) -> int:
    parser = argparse.ArgumentParser("tools.compat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "compat",
                        help="Scratch folder: one venv per torch version, and logs/.")
    parser.add_argument("--torch-spec", default=None,
                        help="Newest torch, pinned (default: the Makefile's TORCH_SPEC).")
    parser.add_argument("--python", default=sys.executable,
                        help="Interpreter the venvs are made with (default: this one).")
    parser.add_argument("--only", nargs="*", default=None,
                        help="Names of the combinations to run (see --dry-run).")
    parser.add_argument("--dry-run", action="store_true",
                        help="Print the plan and its commands; install and run nothing.")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    floor = read_torch_floor((ROOT / "requirements_minimal.txt").read_text())
    python_floor = read_python_floor((ROOT / "setup.py").read_text())
    spec = args.torch_spec or read_makefile_torch_spec((ROOT / "Makefile").read_text())
    plan = make_plan(floor, pinned_version(spec), work, _python_tag(args.python))
    if args.only:
        unknown = set(args.only) - {combination.name for combination in plan}
        if unknown:
            parser.error(f"unknown combination(s) {sorted(unknown)}; the plan has "
                         f"{[combination.name for combination in plan]}")
        plan = [combination for combination in plan if combination.name in args.only]
    print(f"[compat] setup.py allows Python >={python_floor} and torch >={floor}; testing "
          f"torch {floor} (oldest) and {pinned_version(spec)} (newest) with numpy "
          f"{' and '.join(label for label, _ in NUMPY_SERIES)}, with {args.python}", flush=True)
    if args.dry_run:
        for combination in plan:
            python = combination.venv / "bin" / "python"
            print(f"{combination.name} ({combination.role}) in {combination.venv}")
            print("  " + shlex.join(install_command(python, combination)))
            print("  " + shlex.join(pytest_command(python, work / "logs" / "junit.xml")))
        return 0
    start = time.monotonic()
    results = []
    for number, combination in enumerate(plan, 1):
        print(f"[compat] ({number}/{len(plan)}) {combination.name}, "
              f"{_seconds(time.monotonic() - start)} elapsed", flush=True)
        results.append(run_combination(combination, args.python, work))
    print()
    print(format_table(results))
    status = exit_status(results)
    print(f"{'all combinations passed' if status == 0 else 'SOME COMBINATIONS FAILED'} in "
          f"{_seconds(time.monotonic() - start)} (logs in {work / 'logs'})", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
