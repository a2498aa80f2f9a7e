"""Benchmarks of Demucs.

    python3 -m tools.bench --train [--batch-sizes 1 2] [--steps 3] [--device cpu|cuda] [--json OUT]
    python3 -m tools.bench --separate [--seconds 30] [--shifts 1] [--overlap 0.25] [--threads 2]
                           [--package MODEL.th] [--repeat 2] [--device cpu|cuda] [--json OUT]
    python3 -m tools.bench --profile [--threads 2] [--package MODEL.th] [--json OUT]

Both take the opt-in speed options `--amp bf16|fp16` (`torch.autocast` around the forward, as
`demucs --amp` and `optim.amp`) and `--compile` (`torch.compile`, as `demucs --compile` and
`misc.compile`); with `--compile`, one untimed separation (or the warm-up steps) pays for the
compilation, reported as `first_wall_s`.

`--train` measures training steps per second and peak memory for the released `htdemucs`
configuration (XP 955717e8 of the `mmi` grid): forward, l1 loss, backward and Adam step on
random stems as long as the real training examples (`dset.segment` after the repitch crop and the
shift augmentation: 7.8 s). Each batch size runs in a fresh process, so that the peak resident
memory (CPU) or the peak allocated memory (CUDA) belongs to that configuration only.

`--separate` times `apply_model` on a synthetic stereo mixture (tones plus noise) with the
released htdemucs configuration (random weights; or a model package given with `--package`),
and reports the real-time factor, the peak memory and the time spent in each stage of the model
(STFT, each encoder/decoder layer, transformer, iSTFT; "other" is apply_model's own work: padding,
cross-fades, normalisation). Stage times come from forward hooks, measured on one extra
untimed run so that the hooks do not slow the timed ones.

`--profile` separates one segment of the same model on the CPU and prints the time, GFLOP,
achieved GFLOP/s and share of each class of operator (convolutions, GEMMs and attention,
normalisation, elementwise, STFT/iSTFT, layout copies, overlap-add, other) against the float32
GEMM peak measured in the same run, and the model's GFLOP per segment with its floor
(`tools.bench_profile`).

Other modes plug in as further `--<mode>` flags with their own `bench_<mode>` function.
"""
import argparse
import collections
import json
import logging
import multiprocessing as mp
import random
import resource
import sys
import time
import typing as tp

import torch

from tools.bench_models import RELEASED_HTDEMUCS_SIG, released_htdemucs_config, \
    separation_model, synthetic_mix, training_length

logger = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2 ** 20


def run_train_steps(batch_size: int, steps: int, warmup: int, device_name: str,
                    amp: tp.Optional[str] = None, compile_model: bool = False) -> dict:
    """Time `steps` training steps (after `warmup` untimed ones) of the released htdemucs, its
    forward in the precision `amp` selects, compiled when `compile_model`."""
    from demucs.train import get_model, get_optimizer
    from demucs.utils import autocast
    device = torch.device(device_name)
    cfg = released_htdemucs_config()
    torch.manual_seed(0)
    model = get_model(cfg).to(device)
    model.train()
    if compile_model:
        model.compile()
    optimizer = get_optimizer(model, cfg)
    length = training_length(cfg)
    shape = (batch_size, len(model.sources), model.audio_channels, length)
    sources = 0.1 * torch.randn(*shape, device=device)
    mix = sources.sum(dim=1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    durations = []
    for step in range(warmup + steps):
        _sync(device)
        begin = time.perf_counter()
        with autocast(device, amp):
            estimate = model(mix)
        loss = (estimate.float() - sources).abs().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        _sync(device)
        if step >= warmup:
            durations.append(time.perf_counter() - begin)
    return {
        "batch_size": batch_size, "amp": amp, "compile": compile_model,
        "seconds_of_audio": length / cfg.dset.samplerate,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "steps_per_s": len(durations) / sum(durations),
        "step_s": sum(durations) / len(durations),
        "peak_memory_mb": _peak_memory_mb(device),
        "device": device_name if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
    }


def _child(queue, function: tp.Callable[..., dict], *args) -> None:
    try:
        queue.put(function(*args))
    except Exception as error:  # reported by the parent
        queue.put({"error": f"{type(error).__name__}: {error}"})


def _run_isolated(function: tp.Callable[..., dict], *args) -> dict:
    """`function(*args)` in a fresh process, so that its peak memory is its own."""
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    process = context.Process(target=_child, args=(queue, function) + args)
    process.start()
    process.join()
    return queue.get() if not queue.empty() else {"error": f"exit code {process.exitcode}"}


def bench_train(batch_sizes: tp.Sequence[int], steps: int, warmup: int, device: str,
                amp: tp.Optional[str] = None, compile_model: bool = False) -> tp.List[dict]:
    """Run `run_train_steps` for each batch size in its own process."""
    results = []
    for batch_size in batch_sizes:
        result = _run_isolated(run_train_steps, batch_size, steps, warmup, device, amp,
                               compile_model)
        if "error" in result:
            raise RuntimeError(f"training benchmark at batch size {batch_size} failed: "
                               f"{result['error']}")
        results.append(result)
    return results


class StageTimer:
    """Wall time spent in each top-level stage of a model's forward, from hooks.

    Stages are the layers of the model's top-level module lists (`encoder.0`, ...), its other
    top-level modules (`crosstransformer`, ...) and, for hybrid models, the `_spec`/`_ispec`
    methods (`stft`, `istft`). Use as a context manager around the runs to measure.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model = model
        self.device = device
        self.seconds: tp.Dict[str, float] = collections.defaultdict(float)
        self._handles: tp.List[tp.Any] = []
        self._starts: tp.Dict[str, float] = {}

    def _stages(self) -> tp.Iterator[tp.Tuple[str, torch.nn.Module]]:
        for name, child in self.model.named_children():
            if isinstance(child, torch.nn.ModuleList):
                for index, layer in enumerate(child):
                    yield f"{name}.{index}", layer
            else:
                yield name, child

    def _now(self) -> float:
        _sync(self.device)
        return time.perf_counter()

    def _start(self, name: str) -> None:
        self._starts[name] = self._now()

    def _stop(self, name: str) -> None:
        self.seconds[name] += self._now() - self._starts.pop(name)

    def _timed_method(self, method_name: str, stage: str) -> None:
        method = getattr(self.model, method_name)

        def timed(*args, **kwargs):
            self._start(stage)
            try:
                return method(*args, **kwargs)
            finally:
                self._stop(stage)
        setattr(self.model, method_name, timed)

    def __enter__(self) -> "StageTimer":
        for name, module in self._stages():
            self._handles.append(module.register_forward_pre_hook(
                lambda _module, _args, name=name: self._start(name)))
            self._handles.append(module.register_forward_hook(
                lambda _module, _args, _out, name=name: self._stop(name)))
        for method_name, stage in (("_spec", "stft"), ("_ispec", "istft")):
            if hasattr(self.model, method_name):
                self._timed_method(method_name, stage)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for method_name in ("_spec", "_ispec"):
            self.model.__dict__.pop(method_name, None)


def run_separation(seconds: float, shifts: int, overlap: float, repeat: int, threads: int,
                   device_name: str, package: tp.Optional[str], amp: tp.Optional[str] = None,
                   compile_model: bool = False) -> dict:
    """Time `apply_model` on `seconds` of synthetic audio (in the precision `amp` selects,
    compiled when `compile_model`); one more run gives stage times."""
    from demucs.apply import apply_model
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    model = separation_model(package).to(device).eval()
    if compile_model:
        model.compile()
    mix = synthetic_mix(seconds, model.samplerate, model.audio_channels).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def separate() -> float:
        random.seed(0)
        _sync(device)
        begin = time.perf_counter()
        with torch.no_grad():
            apply_model(model, mix, shifts=shifts, split=True, overlap=overlap, amp=amp)
        _sync(device)
        return time.perf_counter() - begin

    first = separate() if compile_model else None
    durations = sorted(separate() for _ in range(repeat))
    with StageTimer(model, device) as timer:
        profiled = separate()
    stages = dict(timer.seconds)
    stages["other"] = max(0., profiled - sum(stages.values()))
    median = durations[len(durations) // 2]
    return {
        "model": package or f"htdemucs ({RELEASED_HTDEMUCS_SIG}, random weights)",
        "seconds_of_audio": seconds, "shifts": shifts, "overlap": overlap, "amp": amp,
        "compile": compile_model, "first_wall_s": first, "wall_s": median,
        "all_wall_s": durations, "realtime_factor": seconds / median,
        "peak_memory_mb": _peak_memory_mb(device), "stages_s": stages,
        "device": device_name if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }


def bench_separate(seconds: float, shifts: int, overlap: float, repeat: int, threads: int,
                   device: str, package: tp.Optional[str], amp: tp.Optional[str] = None,
                   compile_model: bool = False) -> dict:
    """Run `run_separation` in its own process."""
    result = _run_isolated(run_separation, seconds, shifts, overlap, repeat, threads, device,
                           package, amp, compile_model)
    if "error" in result:
        raise RuntimeError(f"separation benchmark failed: {result['error']}")
    return result


def format_separate(result: dict) -> str:
    """Summary and per-stage table of the separation benchmark."""
    stages = result["stages_s"]
    total = sum(stages.values()) or 1.
    lines = [f"Separation benchmark, {result['model']}, {result['seconds_of_audio']:g} s stereo, "
             f"shifts={result['shifts']} overlap={result['overlap']}, device "
             f"{result['device']} ({result['threads']} threads), torch {result['torch']}, "
             f"{_speed_options(result)}",
             f"wall {result['wall_s']:.2f} s (median of {len(result['all_wall_s'])}), "
             f"{result['realtime_factor']:.2f}x real time, peak {result['peak_memory_mb']:.0f} MB"]
    if result["first_wall_s"] is not None:
        lines.append(f"first run (with compilation) {result['first_wall_s']:.2f} s")
    lines.append(f"{'stage':<22} {'seconds':>8} {'share':>6}")
    for name, seconds in sorted(stages.items(), key=lambda item: -item[1]):
        lines.append(f"{name:<22} {seconds:>8.2f} {100 * seconds / total:>5.1f}%")
    return "\n".join(lines)


def _speed_options(result: dict) -> str:
    precision = f"amp {result['amp']}" if result["amp"] else "float32"
    return precision + (", compiled" if result["compile"] else "")


def format_train(results: tp.Sequence[dict]) -> str:
    """A small table of the training benchmark."""
    lines = [f"Training benchmark, released htdemucs ({RELEASED_HTDEMUCS_SIG}), "
             f"{results[0]['params_m']:.1f} M params, {results[0]['seconds_of_audio']:.2f} s "
             f"examples, device {results[0]['device']} ({results[0]['threads']} threads), "
             f"{_speed_options(results[0])}",
             f"{'batch':>5} {'steps/s':>9} {'s/step':>8} {'peak MB':>9}"]
    for res in results:
        lines.append(f"{res['batch_size']:>5} {res['steps_per_s']:>9.3f} {res['step_s']:>8.2f} "
                     f"{res['peak_memory_mb']:>9.0f}")
    return "\n".join(lines)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("tools.bench", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train", action="store_true",
                      help="training steps/s and peak memory of the released htdemucs")
    mode.add_argument("--separate", action="store_true",
                      help="separation speed, peak memory and per-stage times")
    mode.add_argument("--profile", action="store_true",
                      help="time and GFLOP per operator class of one separated segment")
    parser.add_argument("--seconds", type=float, default=30., help="separate: mixture length")
    parser.add_argument("--shifts", type=int, default=1, help="separate: random shifts")
    parser.add_argument("--overlap", type=float, default=0.25, help="separate: segment overlap")
    parser.add_argument("--repeat", type=int, default=2, help="separate: timed runs")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="separate, profile: torch CPU threads")
    parser.add_argument("--package", help="separate, profile: a model package (.th) instead of "
                                          "the released htdemucs configuration")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per batch size")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None,
                        help="run the forward in mixed precision (opt-in speed option)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (opt-in speed option)")
    return parser


def main(argv: tp.Optional[tp.List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = get_parser().parse_args(argv)
    results: tp.Any
    if args.train:
        results = bench_train(args.batch_sizes, args.steps, args.warmup, args.device, args.amp,
                              args.compile)
        print(format_train(results))
    elif args.profile:
        from tools.bench_profile import format_profile, run_profile
        results = run_profile(separation_model(args.package), args.threads)
        print(format_profile(results))
    else:
        results = bench_separate(args.seconds, args.shifts, args.overlap, args.repeat,
                                 args.threads, args.device, args.package, args.amp, args.compile)
        print(format_separate(results))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
