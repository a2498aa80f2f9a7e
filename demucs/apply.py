"""Running a separation model (or a bag of models) on a mixture of any length.

The computation is upstream's: random time shifts whose estimates are averaged (shift trick),
overlapping segments blended with triangular weights, neighbouring audio used as context padding,
and bags of models weighted per source. Each rule lives in one place:

1. `demucs.plan`: `ApplyOptions`, the user's settings validated once, and `make_plan`, which turns
   the model (or bag) into a tree of leaf plans for a track of a given length, drawing the random
   shifts in upstream's order.
2. `demucs.runner`: what both executors share: the model evaluations with their callback reports
   (`Evaluator`, one group of consecutive segments per forward when `segment_batch` asks for it),
   the overlap-add arithmetic, the shift average and the bag weighting.
3. Two executors of a plan:
   - `apply_model` (here, `_InMemoryExecutor`) runs pass after pass over whole-pass tensors kept
     on the mix's device;
   - `apply_model_streaming` (`demucs.streaming`) runs the segments of every pass in track order
     over windows that slide along the track, and yields each block as soon as no later segment
     touches it, so memory does not grow with the duration.

The executors differ in their overlap-add arithmetic only: the in-memory one adds
`weight * segment` with a fused in-place `addcmul_` (`runner.add_fused`), the streaming one
computes the product and adds it (`runner.add_product`). The two round differently in the last
bit, so each keeps its own formula and both stay bit-identical to what they gave before; with the
same formula they agree bitwise, which tests/test_apply.py checks. Under
`rounding.upstream_rounding()` (read once per separation into `Evaluator.upstream_order`) both
round the product first, as upstream's `apply_model` does.

This module keeps every name Demucs 4.1's `demucs.apply` has.
"""
import contextlib
from threading import Lock
import typing as tp

import torch
from torch import nn
import tqdm

from .bag import BagOfModels, Model  # noqa: F401  (importable from here, as in Demucs 4.1)
from .plan import (ApplyOptions, BagPlan, LeafPlan, Plan, ShiftedPass, TensorChunk,  # noqa: F401
                   forward_random_draws, make_plan, random_state_of_plan, read_padded,
                   segment_weight, stem_indices, tensor_chunk)
from .runner import (Callback, Evaluator, add_fused, add_product, average_shifts,  # noqa: F401
                     owned_pool, prepare_device, run_model, weigh_members)
from .streaming import apply_model_streaming  # noqa: F401
# Names Demucs 4.1's apply module makes importable from it.
from .demucs import Demucs  # noqa: F401
from .hdemucs import HDemucs  # noqa: F401
from .htdemucs import HTDemucs  # noqa: F401
from .utils import center_trim, DummyPoolExecutor  # noqa: F401


def apply_model(model: nn.Module, mix, shifts: int = 1, split: bool = True,
                overlap: float = 0.25, transition_power: float = 1., progress: bool = False,
                device=None, num_workers: int = 0, segment: tp.Optional[float] = None,
                pool=None, lock=None, callback: tp.Optional[Callback] = None,
                callback_arg: tp.Optional[dict] = None, amp: tp.Optional[str] = None,
                segment_batch: int = 1,
                stems: tp.Optional[tp.Sequence[str]] = None) -> torch.Tensor:
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
        stems: only these sources (names, e.g. `["vocals"]`) are returned, in this order, as
            `[B, len(stems), C, T]`; the members of a bag whose weights are zero for all of them
            are not run. The stems come out bit for bit as in a full run. None: every source.

    Raises `ValueError` for invalid settings (see `ApplyOptions`) before any model runs.
    """
    options = ApplyOptions(shifts, split, overlap, transition_power, segment, amp, segment_batch,
                           stems)
    return apply_with_options(model, mix, options, progress=progress, device=device,
                              num_workers=num_workers, pool=pool, lock=lock, callback=callback,
                              callback_arg=callback_arg)


def apply_with_options(model: nn.Module, mix, options: ApplyOptions, progress: bool = False,
                       device=None, num_workers: int = 0, pool=None, lock=None,
                       callback: tp.Optional[Callback] = None,
                       callback_arg: tp.Optional[dict] = None) -> torch.Tensor:
    """`apply_model` with its separation settings already validated in `options` (what a
    `demucs.api.Separator` holds); the other arguments are `apply_model`'s."""
    device = mix.device if device is None else torch.device(device)
    prepare_device(device)
    chunk = tensor_chunk(mix)
    plan = make_plan(model, options, chunk.length, chunk.device)
    evaluator = Evaluator(device, options.amp, callback, dict(callback_arg or {}),
                          Lock() if lock is None else lock)
    with _segment_pool(pool, num_workers, device) as segment_pool, random_state_of_plan():
        executor = _InMemoryExecutor(chunk, options, evaluator, segment_pool, progress)
        out = executor.run(plan)
    indices = stem_indices(model.sources, options.stems)
    return out if indices is None else out[:, indices]


def _segment_pool(pool, num_workers: int, device: torch.device) -> tp.ContextManager:
    """The given pool (left open), or a new one: threads on CPU when asked, else none."""
    if pool is not None:
        return contextlib.nullcontext(pool)
    return owned_pool(num_workers if device.type == "cpu" else 0)


class _InMemoryExecutor:
    """Runs a plan pass after pass: each pass's output is built over the whole (shifted) track
    on the mix's device, then shifts are averaged and bag members weighted."""

    def __init__(self, mix: TensorChunk, options: ApplyOptions, evaluate: Evaluator,
                 pool, progress: bool):
        self.mix = mix
        self.segment = options.segment
        self.segment_batch = options.segment_batch
        self.evaluate = evaluate
        self.add = add_product if evaluate.upstream_order else add_fused
        self.pool = pool
        self.progress = progress

    def run(self, node: Plan) -> torch.Tensor:
        """Estimates `[B, S, C, T]` of the model or bag planned in `node`."""
        if isinstance(node, BagPlan):
            return weigh_members((self._run_member(member) for member in node.members),
                                 node.weights)
        node.model.to(self.evaluate.device)
        node.model.eval()
        if not node.shift_offsets:
            return self._run_pass(node.passes[0])
        # Each pass's view starts -pass_.start samples before the track: that part is dropped.
        return average_shifts((self._run_pass(pass_)[..., -pass_.start:]
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
                    self.add(out[..., at:at + chunk_length], weight, chunk_out.to(self.mix.device))
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
