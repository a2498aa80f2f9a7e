"""Where the time of one separated segment goes, per class of operation (`tools.bench --profile`).

One segment of the released htdemucs configuration (the model `tools.bench --separate` builds:
random weights, the exported 7.8 s segment) is separated by `apply_model` after warm-up runs,
once under `torch.profiler` (self CPU time of every operator of the calling thread) and once
under a FLOP-counting dispatch mode. Every operator falls in one class:

- `convolution`, `gemm_attention` (matrix products and attention kernels), `normalisation`,
  `elementwise` (activations, arithmetic, reductions, fills), `layout` (copies, concatenation,
  padding, views and allocations): by its name (`op_class`);
- `stft_istft`: everything run inside the model's `_spec`/`_ispec`, whatever the operator;
- `overlap_add`: everything `apply_model` runs outside the model's forward (context padding,
  cross-fade weights, the overlap-add itself, normalisation of the output);
- `other`: operators not known to `op_class`, plus the time of no operator (Python, the
  dispatcher, the profiler's own bookkeeping): wall time of the profiled run minus the rest.

FLOP: matrix products and convolutions by torch's formulas (`torch.utils.flop_counter`), CPU
flash attention as 4·B·H·L·S·E (plus the softmax, not counted), FFTs as 2.5·n·log2(n) per real
transform of length n (5·n·log2(n) complex), and one FLOP per output element for elementwise and
normalisation operators (a lower bound: these are bound by memory, not arithmetic). Each class's
achieved rate is compared with the float32 GEMM peak measured in the same process at the same
thread count (`gemm_peak`), and the model's total GFLOP over that peak is the floor: the time the
segment would take if every FLOP ran at the peak.
"""
import contextlib
import math
import time
import typing as tp

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

CLASSES = ("convolution", "gemm_attention", "normalisation", "elementwise", "stft_istft",
           "layout", "overlap_add", "other")
MODEL_SCOPE, SPEC_SCOPE = "model", "stft_istft"
OVERLAP = 0.25

_OPS_BY_CLASS = {
    "convolution": {
        "conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d", "convolution",
        "_convolution", "mkldnn_convolution", "_slow_conv2d_forward", "slow_conv_transpose2d",
        "slow_conv_dilated2d", "_nnpack_spatial_convolution", "convolution_overrideable",
        "_mkldnn_convolution_transpose", "mkldnn_convolution_transpose", "thnn_conv2d"},
    "gemm_attention": {
        "mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "einsum", "mv", "addmv",
        "dot", "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_attention_math", "_softmax", "softmax"},
    "normalisation": {
        "group_norm", "native_group_norm", "layer_norm", "native_layer_norm", "batch_norm",
        "native_batch_norm", "_batch_norm_impl_index", "instance_norm", "_native_batch_norm_legit",
        "_native_batch_norm_legit_no_training", "var_mean", "std_mean"},
    "elementwise": {
        "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "addcmul", "addcmul_",
        "addcdiv", "addcdiv_", "gelu", "glu", "relu", "relu_", "sigmoid", "tanh", "silu", "exp",
        "log", "log1p", "sqrt", "rsqrt", "abs", "pow", "neg", "clamp", "clamp_", "clamp_min",
        "where", "lerp", "fill_", "zero_", "zeros", "zeros_like", "ones", "ones_like", "full",
        "mean", "sum", "std", "var", "cos", "sin", "arange", "rsub", "reciprocal", "square",
        "maximum", "minimum", "sign", "masked_fill", "masked_fill_", "dropout", "eq", "ne", "lt",
        "gt", "le", "ge", "cumsum", "amax", "max", "min", "prod", "erf", "floor", "ceil"},
    "stft_istft": {
        "stft", "istft", "_fft_r2c", "_fft_c2r", "_fft_c2c", "fft_rfft", "fft_irfft",
        "fft_fft", "fft_ifft", "view_as_real", "view_as_complex", "hann_window", "complex",
        "real", "imag"},
    "layout": {
        "copy_", "contiguous", "clone", "_to_copy", "to", "cat", "stack", "pad", "constant_pad_nd",
        "reflection_pad1d", "reflection_pad2d", "replication_pad1d", "_unsafe_view", "view",
        "reshape", "permute", "transpose", "t", "narrow", "slice", "select", "unsqueeze",
        "squeeze", "expand", "expand_as", "as_strided", "unfold", "flatten", "unflatten",
        "split", "split_with_sizes", "chunk", "unbind", "flip", "roll", "index_select", "empty",
        "empty_like", "empty_strided", "new_empty", "new_empty_strided", "new_zeros",
        "resize_", "alias", "detach", "lift_fresh", "_reshape_alias", "repeat",
        "repeat_interleave", "movedim", "swapaxes", "view_as", "resolve_conj", "resolve_neg",
        "_pad_enum", "_pad_circular", "set_", "index", "gather"},
}
_CLASS_OF_OP = {op: name for name, ops in _OPS_BY_CLASS.items() for op in ops}


def op_name(name: str) -> str:
    """The operator's base name, from the profiler's (`aten::add_`) or the dispatcher's
    (`aten.add_.Tensor`) spelling."""
    if "::" in name:
        return name.split("::", 1)[1]
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "aten" else name


def op_class(name: str, scope: tp.Optional[str] = MODEL_SCOPE) -> str:
    """The class of operator `name` run in `scope`: inside the model's forward (`MODEL_SCOPE`),
    inside its `_spec`/`_ispec` (`SPEC_SCOPE`) or outside the model (None: apply_model)."""
    if scope is None:
        return "overlap_add"
    if scope == SPEC_SCOPE:
        return "stft_istft"
    base = op_name(name)
    # in-place variants (gelu_, mul_, ...) belong with their out-of-place operator
    return _CLASS_OF_OP.get(base) or _CLASS_OF_OP.get(base.rstrip("_"), "other")


class Scopes:
    """Marks the model's forward and its `_spec`/`_ispec` as profiler ranges and keeps the
    innermost active scope in `current` (for the FLOP counter). Use as a context manager."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.stack: tp.List[str] = []
        self._wrapped = [name for name in ("forward", "_spec", "_ispec") if hasattr(model, name)]

    @property
    def current(self) -> tp.Optional[str]:
        return self.stack[-1] if self.stack else None

    def _wrap(self, method_name: str) -> None:
        method = getattr(self.model, method_name)
        scope = MODEL_SCOPE if method_name == "forward" else SPEC_SCOPE

        def scoped(*args, **kwargs):
            self.stack.append(scope)
            try:
                with torch.profiler.record_function(f"demucs::{scope}"):
                    return method(*args, **kwargs)
            finally:
                self.stack.pop()
        setattr(self.model, method_name, scoped)

    def __enter__(self) -> "Scopes":
        for name in self._wrapped:
            self._wrap(name)
        return self

    def __exit__(self, *exc) -> None:
        for name in self._wrapped:
            self.model.__dict__.pop(name, None)


def _fft_flop(func_name: str, args: tp.Sequence, out: tp.Any) -> int:
    """2.5·n·log2(n) per real transform (r2c, c2r), 5·n·log2(n) per complex one, over `dim`."""
    signal = args[0] if func_name != "_fft_c2r" else out
    dims = args[1]
    size = math.prod(signal.shape[d] for d in dims)
    count = signal.numel() // size
    per = 5. if func_name == "_fft_c2c" else 2.5
    return int(per * count * size * math.log2(max(size, 2)))


def op_flop(func_name: str, func_packet, args: tp.Sequence, kwargs: dict, out: tp.Any) -> int:
    """FLOP of one dispatched operator (see the module docstring for the formulas)."""
    if func_packet in flop_counter.flop_registry:  # its formulas take the tensors' shapes
        return flop_counter.flop_registry[func_packet](*args, **kwargs, out_val=out)
    if func_name == "_scaled_dot_product_flash_attention_for_cpu":
        query, key = args[0], args[1]
        batch, heads, length, dim = query.shape
        return 4 * batch * heads * length * key.shape[-2] * dim
    if func_name in ("_fft_r2c", "_fft_c2r", "_fft_c2c"):
        return _fft_flop(func_name, args, out)
    if op_class(func_name) in ("elementwise", "normalisation"):
        first = out[0] if isinstance(out, (tuple, list)) else out
        return first.numel() if isinstance(first, torch.Tensor) else 0
    return 0


class FlopCounter(TorchDispatchMode):
    """Sums FLOP per class over the operators dispatched while active, using `scopes` to tell
    the model's work from the STFT's and apply_model's."""

    def __init__(self, scopes: Scopes):
        super().__init__()
        self.scopes = scopes
        self.flop: tp.Dict[str, int] = dict.fromkeys(CLASSES, 0)
        self.model_flop = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        count = op_flop(name, func.overloadpacket, args, kwargs, out)
        scope = self.scopes.current
        self.flop[op_class(name, scope)] += count
        if scope is not None:
            self.model_flop += count
        return out


def gemm_peak(threads: int, size: int = 2048, repeat: int = 10) -> float:
    """Float32 GEMM rate (GFLOP/s) of this machine at `threads` threads: the best of `repeat`
    products of two `size` x `size` matrices."""
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)
    best = math.inf
    for _ in range(repeat):
        begin = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - begin)
    return 2 * size ** 3 / best / 1e9


def _profiled_seconds(run: tp.Callable[[], None]
                      ) -> tp.Tuple[tp.Dict[str, float], float, int]:
    """Self CPU seconds per class of the operators `run` calls in the model's thread, its wall
    time and the number of model forwards it ran."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        begin = time.perf_counter()
        run()
        wall = time.perf_counter() - begin
    events = prof.events()
    thread = next((e.thread for e in events if e.name == f"demucs::{MODEL_SCOPE}"), None)
    seconds = dict.fromkeys(CLASSES, 0.)
    for event in events:
        if event.thread != thread or event.name.startswith("demucs::"):
            continue
        seconds[op_class(event.name, _scope_of(event))] += event.self_cpu_time_total / 1e6
    seconds["other"] += max(0., wall - sum(seconds.values()))
    forwards = sum(e.name == f"demucs::{MODEL_SCOPE}" for e in events)
    return seconds, wall, forwards


def _scope_of(event) -> tp.Optional[str]:
    """The innermost `demucs::` range around a profiler event (None: outside the model)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("demucs::"):
            return parent.name.split("::", 1)[1]
        parent = parent.cpu_parent
    return None


def profile_segment(model: torch.nn.Module, mix: torch.Tensor, warmup: int = 2,
                    peak_gflops: tp.Optional[float] = None) -> dict:
    """Time and FLOP per operator class of `apply_model(model, mix, shifts=0)` after `warmup`
    untimed runs (one forward when `mix` is no longer than a segment's stride, see
    `one_segment_mix`); `peak_gflops` defaults to `gemm_peak` at the current thread count."""
    from demucs.apply import apply_model

    def run() -> None:
        with torch.no_grad():
            apply_model(model, mix, shifts=0, split=True, overlap=OVERLAP)

    peak = peak_gflops or gemm_peak(torch.get_num_threads())
    with Scopes(model) as scopes:
        for _ in range(warmup):
            run()
        seconds, wall, forwards = _profiled_seconds(run)
        with FlopCounter(scopes) as counter:
            run()
    result = _table(seconds, wall, counter.flop, counter.model_flop, peak)
    result["forwards"] = forwards
    return result


def _table(seconds: tp.Dict[str, float], wall: float, flop: tp.Dict[str, int],
           model_flop: int, peak: float) -> dict:
    total = sum(seconds.values())
    rows = []
    for name in CLASSES:
        gflop = flop[name] / 1e9
        rate = gflop / seconds[name] if seconds[name] > 0 else 0.
        rows.append({"class": name, "seconds": seconds[name], "share": seconds[name] / total,
                     "gflop": gflop, "gflops": rate, "of_peak": rate / peak})
    return {"classes": rows, "wall_s": wall, "total_s": total, "peak_gflops": peak,
            "model_gflop": model_flop / 1e9, "floor_s": model_flop / 1e9 / peak,
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def format_profile(result: dict) -> str:
    """The per-class table of `profile_segment`, with the model's GFLOP and floor."""
    lines = [f"{'class':<15} {'ms':>8} {'share':>6} {'GFLOP':>8} {'GFLOP/s':>8} {'of peak':>7}"]
    for row in result["classes"]:
        lines.append(f"{row['class']:<15} {1e3 * row['seconds']:>8.1f} "
                     f"{100 * row['share']:>5.1f}% {row['gflop']:>8.2f} {row['gflops']:>8.1f} "
                     f"{100 * row['of_peak']:>6.1f}%")
    lines.append(f"total {1e3 * result['total_s']:.1f} ms (profiled wall, "
                 f"{result['forwards']} forward(s), {result['threads']} threads); model "
                 f"{result['model_gflop']:.1f} GFLOP per segment; float32 GEMM peak "
                 f"{result['peak_gflops']:.1f} GFLOP/s; floor "
                 f"{result['floor_s']:.2f} s ({100 * result['floor_s'] / result['total_s']:.0f}% "
                 f"of the profiled time)")
    return "\n".join(lines)


@contextlib.contextmanager
def _threads(count: int) -> tp.Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_segment_mix(model: torch.nn.Module) -> torch.Tensor:
    """Synthetic audio as long as one stride of `model`'s segment at the default overlap: the
    longest mixture `apply_model` (without shifts) separates in exactly one forward of a full
    segment (the segment's context comes from zero padding)."""
    from tools.bench_models import synthetic_mix
    length = int((1 - OVERLAP) * float(model.segment) * model.samplerate)
    return synthetic_mix(length / model.samplerate, model.samplerate, model.audio_channels)


def run_profile(model: torch.nn.Module, threads: int, warmup: int = 2) -> dict:
    """`profile_segment` on one segment of synthetic audio at `threads` threads."""
    with _threads(threads):
        model = model.eval()
        return profile_segment(model, one_segment_mix(model), warmup)
