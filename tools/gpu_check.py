"""One-command check of this project on a CUDA GPU, and its dry run on the CPU.

    python3 -m tools.gpu_check [--dry-run] [--out DIR] [--golden DIR] [--peer-site DIR]
                               [--seconds S] [--repeats N] [--budget SECONDS] [--only STEP,...]

Steps, in the order they run (a step that breaks is recorded as FAILED with its error and the
next one runs; the exit status is 1 when any step FAILED or measured out of tolerance (FAIL)):

- devices: torch, CUDA and cuDNN versions, the GPU, the TF32 defaults.
- golden: the official reference vectors (`--golden`, default `../shared/golden`, else
  `shared/golden`, else `.gpu_golden`) on the device with TF32 off: relative L2 error of
  `model(forward_mix)` and `apply_model(model, apply_mix, **apply_kwargs)`, PASS when <= 1e-4;
  then again with TF32 on (reported only).
- train: a toy XP through `dora run -d` (world size 1) in float32, with `optim.amp=bf16` and with
  `optim.amp=fp16`: stopped after 2 of its 3 epochs (as Ctrl-C would), then the same command
  again, which must resume from the checkpoint and train the third epoch only. Off CUDA, fp16
  must be refused with one clear line (PASS).
- throughput: `apply_model` on `--seconds` of generated audio with the released htdemucs
  configuration (random weights, seeded): float32, bf16, fp16, `segment_batch` 4 and 8, and
  `model.compile()` (in a child process, under a time limit). Seconds (median of `--repeats`
  after one warm-up run), real-time factor, peak memory (CUDA: max allocated, reset per
  variant) and the difference of each variant's output against float32.
- peer: the official Demucs 4.1.0 (`--peer-site`: the folder holding its `demucs` package)
  separates the same input with the same weights in a child process whose working folder is
  outside this repository; its time, peak memory and difference against ours.
- torch_hdemucs: `model=torch_hdemucs` (torchaudio's HDemucs): a forward and one training step,
  then a 1-epoch toy XP; SKIPPED where torchaudio is not importable.

`--dry-run` runs every step on the CPU with tiny sizes (about a minute). The JSON is written to
OUT/gpu_check.json after every step (so a run stopped by a time limit leaves what it measured),
the table to stdout (last) and OUT/gpu_check.txt. `--budget` bounds the whole run: a step or
variant that no longer fits is SKIPPED with that reason.

The same file, run as a script with `--worker`, is the child process of the peer and compile
measurements: it imports only the standard library and torch at module level, so that the
`demucs` it separates with is whichever package its PYTHONPATH gives.
"""
import argparse
import contextlib
from fractions import Fraction
import functools
import gc
import importlib.util
import json
import math
import os
from pathlib import Path
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import typing as tp

import torch

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-4
PEER_TOLERANCE = 1e-2  # relative L2 of the official output against ours (TF32 convolutions)
RESULT_PREFIX = "GPU_CHECK_RESULT "
STOP_ENV = "GPU_CHECK_STOP_AFTER_EPOCHS"
PASS, FAIL, FAILED, SKIPPED = "PASS", "FAIL", "FAILED", "SKIPPED"
STEPS = ("devices", "golden", "train", "throughput", "peer", "torch_hdemucs")
TRAIN_XPS = {"fp32": [], "bf16": ["optim.amp=bf16"], "fp16": ["optim.amp=fp16"]}
TRAIN_EPOCHS, STOP_AFTER = 3, 2
# Sizes of the dry run's separation model (the released kwargs with these replaced).
TINY_HTDEMUCS = {"channels": 8, "depth": 2, "nfft": 512, "bottom_channels": 32, "t_layers": 1,
                 "t_heads": 2, "segment": Fraction(1)}
TINY_TORCH_HDEMUCS = ["torch_hdemucs.channels=4", "torch_hdemucs.depth=3",
                      "torch_hdemucs.nfft=256"]
Row = tp.Dict[str, tp.Any]

# Written as `sitecustomize.py` into a folder put first on the PYTHONPATH of the first `dora run`
# of each training XP: it makes that run stop after STOP_ENV epochs, as Ctrl-C after the
# checkpoint would, so that the second run must resume. It then runs the sitecustomize it hides.
STOP_HOOK = '''"""gpu_check: stop training after $GPU_CHECK_STOP_AFTER_EPOCHS epochs."""
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _patch(solver_class, epochs):
    if not hasattr(solver_class, "_run_epoch"):
        raise RuntimeError("gpu_check stop hook: demucs.solver.Solver has no _run_epoch")
    run_epoch = solver_class._run_epoch

    def run_then_stop(self, epoch, *args, **kwargs):
        result = run_epoch(self, epoch, *args, **kwargs)
        if epoch + 1 >= epochs:
            raise KeyboardInterrupt
        return result
    solver_class._run_epoch = run_then_stop


class _SolverFinder(importlib.abc.MetaPathFinder):
    def __init__(self, epochs):
        self.epochs = epochs

    def find_spec(self, name, path, target=None):
        if name != "demucs.solver":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _patch(module.Solver, self.epochs)
        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("GPU_CHECK_STOP_AFTER_EPOCHS"):
    sys.meta_path.insert(0, _SolverFinder(int(os.environ["GPU_CHECK_STOP_AFTER_EPOCHS"])))
_others = [entry for entry in sys.path if os.path.abspath(entry or ".") != _HERE]
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _others)
if _spec is not None and _spec.loader is not None:
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
'''


class Context:
    """Settings and shared state of one run (device, folders, time budget, cached reference)."""

    def __init__(self, args: argparse.Namespace, work: Path):
        self.dry_run: bool = args.dry_run
        cuda = torch.cuda.is_available() and not args.dry_run
        self.device = torch.device("cuda") if cuda else torch.device("cpu")
        self.out: Path = args.out
        self.work = work
        self.golden: tp.Optional[Path] = args.golden
        self.peer_site: tp.Optional[Path] = args.peer_site
        self.seconds: float = args.seconds if args.seconds else (3. if args.dry_run else 60.)
        self.repeats: int = args.repeats if args.repeats else (1 if args.dry_run else 3)
        self.deadline = time.monotonic() + args.budget
        self.reference: tp.Optional[dict] = None  # the float32 separation (see `reference`)

    def remaining(self) -> float:
        """Seconds left of the run's budget."""
        return self.deadline - time.monotonic()


# ------------------------------------------------------------------------------ small helpers
def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """`||ours - reference|| / ||reference||`, in float64 on the CPU."""
    ours, reference = ours.detach().double().cpu(), reference.detach().double().cpu()
    return float((ours - reference).norm() / (reference.norm() + 1e-12))


def max_abs_diff(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference of two tensors of the same shape."""
    return float((ours.detach().double().cpu() - reference.detach().double().cpu()).abs().max())


def tail(text: str, size: int = 1500) -> str:
    """The end of a long log, for the JSON."""
    return text if len(text) <= size else "..." + text[-size:]


def error_text(error: BaseException) -> str:
    """`Type: message` of an exception, on one line, at most 400 characters."""
    text = f"{type(error).__name__}: {error}".replace("\n", " | ")
    return text[:400]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that wall times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory since the last reset, or the process' peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def free_device_memory(device: torch.device) -> None:
    """Collect garbage and give cached CUDA blocks back, before a memory measurement."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def pythonpath(*front: tp.Union[str, Path], drop: tp.Sequence[Path] = ()) -> str:
    """`front` then this process' PYTHONPATH entries (without those resolving to `drop`)."""
    dropped = {Path(path).resolve() for path in drop}
    entries = [str(path) for path in front]
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry and Path(entry).resolve() not in dropped and entry not in entries:
            entries.append(entry)
    return os.pathsep.join(entries)


@contextlib.contextmanager
def tf32(enabled: bool) -> tp.Iterator[None]:
    """TF32 matrix products and cuDNN convolutions on or off, restored on exit."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@functools.lru_cache(maxsize=None)
def load_training_helpers() -> tp.Any:
    """tests/training_helpers.py by its path (a `tests` package installed elsewhere, as some
    wheels ship one, cannot shadow it)."""
    path = ROOT / "tests" / "training_helpers.py"
    spec = importlib.util.spec_from_file_location("gpu_check_training_helpers", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def git_head() -> tp.Optional[str]:
    """The checkout's commit, when git and the repository are there."""
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None


# ---------------------------------------------------------------------- separation worker
def separation_options(amp: tp.Optional[str] = None, segment_batch: int = 1) -> dict:
    """`apply_model` keyword arguments of a throughput run (the opt-in ones only when used, so
    that the official `apply_model`, which lacks them, takes the plain ones)."""
    options: tp.Dict[str, tp.Any] = {"shifts": 1, "split": True, "overlap": 0.25}
    if amp:
        options["amp"] = amp
    if segment_batch > 1:
        options["segment_batch"] = segment_batch
    return options


def time_separation(model: torch.nn.Module, mix: torch.Tensor, options: dict,
                    repeats: int) -> tp.Tuple[torch.Tensor, dict]:
    """Run `apply_model(model, mix, **options)` once to warm up, then `repeats` timed times
    (random shifts seeded alike). Returns the output (float32, CPU) and the timings."""
    from demucs.apply import apply_model
    device = mix.device

    def once() -> tp.Tuple[torch.Tensor, float]:
        random.seed(0)
        synchronize(device)
        begin = time.perf_counter()
        with torch.no_grad():
            out = apply_model(model, mix, **options)
        synchronize(device)
        return out, time.perf_counter() - begin

    _, first = once()
    free_device_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(max(1, repeats)):
        out, seconds = once()
        times.append(seconds)
    timing = {"first_s": first, "seconds": statistics.median(times), "all_s": times,
              "peak_mb": peak_memory_mb(device)}
    return out.float().cpu(), timing


def worker_main(argv: tp.List[str]) -> int:
    """Child process: separate the mix of a saved package with the `demucs` on the path."""
    parser = argparse.ArgumentParser("gpu_check --worker")
    parser.add_argument("package", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args(argv)
    import demucs
    from demucs.htdemucs import HTDemucs
    payload = torch.load(args.package, weights_only=False)
    torch.manual_seed(0)
    model = HTDemucs(**payload["kwargs"])
    model.load_state_dict(payload["state"])
    device = torch.device(args.device)
    model.to(device).eval()
    if args.compile:
        model.compile()
    out, timing = time_separation(model, payload["mix"].to(device), separation_options(),
                                  args.repeats)
    torch.save(out, args.output)
    timing.update(demucs_file=demucs.__file__, demucs_version=getattr(demucs, "__version__", None),
                  torch=torch.__version__, compiled=args.compile)
    print(RESULT_PREFIX + json.dumps(timing), flush=True)
    return 0


def run_worker(ctx: Context, package: Path, name: str, env: dict, timeout: float,
               compile_model: bool = False) -> tp.Tuple[dict, torch.Tensor]:
    """Run this file as a `--worker` child in the work folder; its result and output."""
    script = ctx.work / "gpu_check_worker.py"
    if not script.exists():
        shutil.copyfile(Path(__file__).resolve(), script)
    output = ctx.work / f"{name}_out.pt"
    command = [sys.executable, str(script), "--worker", str(package), str(output),
               "--device", str(ctx.device), "--repeats", str(ctx.repeats)]
    if compile_model:
        command.append("--compile")
    try:
        proc = subprocess.run(command, cwd=ctx.work, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        log = error.stdout if isinstance(error.stdout, str) else ""
        raise RuntimeError(f"{name} did not finish within {timeout:.0f} s: "
                           f"{tail(log or '', 600)}") from None
    results = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not results:
        raise RuntimeError(f"{name} exited with status {proc.returncode}: {tail(proc.stdout)}")
    return json.loads(results[-1][len(RESULT_PREFIX):]), torch.load(output, weights_only=True)


# ---------------------------------------------------------------------------------- devices
def device_facts(ctx: Context) -> dict:
    """Versions, the device and the TF32 defaults (read before any step changes them)."""
    facts: tp.Dict[str, tp.Any] = {
        "python": sys.version.split()[0], "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "device": str(ctx.device),
        "dry_run": ctx.dry_run, "git_head": git_head(),
        "tf32_defaults": {
            "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()},
    }
    for name in ("torchaudio", "onnxruntime"):
        try:
            facts[name] = __import__(name).__version__
        except Exception as error:  # absent or broken: say which
            facts[name] = f"not importable ({error_text(error)})"
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        facts.update(gpu=properties.name, gpu_count=torch.cuda.device_count(),
                     gpu_memory_gb=round(properties.total_memory / 2 ** 30, 1),
                     capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                     cudnn=torch.backends.cudnn.version(), driver=nvidia_driver())
    return facts


def nvidia_driver() -> tp.Optional[str]:
    """The NVIDIA driver version from nvidia-smi, when it answers."""
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else None


def step_devices(ctx: Context) -> Row:
    """The device facts (also stored at the top of the JSON)."""
    facts = device_facts(ctx)
    summary = facts.get("gpu", "CPU") + f", torch {facts['torch']}"
    return {"status": PASS, "summary": summary, "facts": facts}


# ----------------------------------------------------------------------------------- golden
def default_golden_dir() -> tp.Optional[Path]:
    """`../shared/golden` (a developer's checkout), `shared/golden`, or `.gpu_golden` (what
    tools/prepare_device.sh copies for the device machine), whichever holds cases first."""
    for folder in (ROOT.parent / "shared" / "golden", ROOT / "shared" / "golden",
                   ROOT / ".gpu_golden"):
        if golden_cases(folder):
            return folder
    return None


def golden_cases(folder: tp.Optional[Path]) -> tp.List[Path]:
    """The case folders (those holding `io.pt`) of a reference-vector folder, sorted."""
    if folder is None or not folder.is_dir():
        return []
    return sorted(case for case in folder.iterdir() if (case / "io.pt").is_file())


def golden_errors(model: torch.nn.Module, io: dict, device: torch.device) -> tp.Dict[str, float]:
    """Relative errors of the forward and (when the case has one) apply_model outputs."""
    from demucs.apply import apply_model
    errors = {}
    with torch.no_grad():
        out = model(io["forward_mix"].clone().to(device))
        errors["forward"] = relative_error(out, io["forward_out"])
        if "apply_out" in io:
            applied = apply_model(model, io["apply_mix"].clone().to(device), **io["apply_kwargs"])
            errors["apply"] = relative_error(applied, io["apply_out"])
    return errors


def golden_case(case: Path, device: torch.device) -> Row:
    """One case with TF32 off (PASS/FAIL) and, on CUDA, with TF32 on (reported only)."""
    from demucs.states import load_model
    row: Row = {"case": case.name}
    try:
        torch.manual_seed(0)
        model = load_model(case / "model.th").to(device).eval()
        io = torch.load(case / "io.pt", weights_only=True)
        with tf32(False):
            errors = golden_errors(model, io, device)
        row.update(errors)
        row["status"] = PASS if max(errors.values()) <= TOLERANCE else FAIL
        if device.type == "cuda":
            with tf32(True):
                row.update({f"tf32_{key}": value
                            for key, value in golden_errors(model, io, device).items()})
    except Exception as error:  # one broken case must not hide the others
        row.update(status=FAILED, error=error_text(error))
    return row


def step_golden(ctx: Context) -> Row:
    """The reference vectors on the device (see the module docstring)."""
    folder = ctx.golden or default_golden_dir()
    cases = golden_cases(folder)
    if not cases:
        return {"status": SKIPPED, "reason": f"no reference vectors found (looked in "
                f"{folder or '../shared/golden, shared/golden, .gpu_golden'}); pass --golden DIR"}
    rows = [golden_case(case, ctx.device) for case in cases]
    good = sum(row["status"] == PASS for row in rows)
    worst = max((max(row.get("forward", 0.), row.get("apply", 0.)) for row in rows), default=0.)
    summary = f"{good}/{len(rows)} cases <= {TOLERANCE:g} (TF32 off), worst {worst:.1e}"
    tf32_errors = [value for row in rows for key, value in row.items() if key.startswith("tf32")]
    if tf32_errors:
        summary += f"; TF32 on: worst {max(tf32_errors):.1e}"
    elif ctx.device.type != "cuda":
        summary += "; TF32 pass skipped (CUDA only)"
    status = PASS if good == len(rows) else (
        FAILED if any(row["status"] == FAILED for row in rows) else FAIL)
    return {"status": status, "summary": summary, "folder": str(folder), "cases": rows}


# ------------------------------------------------------------------------------------ train
def training_env(ctx: Context, dora_dir: Path, stop_hook: tp.Optional[Path]) -> dict:
    """Environment of a `dora run` child: XPs under `dora_dir`, this checkout (and, for the
    first run, the stop hook) first on the path, the CPU only in a dry run."""
    helpers = load_training_helpers()
    env = helpers.dora_env(dora_dir)
    front = ([stop_hook] if stop_hook else []) + [ROOT]
    env["PYTHONPATH"] = pythonpath(*front)
    env.pop(STOP_ENV, None)
    if stop_hook:
        env[STOP_ENV] = str(STOP_AFTER)
    if ctx.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def dora_command(argv: tp.Sequence[str]) -> tp.List[str]:
    """`dora run -d` with one worker: on a GPU machine one process per GPU would be the
    default; on a CPU machine Dora refuses `-d` without `--ddp_workers`."""
    return [sys.executable, "-m", "dora", "run", "-d", "--ddp_workers", "1", *argv]


def run_dora(argv: tp.Sequence[str], env: dict, timeout: float) -> tp.Tuple[int, str, float]:
    """Run `dora run -d ARGV` from the checkout; (status, output, wall seconds)."""
    begin = time.monotonic()
    try:
        proc = subprocess.run(dora_command(argv), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        log = error.stdout if isinstance(error.stdout, str) else ""
        return -1, f"timed out after {timeout:.0f} s\n{log or ''}", time.monotonic() - begin
    return proc.returncode, proc.stdout, time.monotonic() - begin


def xp_history(dora_dir: Path) -> tp.Tuple[tp.Optional[Path], list]:
    """The only XP folder under `dora_dir` and its history (empty when there is none yet)."""
    folders = sorted((dora_dir / "xps").glob("*")) if (dora_dir / "xps").is_dir() else []
    if not folders:
        return None, []
    history = folders[0] / "history.json"
    return folders[0], json.loads(history.read_text()) if history.is_file() else []


def refusal_line(output: str) -> tp.Optional[str]:
    """The one-line refusal of `optim.amp=fp16` by `demucs.train`, if the output holds it."""
    for line in output.splitlines():
        if line.startswith("demucs.train: ") and "optim.amp=fp16" in line:
            return line
    return None


def history_row(history: list) -> Row:
    """Epochs done and last train/valid losses of an XP history."""
    last = history[-1] if history else {}
    return {"epochs": len(history), "train_loss": last.get("train", {}).get("loss"),
            "valid_loss": last.get("valid", {}).get("loss")}


def train_xp(ctx: Context, name: str, overrides: tp.List[str], musdb: Path) -> Row:
    """One XP: a first `dora run -d` stopped after STOP_AFTER epochs, then the same command,
    which must resume and finish. fp16 off CUDA must be refused instead."""
    helpers = load_training_helpers()
    argv = helpers.base_argv(musdb, "htdemucs", epochs=TRAIN_EPOCHS) + overrides
    dora_dir = ctx.work / f"xps_{name}"
    hook = ctx.work / "stop_hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(STOP_HOOK)
    row: Row = {"xp": name, "argv": overrides}
    timeout = max(30., min(300., ctx.remaining()))
    status, output, first = run_dora(argv, training_env(ctx, dora_dir, hook), timeout)
    row["wall_s"] = [round(first, 1)]
    if name == "fp16" and ctx.device.type != "cuda":
        line = refusal_line(output)
        good = status != 0 and line is not None and "Traceback" not in output
        row.update(status=PASS if good else FAILED, refused=line)
        if not good:
            row["error"] = f"fp16 off CUDA was not refused with one line: {tail(output)}"
        return row
    folder, stopped = xp_history(dora_dir)
    if status == 0 or len(stopped) != STOP_AFTER or folder is None \
            or not (folder / "checkpoint.th").is_file() or "interrupted" not in output:
        row.update(history_row(stopped), status=FAILED,
                   error=f"the first run (to be stopped after {STOP_AFTER} epochs) ended with "
                         f"status {status} and {len(stopped)} epochs: {tail(output)}")
        return row
    status, output, second = run_dora(argv, training_env(ctx, dora_dir, None), timeout)
    row["wall_s"].append(round(second, 1))
    _, history = xp_history(dora_dir)
    row.update(history_row(history))
    row["resumed"] = ("Loading checkpoint" in output and history[:STOP_AFTER] == stopped
                      and len(history) == TRAIN_EPOCHS)
    finite = all(isinstance(row[key], float) and math.isfinite(row[key])
                 for key in ("train_loss", "valid_loss"))
    row["status"] = PASS if status == 0 and row["resumed"] and finite else FAILED
    if row["status"] != PASS:
        row["error"] = (f"resume run: status {status}, {len(history)} epochs, resumed "
                        f"{row['resumed']}, finite losses {finite}: {tail(output)}")
    return row


def step_train(ctx: Context) -> Row:
    """The toy XPs of every precision (see the module docstring)."""
    helpers = load_training_helpers()
    musdb = helpers.write_tiny_musdb(ctx.work / "tiny_musdb")
    rows = []
    for name, overrides in TRAIN_XPS.items():
        if ctx.remaining() < 40:
            rows.append({"xp": name, "status": SKIPPED, "reason": "time budget spent"})
            continue
        try:
            rows.append(train_xp(ctx, name, overrides, musdb))
        except Exception as error:  # one broken XP must not hide the others
            rows.append({"xp": name, "status": FAILED, "error": error_text(error)})
    parts = []
    for row in rows:
        if row.get("refused"):
            parts.append(f"{row['xp']} refused")
        else:
            parts.append(f"{row['xp']} {row['status']} {row.get('epochs', '?')} ep"
                         + (" resumed" if row.get("resumed") else ""))
    bad = [row for row in rows if row["status"] == FAILED]
    return {"status": FAILED if bad else PASS, "summary": ", ".join(parts), "xps": rows}


# ------------------------------------------------------------------------------- throughput
def released_kwargs(tiny: bool) -> dict:
    """Constructor kwargs of the released htdemucs (XP 955717e8, as tools.bench builds it) with
    the exported segment (7.8 s); the dry run's tiny sizes with `tiny`."""
    from demucs.train import get_model
    from tools.bench_models import released_htdemucs_config, training_length
    cfg = released_htdemucs_config()
    with torch.device("meta"):
        model = get_model(cfg)
    kwargs = dict(model._init_args_kwargs[1])
    kwargs["segment"] = Fraction(training_length(cfg), cfg.dset.samplerate)
    if tiny:
        kwargs.update(TINY_HTDEMUCS)
    return kwargs


def reference(ctx: Context) -> dict:
    """The seeded model, the mix, the package the workers load and the float32 separation
    (made once and shared by the throughput and peer steps)."""
    if ctx.reference is not None:
        return ctx.reference
    from demucs.htdemucs import HTDemucs
    from tools.bench_models import synthetic_mix
    kwargs = released_kwargs(tiny=ctx.dry_run)
    torch.manual_seed(0)
    model = HTDemucs(**kwargs).eval()
    mix = synthetic_mix(ctx.seconds, model.samplerate, model.audio_channels)
    package = ctx.work / "model_and_mix.pt"
    torch.save({"kwargs": kwargs, "state": model.state_dict(), "mix": mix}, package)
    model.to(ctx.device)
    mix = mix.to(ctx.device)
    free_device_memory(ctx.device)
    out, timing = time_separation(model, mix, separation_options(), ctx.repeats)
    ctx.reference = {"model": model, "mix": mix, "package": package, "out": out,
                     "timing": timing, "params": sum(p.numel() for p in model.parameters())}
    return ctx.reference


def variant_row(name: str, timing: dict, out: torch.Tensor, ref: dict, seconds: float) -> Row:
    """A throughput row: timings, real-time factor and the difference against float32."""
    finite = bool(torch.isfinite(out).all())
    return {"variant": name, "status": PASS if finite else FAIL,
            "seconds": timing["seconds"], "first_s": timing["first_s"],
            "xrt": seconds / timing["seconds"], "peak_mb": timing["peak_mb"],
            "max_abs_diff": max_abs_diff(out, ref["out"]),
            "rel_l2": relative_error(out, ref["out"]), "finite": finite}


def throughput_variants(ctx: Context) -> tp.List[tp.Tuple[str, dict, tp.Optional[str]]]:
    """(name, options, reason to skip) of each in-process variant."""
    cpu = ctx.device.type != "cuda"
    return [
        ("bf16", {"amp": "bf16"}, None),
        ("fp16", {"amp": "fp16"},
         "float16 on CPU falls back to slow kernels (docs/performance.md)" if cpu else None),
        ("segment_batch=4", {"segment_batch": 4}, None),
        ("segment_batch=8", {"segment_batch": 8}, None),
        ("bf16+segment_batch=8", {"amp": "bf16", "segment_batch": 8}, None),
    ]


def run_variant(ctx: Context, ref: dict, name: str, options: dict) -> Row:
    """Time one in-process variant against the float32 reference."""
    try:
        free_device_memory(ctx.device)
        out, timing = time_separation(ref["model"], ref["mix"],
                                      separation_options(**options), ctx.repeats)
    except TypeError as error:
        if "segment_batch" in str(error):
            return {"variant": name, "status": FAILED,
                    "error": "apply_model has no segment_batch argument in this checkout"}
        raise
    return variant_row(name, timing, out, ref, ctx.seconds)


def compile_variant(ctx: Context, ref: dict) -> Row:
    """`model.compile()` in a child process (a slow or crashing compilation cannot stop the
    run), within what the budget leaves after the peer and torch_hdemucs steps."""
    if ctx.device.type != "cuda":
        return {"variant": "compile", "status": SKIPPED,
                "reason": "torch.compile takes many minutes on CPU (docs/performance.md)"}
    timeout = min(300., ctx.remaining() - 120.)
    if timeout < 60:
        return {"variant": "compile", "status": SKIPPED, "reason": "time budget spent"}
    env = dict(os.environ, PYTHONPATH=pythonpath(ROOT))
    result, out = run_worker(ctx, ref["package"], "compile", env, timeout, compile_model=True)
    row = variant_row("compile", result, out, ref, ctx.seconds)
    row["compile_s"] = result["first_s"] - result["seconds"]
    if not Path(result["demucs_file"]).resolve().is_relative_to(ROOT):
        row.update(status=FAILED, error=f"the worker imported {result['demucs_file']}")
    return row


def step_throughput(ctx: Context) -> Row:
    """Separation speed, memory and output differences of each variant (module docstring)."""
    ref = reference(ctx)
    rows: tp.List[Row] = [variant_row("fp32", ref["timing"], ref["out"], ref, ctx.seconds)]
    for name, options, skip in throughput_variants(ctx):
        if skip or ctx.remaining() < 60:
            rows.append({"variant": name, "status": SKIPPED,
                         "reason": skip or "time budget spent"})
            continue
        try:
            rows.append(run_variant(ctx, ref, name, options))
        except Exception as error:  # one broken variant must not hide the others
            rows.append({"variant": name, "status": FAILED, "error": error_text(error)})
    try:
        rows.append(compile_variant(ctx, ref))
    except Exception as error:
        rows.append({"variant": "compile", "status": FAILED, "error": error_text(error)})
    bad = [row for row in rows if row["status"] in (FAIL, FAILED)]
    fp32 = rows[0]
    summary = (f"fp32 {fp32['seconds']:.2f} s ({fp32['xrt']:.1f}x RT) for {ctx.seconds:g} s; "
               f"{len(rows) - len(bad)}/{len(rows)} variants ok")
    return {"status": FAILED if bad else PASS, "summary": summary, "seconds_of_audio": ctx.seconds,
            "params": ref["params"], "device": str(ctx.device), "repeats": ctx.repeats,
            "tf32": {"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                     "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32},
            "peak_memory": "cuda max allocated" if ctx.device.type == "cuda"
            else "process peak RSS (not reset between variants)", "rows": rows}


# ------------------------------------------------------------------------------------- peer
def default_peer_site() -> tp.Optional[Path]:
    """The site-packages of the official Demucs venv made by ../shared/bench/peer_compare.py
    (`~/.cache/demucs-peer`), for this Python version."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = Path.home() / ".cache" / "demucs-peer" / "lib" / version / "site-packages"
    return site if site.is_dir() else None


def peer_problem(site: tp.Optional[Path]) -> tp.Optional[str]:
    """Why `site` cannot serve as the official Demucs' folder (None when it can)."""
    if site is None:
        return "no --peer-site given and no ~/.cache/demucs-peer venv for this Python"
    if not (site / "demucs" / "htdemucs.py").is_file():
        return f"{site} holds no demucs package (demucs/htdemucs.py)"
    if site.resolve() == ROOT or site.resolve().is_relative_to(ROOT / "demucs"):
        return f"{site} is this checkout, not the official package"
    return None


def peer_env(site: Path) -> dict:
    """Environment of the peer child: its site first, then this process' PYTHONPATH without
    the checkout, so that `import demucs` finds the official package."""
    env = dict(os.environ, PYTHONPATH=pythonpath(site, drop=[ROOT]))
    env.pop(STOP_ENV, None)
    return env


def step_peer(ctx: Context) -> Row:
    """The official Demucs 4.1.0 on the same model and input (module docstring)."""
    site = ctx.peer_site or default_peer_site()
    problem = peer_problem(site)
    if problem:
        return {"status": SKIPPED, "reason": problem}
    assert site is not None
    timeout = min(300., ctx.remaining() - 30.)
    if timeout < 30:
        return {"status": SKIPPED, "reason": "time budget spent"}
    ref = reference(ctx)
    result, out = run_worker(ctx, ref["package"], "peer", peer_env(site), timeout)
    imported = Path(result["demucs_file"]).resolve()
    if not imported.is_relative_to(site.resolve()):
        return {"status": FAILED, "error": f"the peer child imported {imported}, not {site}"}
    ours = ref["timing"]
    rel = relative_error(out, ref["out"])
    row = {"status": PASS if rel <= PEER_TOLERANCE else FAIL, "site": str(site),
           "demucs_version": result.get("demucs_version"), "torch": result.get("torch"),
           "seconds": result["seconds"], "first_s": result["first_s"],
           "peak_mb": result["peak_mb"], "ours_seconds": ours["seconds"],
           "ours_peak_mb": ours["peak_mb"], "time_ratio": ours["seconds"] / result["seconds"],
           "max_abs_diff": max_abs_diff(out, ref["out"]), "rel_l2": rel}
    row["summary"] = (f"official {row['seconds']:.2f} s, ours {ours['seconds']:.2f} s (ratio "
                      f"{row['time_ratio']:.2f}), max |diff| {row['max_abs_diff']:.1e}")
    return row


# ---------------------------------------------------------------------------- torch_hdemucs
def torch_hdemucs_step(ctx: Context) -> dict:
    """Forward and one Adam step of `model=torch_hdemucs` with the config's sizes."""
    from omegaconf import OmegaConf
    from demucs.train import TorchHDemucsWrapper
    config = OmegaConf.load(ROOT / "conf" / "config.yaml")
    kwargs = OmegaConf.to_container(config.torch_hdemucs, resolve=True)
    assert isinstance(kwargs, dict)
    sources = ["drums", "bass", "other", "vocals"]
    torch.manual_seed(0)
    model = TorchHDemucsWrapper(sources=sources, audio_channels=2, samplerate=44100, segment=4,
                                **kwargs).to(ctx.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    length = 44100 * (1 if ctx.dry_run else 4)
    stems = 0.1 * torch.randn(2, len(sources), 2, length, device=ctx.device)
    begin = time.perf_counter()
    estimate = model(stems.sum(1))
    loss = torch.nn.functional.l1_loss(estimate, stems)
    loss.backward()
    optimizer.step()
    synchronize(ctx.device)
    return {"loss": float(loss), "shape": list(estimate.shape),
            "seconds": time.perf_counter() - begin}


def step_torch_hdemucs(ctx: Context) -> Row:
    """torchaudio's HDemucs through this project (module docstring)."""
    try:
        import torchaudio  # noqa: F401
    except Exception as error:
        return {"status": SKIPPED, "reason": f"torchaudio is not importable ({error_text(error)})"}
    row: Row = {"direct": torch_hdemucs_step(ctx)}
    helpers = load_training_helpers()
    musdb = ctx.work / "tiny_musdb"
    if not musdb.is_dir():
        helpers.write_tiny_musdb(musdb)
    argv = [arg for arg in helpers.base_argv(musdb, "hdemucs", epochs=1)
            if not arg.startswith(("model=", "hdemucs."))]
    argv += ["model=torch_hdemucs", *TINY_TORCH_HDEMUCS]
    dora_dir = ctx.work / "xps_torch_hdemucs"
    status, output, wall = run_dora(argv, training_env(ctx, dora_dir, None),
                                    max(30., min(300., ctx.remaining())))
    _, history = xp_history(dora_dir)
    row["xp"] = dict(history_row(history), wall_s=round(wall, 1), exit_status=status)
    good = status == 0 and len(history) == 1 and math.isfinite(row["direct"]["loss"])
    row["status"] = PASS if good else FAILED
    row["summary"] = (f"forward+step loss {row['direct']['loss']:.3f}; 1-epoch XP "
                      f"{'ok' if status == 0 else 'failed'}")
    if not good:
        row["error"] = f"torch_hdemucs XP: status {status}: {tail(output)}"
    return row


# -------------------------------------------------------------------------------- reporting
def run_step(name: str, function: tp.Callable[[Context], Row], ctx: Context) -> Row:
    """Run one step; an exception becomes a FAILED row with its error and traceback tail."""
    begin = time.monotonic()
    try:
        row = function(ctx)
    except Exception as error:  # the script goes on with the next step
        row = {"status": FAILED, "error": error_text(error),
               "traceback": tail(traceback.format_exc(), 2000)}
    row["step_s"] = round(time.monotonic() - begin, 1)
    return row


def failed_steps(steps: tp.Dict[str, Row]) -> tp.List[str]:
    """Names of the steps that FAILED or measured out of tolerance."""
    return [name for name, row in steps.items() if row.get("status") in (FAIL, FAILED)]


def _number(value: tp.Any, digits: int = 2) -> str:
    """A table cell: a float with `digits` decimals (exponent below 1e-2), `-` for None."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and abs(value) < 1e-2:
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


def format_rows(header: tp.Sequence[str], rows: tp.Sequence[tp.Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip()
             for line in [header, *rows]]
    return "\n".join(lines)


def step_summary(row: Row) -> str:
    """One-line description of a step for the final table."""
    text = row.get("summary") or row.get("reason") or row.get("error") or ""
    if row.get("status") == FAILED and row.get("error") and row.get("summary"):
        text += f" ({row['error']})"
    return text[:110]


def detail_tables(steps: tp.Dict[str, Row]) -> tp.List[str]:
    """The per-case, per-XP and per-variant tables of the steps that have them."""
    tables = []
    golden = steps.get("golden", {}).get("cases")
    if golden:
        tables.append(format_rows(
            ["case", "status", "forward", "apply", "tf32 fwd", "tf32 apply"],
            [[row["case"], row["status"], _number(row.get("forward")),
              _number(row.get("apply")), _number(row.get("tf32_forward")),
              _number(row.get("tf32_apply"))] for row in golden]))
    xps = steps.get("train", {}).get("xps")
    if xps:
        tables.append(format_rows(
            ["xp", "status", "epochs", "train loss", "valid loss", "wall s", "resumed"],
            [[row["xp"], row["status"], _number(row.get("epochs")),
              _number(row.get("train_loss"), 4), _number(row.get("valid_loss"), 4),
              "+".join(_number(value, 1) for value in row.get("wall_s", [])) or "-",
              "refused" if row.get("refused") else _number(row.get("resumed"))]
             for row in xps]))
    variants = steps.get("throughput", {}).get("rows")
    if variants:
        tables.append(format_rows(
            ["variant", "status", "seconds", "x RT", "peak MB", "max |diff|"],
            [[row["variant"], row["status"], _number(row.get("seconds")),
              _number(row.get("xrt"), 1), _number(row.get("peak_mb"), 0),
              _number(row.get("max_abs_diff"))] for row in variants]))
    return tables


def format_report(report: dict) -> str:
    """Detail tables, then the short table of steps (last)."""
    steps = report["steps"]
    facts = report.get("devices", {})
    head = (f"gpu_check: {facts.get('gpu', 'CPU')}, torch {facts.get('torch')}, "
            f"dry run {report['dry_run']}, {report['wall_s']:.0f} s")
    table = format_rows(["step", "status", "time s", "summary"],
                        [[name, row.get("status", "?"), _number(row.get("step_s"), 1),
                          step_summary(row)] for name, row in steps.items()])
    failed = failed_steps(steps)
    verdict = f"FAILED: {', '.join(failed)}" if failed else "all steps passed or skipped"
    return "\n\n".join([*detail_tables(steps), head, table, verdict])


def write_report(report: dict, out: Path) -> None:
    """OUT/gpu_check.json, replaced atomically."""
    out.mkdir(parents=True, exist_ok=True)
    partial = out / ".gpu_check.json.partial"
    partial.write_text(json.dumps(report, indent=1, default=str))
    os.replace(partial, out / "gpu_check.json")


# -------------------------------------------------------------------------------------- main
STEP_FUNCTIONS: tp.Dict[str, tp.Callable[[Context], Row]] = {
    "devices": step_devices, "golden": step_golden, "train": step_train,
    "throughput": step_throughput, "peer": step_peer, "torch_hdemucs": step_torch_hdemucs}


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("tools.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="Every step on the CPU with tiny sizes (about a minute).")
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"),
                        help="Folder of gpu_check.json and gpu_check.txt (default: %(default)s).")
    parser.add_argument("--golden", type=Path, help="Folder of the reference vectors (default: "
                        "../shared/golden, shared/golden or .gpu_golden).")
    parser.add_argument("--peer-site", type=Path, help="Folder holding the official demucs "
                        "package (default: ~/.cache/demucs-peer's site-packages, if any).")
    parser.add_argument("--seconds", type=float,
                        help="Audio separated by the throughput and peer steps (60; dry run 3).")
    parser.add_argument("--repeats", type=int, help="Timed runs per variant (3; dry run 1).")
    parser.add_argument("--budget", type=float, default=450.,
                        help="Seconds the whole run may take (default: %(default)s).")
    parser.add_argument("--only", help=f"Comma-separated steps to run, of {','.join(STEPS)}.")
    return parser


def selected_steps(only: tp.Optional[str]) -> tp.List[str]:
    """The steps to run, in their order; `devices` always."""
    if not only:
        return list(STEPS)
    names = {name.strip() for name in only.split(",") if name.strip()}
    unknown = names - set(STEPS)
    if unknown:
        raise SystemExit(f"tools.gpu_check: unknown step(s) {', '.join(sorted(unknown))}; "
                         f"use {', '.join(STEPS)}")
    return [name for name in STEPS if name in names or name == "devices"]


def main(argv: tp.Optional[tp.List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1:])
    args = get_parser().parse_args(argv)
    names = selected_steps(args.only)
    begin = time.monotonic()
    report: tp.Dict[str, tp.Any] = {"dry_run": args.dry_run, "started": time.strftime("%FT%T%z"),
                                    "argv": argv, "wall_s": 0., "steps": {}}
    if args.dry_run:
        # One CPU thread everywhere: on a small machine shared with other jobs, OpenMP threads
        # waiting for each other made the dry run up to 30 times slower.
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        ctx = Context(args, Path(work))
        for name in names:
            print(f"gpu_check: {name} ...", flush=True)
            row = run_step(name, STEP_FUNCTIONS[name], ctx)
            report["steps"][name] = row
            if name == "devices" and "facts" in row:
                report["devices"] = row["facts"]
            report["wall_s"] = time.monotonic() - begin
            report["failed"] = failed_steps(report["steps"])
            write_report(report, args.out)
            print(f"gpu_check: {name} {row.get('status')} ({row['step_s']} s) "
                  f"{step_summary(row)}", flush=True)
    text = format_report(report)
    (args.out / "gpu_check.txt").write_text(text + "\n")
    print(text)
    print(f"JSON: {args.out / 'gpu_check.json'}")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
