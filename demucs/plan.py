"""What `apply_model` computes, decided once for both executors: the options and the plan.

`ApplyOptions` holds the user's settings, validated when created. `make_plan` turns a model (or a
bag, nested or not) into a tree of `BagPlan` and `LeafPlan` nodes for a track of a given length.
A leaf holds its segment length, stride, cross-fade weight, maximum shift and the shift offsets
drawn from `random` (bag members in order, each one's shifts in order, each followed by the draws
its pass's forwards make: the order of upstream's recursion, so a seed gives upstream's output and
leaves `random` where upstream does), and one `ShiftedPass` per shift: the model evaluated over
the track delayed by that shift, cut into segments. `TensorChunk` and `read_padded` are the views
of the track the segments are read from.
"""
import contextlib
from dataclasses import dataclass
import functools
import numbers
import random
import typing as tp

import torch
from torch import nn
from torch.nn import functional as F

from .bag import BagOfModels, has_fixed_segment
from .utils import check_amp

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
    stems: tp.Optional[tp.Tuple[str, ...]] = None

    def __post_init__(self) -> None:
        self._check_types()
        check_amp(self.amp)
        self._check_stems()
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

    def _check_types(self) -> None:
        """`TypeError` naming the setting for a value of the wrong kind (e.g. `shifts=1.5`, or a
        number given as a string), before the values are checked."""
        expected = {"shifts": ("a whole number", is_whole(self.shifts)),
                    "overlap": ("a number", is_real(self.overlap)),
                    "transition_power": ("a number", is_real(self.transition_power)),
                    "segment": ("a number of seconds or None",
                                self.segment is None or is_real(self.segment))}
        for name, (kind, valid) in expected.items():
            if not valid:
                raise TypeError(f"{name} must be {kind}, got {getattr(self, name)!r}")

    def _check_stems(self) -> None:
        """`stems` as a tuple of distinct names (a list is accepted), or None for every stem."""
        if self.stems is None:
            return
        if isinstance(self.stems, str) or not all(isinstance(stem, str) for stem in self.stems):
            raise TypeError(f"stems must be a list of stem names (e.g. ['vocals']) or None, "
                            f"got {self.stems!r}")
        stems = tuple(self.stems)
        if not stems:
            raise ValueError("stems is empty: name at least one stem, or give None for all")
        repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
        if repeated:
            raise ValueError(f"stems names {', '.join(repeated)} more than once")
        object.__setattr__(self, "stems", stems)


def stem_indices(sources: tp.Sequence[str], stems: tp.Optional[tp.Sequence[str]]
                 ) -> tp.Optional[tp.List[int]]:
    """Indices in `sources` of the `stems` asked for, in their order (None: every stem);
    `ValueError` naming an unknown stem and the model's."""
    if stems is None:
        return None
    unknown = [stem for stem in stems if stem not in sources]
    if unknown:
        raise ValueError(f"stem {unknown[0]!r} is not a source of this model; its sources are "
                         f"{', '.join(sources)}")
    return [list(sources).index(stem) for stem in stems]


def is_real(value: tp.Any) -> bool:
    """A real number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_whole(value: tp.Any) -> bool:
    """A whole number, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


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
    run the forwards afterwards, inside `random_state_of_plan`. Raises `ValueError` when a leaf
    cannot be split with these options. The cross-fade weights are made on `weight_device`,
    where the executor adds the segments up.

    With `options.stems`, bag members whose weights are zero for every stem asked for are left
    out of the plan (their random draws are still made, so the other members get the shifts a
    full run gives them): the stems asked for come out bit for bit as in a full run.
    """
    needed = stem_indices(model.sources, options.stems)
    plan = _plan_node(model, options, length, weight_device, None, None,
                      None if needed is None else frozenset(needed))
    if plan is None:
        raise ValueError(f"no model of the bag has a non-zero weight for "
                         f"{', '.join(options.stems or ())}: there is nothing to compute")
    return plan


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
def random_state_of_plan() -> tp.Iterator[None]:
    """Runs a plan's forwards, then puts `random` back where `make_plan` left it: the plan
    already made the draws of these forwards, in upstream's order."""
    state = random.getstate()
    try:
        yield
    finally:
        random.setstate(state)


def _plan_node(model: nn.Module, options: ApplyOptions, length: int, weight_device,
               bag_index: tp.Optional[int], bag_size: tp.Optional[int],
               needed: tp.Optional[tp.FrozenSet[int]]) -> tp.Optional[Plan]:
    """The plan of `model`, or None for a bag none of whose members adds to a `needed` source
    (None: every source is needed)."""
    if isinstance(model, BagOfModels):
        members = [(_plan_node(member, options, length, weight_device,
                               index if bag_index is None else bag_index, len(model.models),
                               needed), weights)
                   for index, (member, weights) in enumerate(zip(model.models, model.weights))]
        kept = [(plan, weights) for plan, weights in members
                if plan is not None and _adds_to(weights, needed)]
        if not kept:
            return None
        return BagPlan(model, tuple(plan for plan, _ in kept), [weights for _, weights in kept])
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


def _adds_to(weights: tp.Sequence[float], needed: tp.Optional[tp.FrozenSet[int]]) -> bool:
    """Whether a bag member with these per-source weights adds to a needed source."""
    return needed is None or any(weights[index] != 0 for index in needed)


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
