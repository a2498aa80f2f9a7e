"""What both executors of a plan share: running a leaf model on segments (with the callback's
reports), the overlap-add arithmetic, the shift average, the bag weighting and the thread pool.
"""
from concurrent.futures import ThreadPoolExecutor
import contextlib
import functools
import typing as tp

import torch
from torch import nn
from torch.nn import functional as F

from . import allocator
from .plan import ShiftedPass
from .precision import warn_if_bf16_is_emulated
from .rounding import exact
from .utils import autocast, center_trim, DummyPoolExecutor

Callback = tp.Callable[[dict], None]


# Inputs shorter than this are zero-padded before the model and its output cropped back: the
# strided encoders of small models (e.g. a 4-channel HDemucs) would otherwise normalise a single
# time step. Model inputs of real tracks are whole segments or longer and are never padded.
MIN_MODEL_INPUT = 1024


def run_model(model: nn.Module, mix: torch.Tensor, amp: tp.Optional[str] = None,
              upstream_order: bool = False) -> torch.Tensor:
    """`model(mix)` without gradients, in the precision `amp` selects (see `apply_model`);
    the output is always float32. With `upstream_order` the input is made contiguous: a window
    read from a channel-last track (e.g. `torch.from_numpy(audio).t()`) keeps that layout, with
    which the models round differently in the last bit than upstream, whose windows are fresh
    copies (separation keeps the layout, and its recorded outputs)."""
    if upstream_order:
        mix = mix.contiguous()
    length = mix.shape[-1]
    if length < MIN_MODEL_INPUT:
        mix = F.pad(mix, (0, MIN_MODEL_INPUT - length))
    with torch.no_grad(), autocast(mix.device, amp):
        out = model(mix)
    return out[..., :length].float()


@functools.lru_cache(maxsize=None)
def _tune_allocator_once() -> bool:
    return allocator.tune_malloc()


def prepare_device(device: torch.device) -> None:
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


class Evaluator:
    """Runs a leaf model on one segment's input and reports it to the callback (thread safe).

    `upstream_order` is the rounding mode of this separation, read once when it starts: True
    inside `rounding.upstream_rounding()` (the solver's validation and tests), where the inputs
    and the overlap-add round as upstream's `apply_model` does. The models read the same switch
    themselves (see `demucs.rounding` for why it is process-wide).
    """

    def __init__(self, device: torch.device, amp: tp.Optional[str],
                 callback: tp.Optional[Callback], callback_arg: dict, lock):
        self.device = device
        self.amp = amp
        self.upstream_order = exact()
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
        out = run_model(pass_.leaf.model, mix.to(self.device), self.amp, self.upstream_order)
        for start in starts:
            self._report(pass_, start - pass_.start, "end")
        return [center_trim(item, pass_.chunk_length(start))
                for start, item in zip(starts, out.split(len(mixes[0])))]

    def _report(self, pass_: ShiftedPass, segment_offset: int, state: str) -> None:
        if self.callback is not None:
            with self.lock:
                self.callback(_callback_info(self.callback_arg, pass_, segment_offset, state))


def add_fused(region: torch.Tensor, weight: torch.Tensor, chunk: torch.Tensor) -> None:
    """`region += weight * chunk` in one fused, in-place step (the in-memory overlap-add, but
    for `Evaluator.upstream_order`, which takes `add_product` as upstream does)."""
    region.addcmul_(weight, chunk)


def add_product(region: torch.Tensor, weight: torch.Tensor, chunk: torch.Tensor) -> None:
    """`region += weight * chunk`, the product rounded before the sum (the streaming
    overlap-add)."""
    region += weight * chunk


def average_shifts(estimates: tp.Iterable[torch.Tensor], count: int) -> torch.Tensor:
    """Mean of the shifted passes' estimates, summed in order then divided."""
    total: tp.Union[float, torch.Tensor] = 0.
    for estimate in estimates:
        total += estimate
        del estimate  # released before the next pass is computed
    assert isinstance(total, torch.Tensor)
    total /= count
    return total


def weigh_members(estimates: tp.Iterable[torch.Tensor],
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


@contextlib.contextmanager
def owned_pool(num_workers: int) -> tp.Iterator[tp.Any]:
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
