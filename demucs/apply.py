"""Running a separation model (or a bag of models) on a mixture of any length.

The computation is upstream's: random time shifts whose estimates are averaged (shift trick),
overlapping segments blended with triangular weights, neighbouring audio used as context padding,
and bags of models weighted per source. Each rule lives in one place, in three layers:

1. `ApplyOptions`: the user's settings, validated once when they are created.
2. `make_plan`: the model (or a bag, nested or not) turned into a tree of `BagPlan` and
   `LeafPlan` nodes for a track of a given length. A leaf holds its segment length, stride,
   cross-fade weight, maximum shift and the shift offsets drawn from `random` (bag members in
   order, each one's shifts in order, each followed by the draws its pass's forwards make: the
   order of upstream's recursion, so a seed gives upstream's output and leaves `random` where
   upstream does), and one `ShiftedPass` per shift: the model evaluated over the track delayed
   by that shift, cut into segments.
3. Two executors of a plan, sharing the segment reads (`ShiftedPass.read_input`), the groups of
   segments run in one forward (`ShiftedPass.segment_groups`, one segment each unless
   `segment_batch` asks for more), the model evaluations and callback reports (`_Evaluator`),
   the shift average (`_average_shifts`) and the bag weighting (`_weigh_members`):
   - `apply_model` (`_InMemoryExecutor`) runs pass after pass over whole-pass tensors kept on the
     mix's device;
   - `apply_model_streaming` (`_StreamingExecutor`) runs the segments of every pass in track
     order over windows that slide along the track, and yields each block as soon as no later
     segment touches it, so memory does not grow with the duration.

The executors differ in their overlap-add arithmetic only: the in-memory one adds
`weight * segment` with a fused in-place `addcmul_` (`_add_fused`), the streaming one computes
the product and adds it (`_add_product`). The two round differently in the last bit, so each
keeps its own formula and both stay bit-identical to what they gave before; with the same formula
they agree bitwise, which tests/test_apply.py checks. Under `rounding.upstream_rounding()` both
round the product first, as upstream's `apply_model` does.
"""
from collections import deque
from concurrent.futures import ThreadPoolExecutor
import contextlib
from dataclasses import dataclass
import functools
import heapq
import itertools
import random
from threading import Lock
import typing as tp

import torch
from torch import nn
from torch.nn import functional as F
import tqdm

from . import allocator
from .bag import BagOfModels, has_fixed_segment, Model  # noqa: F401  (Model: as in Demucs 4.1)
from .demucs import Demucs  # noqa: F401  (importable from here, as in Demucs 4.1)
from .hdemucs import HDemucs  # noqa: F401  (importable from here, as in Demucs 4.1)
from .htdemucs import HTDemucs  # noqa: F401  (importable from here, as in Demucs 4.1)
from .rounding import exact
from .precision import warn_if_bf16_is_emulated
from .utils import autocast, center_trim, check_amp, DummyPoolExecutor

Callback = tp.Callable[[dict], None]
# The shift trick delays the track by up to this much.
MAX_SHIFT_SECONDS = 0.5


class TensorChunk:
    """A window `[offset, offset + length)` on the last dimension of a tensor, without a copy.

    `padded` reads the window with extra context taken from the surrounding audio, so that the
    model sees real neighbouring samples; zeros are used only past the ends of the tensor.
    """

    def __init__(self, tensor, offset: int = 0, length: tp.Optional[int] = None):
        total_length = tensor.shape[-1]
        if not 0 <= offset < total_length:
            raise ValueError(f"chunk offset {offset} outside a tensor of length {total_length}")
        if length is None:
            length = total_length - offset
        else:
            length = min(total_length - offset, length)
        if isinstance(tensor, TensorChunk):
            self.tensor = tensor.tensor
            self.offset = offset + tensor.offset
        else:
            self.tensor = tensor
            self.offset = offset
        self.length = length
        self.device = tensor.device

    @property
    def shape(self) -> tp.List[int]:
        shape = list(self.tensor.shape)
        shape[-1] = self.length
        return shape

    def padded(self, target_length: int) -> torch.Tensor:
        """The window centred in `target_length` samples of context."""
        delta = target_length - self.length
        if delta < 0:
            raise ValueError(f"cannot pad a chunk of {self.length} samples to {target_length}")
        return read_padded(self.tensor, self.offset - delta // 2, target_length)


def read_padded(source, start: int, length: int) -> torch.Tensor:
    """`source[..., start:start + length]`, with zeros where the range leaves `[0, len(source))`.

    `source` is anything sliceable on its last dimension with a `shape` (a tensor, or a lazy
    reader of an audio file for the streaming path).
    """
    total_length = source.shape[-1]
    valid_start = min(max(0, start), total_length)
    valid_end = min(max(valid_start, start + length), total_length)
    left = min(max(0, valid_start - start), length)  # all zeros for a range off the track
    return F.pad(source[..., valid_start:valid_end],
                 (left, length - left - (valid_end - valid_start)))


def tensor_chunk(tensor_or_chunk) -> TensorChunk:
    """Wrap a tensor as a full-length `TensorChunk`; chunks are returned unchanged."""
    if isinstance(tensor_or_chunk, TensorChunk):
        return tensor_or_chunk
    if not isinstance(tensor_or_chunk, torch.Tensor):
        raise TypeError(f"expected a tensor or TensorChunk, got {type(tensor_or_chunk).__name__}")
    return TensorChunk(tensor_or_chunk)


def leaf_input_length(model: nn.Module, length: int, segment: tp.Optional[float]) -> int:
    """Number of samples fed to a single model for a chunk of `length` samples."""
    if has_fixed_segment(model) and segment is not None:
        return int(segment * model.samplerate)
    if hasattr(model, "valid_length"):
        return model.valid_length(length)
    return length


def segment_weight(segment_length: int, transition_power: float,
                   device=None) -> torch.Tensor:
    """Triangular cross-fade weight (1 up to the middle and back down), peak 1, to a power."""
    weight = torch.cat([torch.arange(1, segment_length // 2 + 1, device=device),
                        torch.arange(segment_length - segment_length // 2, 0, -1, device=device)])
    return (weight / weight.max()) ** transition_power


# Inputs shorter than this are zero-padded before the model and its output cropped back: the
# strided encoders of small models (e.g. a 4-channel HDemucs) would otherwise normalise a single
# time step. Model inputs of real tracks are whole segments or longer and are never padded.
MIN_MODEL_INPUT = 1024


def run_model(model: nn.Module, mix: torch.Tensor, amp: tp.Optional[str] = None) -> torch.Tensor:
    """`model(mix)` without gradients, in the precision `amp` selects (see `apply_model`);
    the output is always float32. Under `upstream_rounding()` the input is made contiguous: a
    window read from a channel-last track (e.g. `torch.from_numpy(audio).t()`) keeps that layout,
    with which the models round differently in the last bit than upstream, whose windows are
    fresh copies (separation keeps the layout, and its recorded outputs)."""
    if exact():
        mix = mix.contiguous()
    length = mix.shape[-1]
    if length < MIN_MODEL_INPUT:
        mix = F.pad(mix, (0, MIN_MODEL_INPUT - length))
    with torch.no_grad(), autocast(mix.device, amp):
        out = model(mix)
    return out[..., :length].float()


# ----------------------------------------------------------------------------------------------
# Options and plan: what to compute, decided once for both executors.


@dataclass(frozen=True)
class ApplyOptions:
    """How a model is applied to a track; see `apply_model` for each setting.

    Invalid values raise `ValueError` on creation, so that neither executor checks them again.
    """
    shifts: int = 1
    split: bool = True
    overlap: float = 0.25
    transition_power: float = 1.
    segment: tp.Optional[float] = None
    amp: tp.Optional[str] = None
    segment_batch: int = 1

    def __post_init__(self) -> None:
        check_amp(self.amp)
        if isinstance(self.segment_batch, bool) or not isinstance(self.segment_batch, int) \
                or self.segment_batch < 1:
            raise ValueError(f"segment_batch must be a whole number >= 1 (the segments run in "
                             f"one forward), got {self.segment_batch!r}")
        if not self.shifts >= 0:
            raise ValueError(f"shifts must be 0 or more (0 disables the shift trick), "
                             f"got {self.shifts}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1) (the fraction of a segment shared with "
                             f"the next one), got {self.overlap}")
        if not self.transition_power >= 1:
            raise ValueError(f"transition_power must be >= 1, got {self.transition_power}")
        if self.segment is not None and not self.segment > 0:
            raise ValueError(f"segment must be a positive number of seconds (or None for the "
                             f"model's own), got {self.segment}")


@dataclass(frozen=True, eq=False)
class ShiftedPass:
    """One evaluation of a leaf model over the track delayed by one shift.

    The model sees the view `[start, start + length)` of the track (it starts up to
    `leaf.max_shift` samples before the track, where zeros are read unless the source has audio
    there), whole or cut into segments of `leaf.segment_length` samples every `leaf.stride`.
    Compared by identity.
    """
    leaf: "LeafPlan"
    shift_idx: int
    start: int
    length: int

    def segment_starts(self) -> range:
        """Track position of each segment, in order."""
        return range(self.start, self.start + self.length, self.leaf.stride)

    def chunk_length(self, start: int) -> int:
        """Samples of output the segment at `start` contributes (the last one may be short)."""
        remaining = self.start + self.length - start
        if self.leaf.segment_length is None:
            return remaining
        return min(self.leaf.segment_length, remaining)

    def input_length(self, start: int, segment: tp.Optional[float]) -> int:
        """Samples the model is given for the segment at track position `start`."""
        return leaf_input_length(self.leaf.model, self.chunk_length(start), segment)

    def read_input(self, source, origin: int, start: int,
                   segment: tp.Optional[float]) -> torch.Tensor:
        """The model input for the segment at track position `start`: the segment centred in the
        context the model asks for (zeros off `source`). Track position 0 is `origin` in
        `source`."""
        chunk_length = self.chunk_length(start)
        input_length = self.input_length(start, segment)
        return read_padded(source, origin + start - (input_length - chunk_length) // 2,
                           input_length)

    def segment_groups(self, size: int, segment: tp.Optional[float]
                       ) -> tp.List[tp.Tuple[int, ...]]:
        """The segment starts in order, cut into groups of at most `size` consecutive segments
        whose model inputs have the same length: each group is evaluated in one forward."""
        groups: tp.List[tp.List[int]] = []
        for start in self.segment_starts():
            if (groups and len(groups[-1]) < size and self.input_length(groups[-1][0], segment)
                    == self.input_length(start, segment)):
                groups[-1].append(start)
            else:
                groups.append([start])
        return [tuple(group) for group in groups]


@dataclass(frozen=True, eq=False)
class LeafPlan:
    """How one model of the tree is applied: segments, cross-fade and shifts.

    `segment_length`, `stride` and `weight` are None when the track is not split. `bag_index`
    and `bag_size` are what callbacks report as `model_idx_in_bag` (the index in the outermost
    bag) and `models` (the size of the bag holding this model; None for a lone model).
    """
    model: nn.Module
    segment_length: tp.Optional[int]
    stride: tp.Optional[int]
    weight: tp.Optional[torch.Tensor]
    max_shift: int
    shift_offsets: tp.Tuple[int, ...]
    track_length: int
    bag_index: int
    bag_size: tp.Optional[int]

    @property
    def module(self) -> nn.Module:
        return self.model

    @functools.cached_property
    def passes(self) -> tp.Tuple[ShiftedPass, ...]:
        """One pass per shift offset, or a single unshifted pass without the shift trick."""
        if not self.shift_offsets:
            return (ShiftedPass(self, 0, 0, self.track_length),)
        return tuple(ShiftedPass(self, shift_idx, offset - self.max_shift,
                                 self.track_length + self.max_shift - offset)
                     for shift_idx, offset in enumerate(self.shift_offsets))

    def leaves(self) -> tp.Iterator["LeafPlan"]:
        yield self


@dataclass(frozen=True, eq=False)
class BagPlan:
    """A bag of models: the plans of its members and their per-source weights."""
    module: BagOfModels
    members: tp.Tuple[tp.Union[LeafPlan, "BagPlan"], ...]
    weights: tp.List[tp.List[float]]

    def leaves(self) -> tp.Iterator[LeafPlan]:
        """Every leaf model of the tree, depth first."""
        for member in self.members:
            yield from member.leaves()


Plan = tp.Union[LeafPlan, BagPlan]


def make_plan(model: nn.Module, options: ApplyOptions, length: int,
              weight_device: tp.Optional[torch.device] = None) -> Plan:
    """The plan for applying `model` (a model or a bag) to a track of `length` samples.

    Draws the shift offsets from Python's `random`, leaf after leaf (depth first) and shift after
    shift, each followed by the draws the forwards of its pass make (see
    `forward_random_draws`): `random` then goes through the states it goes through in
    upstream's recursion, where the forwards of a pass run before the next offset is drawn, so
    a seed gives upstream's offsets and leaves `random` where upstream leaves it. The executors
    run the forwards afterwards, inside `_random_state_of_plan`. Raises `ValueError` when a leaf
    cannot be split with these options. The cross-fade weights are made on `weight_device`,
    where the executor adds the segments up.
    """
    return _plan_node(model, options, length, weight_device, None, None)


def forward_random_draws(model: nn.Module) -> tp.Tuple[int, ...]:
    """The arguments of the `random.randrange` calls one forward of `model` makes, in order:
    the transformer's "sin" positional shift (drawn even when it can only be 0), or what an ONNX
    Runtime stand-in (`random_draws`) repeats of it."""
    transformer = getattr(model, "crosstransformer", None)
    if transformer is not None and transformer.emb == "sin":
        return (transformer.sin_random_shift + 1,)
    return (1,) * int(getattr(model, "random_draws", 0))


def _draw_as_forwards(model: nn.Module, forwards: int) -> None:
    """Advances `random` as `forwards` forwards of `model` would."""
    for _ in range(forwards):
        for upper in forward_random_draws(model):
            random.randrange(upper)


@contextlib.contextmanager
def _random_state_of_plan() -> tp.Iterator[None]:
    """Runs a plan's forwards, then puts `random` back where `make_plan` left it: the plan
    already made the draws of these forwards, in upstream's order."""
    state = random.getstate()
    try:
        yield
    finally:
        random.setstate(state)


def _plan_node(model: nn.Module, options: ApplyOptions, length: int, weight_device,
               bag_index: tp.Optional[int], bag_size: tp.Optional[int]) -> Plan:
    if isinstance(model, BagOfModels):
        members = tuple(_plan_node(member, options, length, weight_device,
                                   index if bag_index is None else bag_index, len(model.models))
                        for index, member in enumerate(model.models))
        return BagPlan(model, members, model.weights)
    segment_length = stride = weight = None
    if options.split:
        segment_length = _segment_length(model, options.segment)
        stride = _stride(segment_length, options.overlap)
        weight = _cross_fade(segment_length, options.transition_power, weight_device)
    max_shift = int(MAX_SHIFT_SECONDS * model.samplerate) if options.shifts else 0
    offsets = []
    for _ in range(options.shifts):
        offsets.append(random.randint(0, max_shift))
        _draw_as_forwards(model, _pass_forwards(length + max_shift - offsets[-1], stride))
    if not options.shifts:
        _draw_as_forwards(model, _pass_forwards(length, stride))
    return LeafPlan(model, segment_length, stride, weight, max_shift, tuple(offsets), length,
                    bag_index or 0, bag_size)


def _pass_forwards(pass_length: int, stride: tp.Optional[int]) -> int:
    """Forwards of a pass over `pass_length` samples: one per segment, one when not split."""
    return 1 if stride is None else -(-pass_length // stride)


def _segment_length(model: nn.Module, segment: tp.Optional[float]) -> int:
    if segment is None:
        segment = model.segment
    if segment is None or segment <= 0:
        raise ValueError(f"splitting needs a positive segment length, got {segment}")
    return int(model.samplerate * segment)


def _stride(segment_length: int, overlap: float) -> int:
    stride = int((1 - overlap) * segment_length)
    if stride <= 0:
        raise ValueError(f"overlap {overlap} leaves no stride between segments of "
                         f"{segment_length} samples; use a longer segment or a smaller overlap")
    return stride


def _cross_fade(segment_length: int, transition_power: float, device) -> torch.Tensor:
    """`segment_weight`, refused when it underflows to 0: the first samples of the track would
    then have no weight at all and come out as NaN."""
    weight = segment_weight(segment_length, transition_power, device)
    if not weight.min() > 0:
        raise ValueError(f"transition_power {transition_power} makes the cross-fade weight of "
                         f"a {segment_length}-sample segment round to 0 at its ends; use a "
                         f"smaller transition_power")
    return weight


# ----------------------------------------------------------------------------------------------
# What both executors share: evaluations with their reports, shift average, bag weighting.


@functools.lru_cache(maxsize=None)
def _tune_allocator_once() -> bool:
    return allocator.tune_malloc()


def _prepare_device(device: torch.device) -> None:
    """Separating on CPU is what the allocator tuning is for (see demucs.allocator); it is done
    at the first separation, not when the package is imported."""
    if device.type == "cpu":
        _tune_allocator_once()


def _callback_info(base: dict, pass_: ShiftedPass, segment_offset: int, state: str) -> dict:
    """The dict a callback receives: `base` with where the evaluation is in the plan."""
    info = dict(base)
    info["model_idx_in_bag"] = pass_.leaf.bag_index
    info["shift_idx"] = pass_.shift_idx
    info["segment_offset"] = segment_offset
    if pass_.leaf.bag_size is None:
        info.setdefault("models", 1)
    else:
        info["models"] = pass_.leaf.bag_size
    info["state"] = state
    return info


class _Evaluator:
    """Runs a leaf model on one segment's input and reports it to the callback (thread safe)."""

    def __init__(self, device: torch.device, amp: tp.Optional[str],
                 callback: tp.Optional[Callback], callback_arg: dict, lock):
        self.device = device
        self.amp = amp
        warn_if_bf16_is_emulated(device, amp, "amp='bf16' (--amp bf16)")
        self.callback = callback
        self.callback_arg = callback_arg
        self.lock = lock

    def __call__(self, pass_: ShiftedPass, starts: tp.Sequence[int],
                 mixes: tp.Sequence[torch.Tensor]) -> tp.List[torch.Tensor]:
        """Outputs `[B, S, C, n]` for the segments of `pass_` at track positions `starts`
        (inputs `mixes`, of one length), on the evaluation device. Several segments are stacked
        on the batch dimension and run in one forward: the models treat batch items apart."""
        for start in starts:
            self._report(pass_, start - pass_.start, "start")
        mix = mixes[0] if len(mixes) == 1 else torch.cat(list(mixes))
        out = run_model(pass_.leaf.model, mix.to(self.device), self.amp)
        for start in starts:
            self._report(pass_, start - pass_.start, "end")
        return [center_trim(item, pass_.chunk_length(start))
                for start, item in zip(starts, out.split(len(mixes[0])))]

    def _report(self, pass_: ShiftedPass, segment_offset: int, state: str) -> None:
        if self.callback is not None:
            with self.lock:
                self.callback(_callback_info(self.callback_arg, pass_, segment_offset, state))


def _add_fused(region: torch.Tensor, weight: torch.Tensor, chunk: torch.Tensor) -> None:
    """`region += weight * chunk` in one fused, in-place step (the in-memory overlap-add); under
    `upstream_rounding()` (the solver's validation and tests) the product is rounded before the
    sum, as upstream does."""
    if exact():
        _add_product(region, weight, chunk)
    else:
        region.addcmul_(weight, chunk)


def _add_product(region: torch.Tensor, weight: torch.Tensor, chunk: torch.Tensor) -> None:
    """`region += weight * chunk`, the product rounded before the sum (the streaming
    overlap-add)."""
    region += weight * chunk


def _average_shifts(estimates: tp.Iterable[torch.Tensor], count: int) -> torch.Tensor:
    """Mean of the shifted passes' estimates, summed in order then divided."""
    total: tp.Union[float, torch.Tensor] = 0.
    for estimate in estimates:
        total += estimate
        del estimate  # released before the next pass is computed
    assert isinstance(total, torch.Tensor)
    total /= count
    return total


def _weigh_members(estimates: tp.Iterable[torch.Tensor],
                   weights: tp.List[tp.List[float]]) -> torch.Tensor:
    """Per-source weighted mean of the bag members' estimates `[B, S, C, T]` (in place)."""
    total: tp.Union[float, torch.Tensor] = 0.
    totals = [0.] * len(weights[0])
    for estimate, member_weights in zip(estimates, weights):
        for source, source_weight in enumerate(member_weights):
            estimate[:, source] *= source_weight
            totals[source] += source_weight
        total += estimate
        del estimate  # released before the next member is computed
    assert isinstance(total, torch.Tensor)
    for source, source_total in enumerate(totals):
        total[:, source] /= source_total
    return total


# ----------------------------------------------------------------------------------------------
# In memory: the whole track at once.


def apply_model(model: nn.Module, mix, shifts: int = 1, split: bool = True,
                overlap: float = 0.25, transition_power: float = 1., progress: bool = False,
                device=None, num_workers: int = 0, segment: tp.Optional[float] = None,
                pool=None, lock=None, callback: tp.Optional[Callback] = None,
                callback_arg: tp.Optional[dict] = None, amp: tp.Optional[str] = None,
                segment_batch: int = 1) -> torch.Tensor:
    """Separate `mix` `[B, C, T]` into `[B, S, C, T]` with `model` (a model or a BagOfModels).

    Args:
        mix: a tensor or a `TensorChunk` (whose surrounding audio then serves as context).
        shifts: number of random time shifts (up to 0.5 s) whose estimates are averaged;
            0 disables the shift trick.
        split: process the mix in overlapping segments of `segment` seconds (default: the model's)
            blended with triangular weights, instead of all at once.
        overlap: fraction of a segment shared with the next one, in [0, 1).
        transition_power: sharpness of the cross-fade between segments (>= 1).
        progress: show a tqdm bar over the segments.
        device: device on which to run the models (default: the mix's); bag members are moved
            there one at a time and back afterwards.
        num_workers: threads processing segments in parallel on CPU.
        pool: an executor to use instead of creating one.
        lock: lock held while reporting to `callback`.
        callback: called with a dict (model_idx_in_bag, shift_idx, segment_offset, state
            "start"/"end", audio_length, models) before and after each model evaluation.
        callback_arg: initial content of the callback dict.
        amp: run the models in mixed precision, "bf16" or "fp16" (opt-in: faster on GPUs and
            on CPUs with bf16 units, but the output differs slightly from float32's); None
            keeps float32.
        segment_batch: run up to this many consecutive segments of a track in one forward
            (opt-in: fewer, larger model calls keep a GPU busy; memory grows with it). The
            output equals the default's up to float rounding, and random shifts are drawn in
            the same order.

    Raises `ValueError` for invalid settings (see `ApplyOptions`) before any model runs.
    """
    options = ApplyOptions(shifts, split, overlap, transition_power, segment, amp, segment_batch)
    device = mix.device if device is None else torch.device(device)
    _prepare_device(device)
    chunk = tensor_chunk(mix)
    plan = make_plan(model, options, chunk.length, chunk.device)
    evaluator = _Evaluator(device, amp, callback, dict(callback_arg or {}),
                           Lock() if lock is None else lock)
    with _segment_pool(pool, num_workers, device) as segment_pool, _random_state_of_plan():
        executor = _InMemoryExecutor(chunk, options, evaluator, segment_pool, progress)
        return executor.run(plan)


def _segment_pool(pool, num_workers: int, device: torch.device) -> tp.ContextManager:
    """The given pool (left open), or a new one: threads on CPU when asked, else none."""
    if pool is not None:
        return contextlib.nullcontext(pool)
    return _owned_pool(num_workers if device.type == "cpu" else 0)


@contextlib.contextmanager
def _owned_pool(num_workers: int) -> tp.Iterator[tp.Any]:
    """A pool of `num_workers` threads (none when 0), shut down on exit. When the block raises
    (Ctrl-C included), queued segments are cancelled and the exception goes on at once instead
    of waiting for the segments in flight."""
    pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else DummyPoolExecutor()
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


class _InMemoryExecutor:
    """Runs a plan pass after pass: each pass's output is built over the whole (shifted) track
    on the mix's device, then shifts are averaged and bag members weighted."""

    def __init__(self, mix: TensorChunk, options: ApplyOptions, evaluate: _Evaluator,
                 pool, progress: bool):
        self.mix = mix
        self.segment = options.segment
        self.segment_batch = options.segment_batch
        self.evaluate = evaluate
        self.pool = pool
        self.progress = progress

    def run(self, node: Plan) -> torch.Tensor:
        """Estimates `[B, S, C, T]` of the model or bag planned in `node`."""
        if isinstance(node, BagPlan):
            return _weigh_members((self._run_member(member) for member in node.members),
                                  node.weights)
        node.model.to(self.evaluate.device)
        node.model.eval()
        if not node.shift_offsets:
            return self._run_pass(node.passes[0])
        # Each pass's view starts -pass_.start samples before the track: that part is dropped.
        return _average_shifts((self._run_pass(pass_)[..., -pass_.start:]
                                for pass_ in node.passes), len(node.passes))

    def _run_member(self, member: Plan) -> torch.Tensor:
        """A bag member, moved to the evaluation device for its turn only."""
        original_device = next(iter(member.module.parameters())).device
        member.module.to(self.evaluate.device)
        out = self.run(member)
        member.module.to(original_device)
        return out

    def _run_pass(self, pass_: ShiftedPass) -> torch.Tensor:
        if pass_.leaf.segment_length is None:  # not split: the whole view at once
            return self._evaluate_group(pass_, (pass_.start,))[0]
        return self._overlap_add(pass_)

    def _evaluate_group(self, pass_: ShiftedPass, starts: tp.Sequence[int]
                        ) -> tp.List[torch.Tensor]:
        mixes = [pass_.read_input(self.mix.tensor, self.mix.offset, start, self.segment)
                 for start in starts]
        return self.evaluate(pass_, starts, mixes)

    def _overlap_add(self, pass_: ShiftedPass) -> torch.Tensor:
        """The pass's segments, evaluated in the pool, blended with the cross-fade weight."""
        leaf = pass_.leaf
        assert leaf.weight is not None
        batch, channels = self.mix.shape[:2]
        out = torch.zeros(batch, len(leaf.model.sources), channels, pass_.length,
                          device=self.mix.device)
        sum_weight = torch.zeros(pass_.length, device=self.mix.device)
        futures = [(starts, self.pool.submit(self._evaluate_group, pass_, starts))
                   for starts in pass_.segment_groups(self.segment_batch, self.segment)]
        bar = self._progress_bar(len(pass_.segment_starts()), leaf)
        try:
            for starts, future in futures:
                for start, chunk_out in zip(starts, future.result()):
                    at, chunk_length = start - pass_.start, chunk_out.shape[-1]
                    weight = leaf.weight[:chunk_length]
                    _add_fused(out[..., at:at + chunk_length], weight,
                               chunk_out.to(self.mix.device))
                    sum_weight[at:at + chunk_length] += weight
                bar.update(len(starts))
        except BaseException:  # a failed segment or Ctrl-C: the others are not needed any more
            for _, future in futures:
                future.cancel()
            raise
        finally:
            bar.close()
        out /= sum_weight
        return out

    def _progress_bar(self, segments: int, leaf: LeafPlan) -> tqdm.tqdm:
        """A bar over the segments of a pass, counted in seconds of stride (hidden unless
        `progress`)."""
        assert leaf.stride is not None
        scale = float(format(leaf.stride / leaf.model.samplerate, ".2f"))
        return tqdm.tqdm(total=segments, unit_scale=scale, ncols=120, unit="seconds",
                         disable=not self.progress)


# ----------------------------------------------------------------------------------------------
# Streaming: the same computation, yielding the output block by block.


_STREAM_LOCK = Lock()


class _SlidingWindow:
    """The overlap-add of one pass over a window of track positions that slides forward.

    Segments are added in time order, so the samples before the next segment's start receive
    no further contribution: `pop` normalises and releases them.
    """

    def __init__(self, pass_: ShiftedPass):
        assert pass_.leaf.weight is not None
        self.weight = pass_.leaf.weight
        self.window_start = pass_.start  # track position of the window's first sample
        self.out: tp.Optional[torch.Tensor] = None
        self.sum_weight = torch.zeros(0)

    def add(self, chunk_out: torch.Tensor, start: int) -> None:
        """Adds the segment output that starts at track position `start`."""
        weight = self.weight[:chunk_out.shape[-1]]
        at = start - self.window_start
        end = at + chunk_out.shape[-1]
        if self.out is None:
            self.out = torch.zeros(*chunk_out.shape[:-1], 0)
        if end > self.out.shape[-1]:
            grow = end - self.out.shape[-1]
            self.out = F.pad(self.out, (0, grow))
            self.sum_weight = F.pad(self.sum_weight, (0, grow))
        _add_product(self.out[..., at:end], weight, chunk_out)
        self.sum_weight[at:end] += weight

    def pop(self, until: int) -> torch.Tensor:
        """Normalised output for track positions [window_start, until), released from memory."""
        count = until - self.window_start
        assert self.out is not None and count <= self.out.shape[-1]
        block = self.out[..., :count] / self.sum_weight[:count]
        self.out = self.out[..., count:].clone()
        self.sum_weight = self.sum_weight[count:].clone()
        self.window_start = until
        return block

    def pop_track_range(self, end: int) -> torch.Tensor:
        """Output for the track positions from where the window stands (at least 0) to `end`."""
        if self.window_start < 0:
            self.pop(0)  # the part of a shifted view before the track start is dropped
        return self.pop(end)


class _StreamingExecutor:
    """Runs every segment of every pass of a plan in track order, keeping at most `num_workers`
    evaluations in flight, and yields the estimates block by block."""

    def __init__(self, plan: Plan, source, options: ApplyOptions, evaluate: _Evaluator,
                 num_workers: int, block_length: int):
        self.plan = plan
        self.source = source
        self.segment = options.segment
        self.segment_batch = options.segment_batch
        self.evaluate = evaluate
        self.num_workers = num_workers
        self.block_length = block_length
        self.passes = [pass_ for leaf in plan.leaves() for pass_ in leaf.passes]
        self.windows = {pass_: _SlidingWindow(pass_) for pass_ in self.passes}
        self.pending: tp.Deque[tp.Tuple[tp.Tuple[int, ...], ShiftedPass, tp.Any]] = deque()

    def _schedule(self, length: int) -> tp.Iterator[tp.Tuple[int, int, tp.Tuple[int, ...]]]:
        """`(first start, pass index, starts)` of every group of segments (see
        `ShiftedPass.segment_groups`) by first start, then `(length, -1, ())` for the end.
        Adding groups in this order means that all samples before the next start are final."""
        groups = heapq.merge(*[self._pass_groups(index) for index in range(len(self.passes))])
        return itertools.chain(groups, [(length, -1, ())])

    def _pass_groups(self, index: int) -> tp.List[tp.Tuple[int, int, tp.Tuple[int, ...]]]:
        """`(first start, index, starts)` of each group of segments of pass `index`."""
        groups = self.passes[index].segment_groups(self.segment_batch, self.segment)
        return [(starts[0], index, starts) for starts in groups]

    def blocks(self, pool) -> tp.Iterator[tp.Tuple[int, torch.Tensor]]:
        """`(start, estimates [B, S, C, n])` for consecutive ranges of the whole track."""
        length = self.source.shape[-1]
        emitted = 0
        for start, index, starts in self._schedule(length):
            if index >= 0:
                pass_ = self.passes[index]
                mixes = [pass_.read_input(self.source, 0, at, self.segment) for at in starts]
                self.pending.append((starts, pass_,
                                     pool.submit(self.evaluate, pass_, starts, mixes)))
            # at the end mark, every pending group is added
            self._add_finished(self.num_workers if index >= 0 else 0)
            # samples before the next segment still to add are final
            frontier = max(emitted, min(length, self.pending[0][0][0] if self.pending else start))
            if frontier - emitted >= self.block_length or (frontier == length > emitted):
                yield emitted, self._combine(self.plan, frontier)
                emitted = frontier

    def _add_finished(self, keep: int) -> None:
        """Waits for the oldest evaluations until at most `keep` are in flight, and adds them."""
        while len(self.pending) > keep:
            starts, pass_, future = self.pending.popleft()
            for start, chunk_out in zip(starts, future.result()):
                self.windows[pass_].add(chunk_out.cpu(), start)

    def _combine(self, node: Plan, end: int) -> torch.Tensor:
        """Estimates of `node` up to track position `end`, from where the last block ended."""
        if isinstance(node, BagPlan):
            return _weigh_members((self._combine(member, end) for member in node.members),
                                  node.weights)
        blocks = (self.windows[pass_].pop_track_range(end) for pass_ in node.passes)
        if not node.shift_offsets:
            return next(blocks)
        return _average_shifts(blocks, len(node.passes))


def apply_model_streaming(model: nn.Module, source, shifts: int = 1, overlap: float = 0.25,
                          transition_power: float = 1., device=None,
                          segment: tp.Optional[float] = None, progress: bool = False,
                          num_workers: int = 0, block_seconds: float = 30.,
                          callback: tp.Optional[Callback] = None,
                          callback_arg: tp.Optional[dict] = None, amp: tp.Optional[str] = None,
                          segment_batch: int = 1) -> tp.Iterator[tp.Tuple[int, torch.Tensor]]:
    """Yield `(start, estimates [1, S, C, n])` blocks of `apply_model(model, mix, split=True, ...)`.

    `source` gives the mixture `[1, C, T]` lazily: it needs `shape` and slicing on the last
    dimension (e.g. `source[..., a:b]`), and is only read from the calling thread. Memory use
    depends on the segment length, the number of models, shifts, workers and `segment_batch`
    (segments run in one forward, as in `apply_model`), not on the duration. Random shifts are
    drawn from `random` in the same order as `apply_model`, so both give the same result for the
    same seed (within the rounding of their overlap-adds). `callback` receives the same dicts as
    with `apply_model` (in processing order, interleaved between models); `models` is the size
    of the bag, 1 for a lone model.
    """
    options = ApplyOptions(shifts, True, overlap, transition_power, segment, amp, segment_batch)
    device = torch.device("cpu") if device is None else torch.device(device)
    _prepare_device(device)
    plan = make_plan(model, options, source.shape[-1], torch.device("cpu"))
    for leaf in plan.leaves():
        leaf.model.to(device)
        leaf.model.eval()
    evaluator = _Evaluator(device, amp, callback, dict(callback_arg or {}, models=1), _STREAM_LOCK)
    executor = _StreamingExecutor(plan, source, options, evaluator, num_workers,
                                  max(1, int(block_seconds * model.samplerate)))
    bar = tqdm.tqdm(total=source.shape[-1], unit_scale=1 / model.samplerate, ncols=120,
                    unit="seconds", disable=not progress)
    with _owned_pool(num_workers) as pool, _random_state_of_plan():
        for start, block in executor.blocks(pool):
            yield start, block
            bar.update(block.shape[-1])
    bar.close()
