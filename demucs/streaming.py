"""`apply_model_streaming`: the computation of `apply_model`, yielding the output block by block.

The streaming executor runs the segments of every pass of the plan in track order over windows
that slide along the track, and yields each block as soon as no later segment touches it, so
memory does not grow with the duration of the track.
"""
from collections import deque
import heapq
import itertools
from threading import Lock
import typing as tp

import torch
from torch import nn
from torch.nn import functional as F
import tqdm

from .plan import ApplyOptions, BagPlan, Plan, ShiftedPass, make_plan, random_state_of_plan, \
    stem_indices
from .runner import Callback, Evaluator, add_product, average_shifts, owned_pool, \
    prepare_device, weigh_members


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
        add_product(self.out[..., at:end], weight, chunk_out)
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

    def __init__(self, plan: Plan, source, options: ApplyOptions, evaluate: Evaluator,
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
            return weigh_members((self._combine(member, end) for member in node.members),
                                 node.weights)
        blocks = (self.windows[pass_].pop_track_range(end) for pass_ in node.passes)
        if not node.shift_offsets:
            return next(blocks)
        return average_shifts(blocks, len(node.passes))


def apply_model_streaming(model: nn.Module, source, shifts: int = 1, overlap: float = 0.25,
                          transition_power: float = 1., device=None,
                          segment: tp.Optional[float] = None, progress: bool = False,
                          num_workers: int = 0, block_seconds: float = 30.,
                          callback: tp.Optional[Callback] = None,
                          callback_arg: tp.Optional[dict] = None, amp: tp.Optional[str] = None,
                          segment_batch: int = 1, stems: tp.Optional[tp.Sequence[str]] = None
                          ) -> tp.Iterator[tp.Tuple[int, torch.Tensor]]:
    """Yield `(start, estimates [1, S, C, n])` blocks of `apply_model(model, mix, split=True, ...)`.

    `source` gives the mixture `[1, C, T]` lazily: it needs `shape` and slicing on the last
    dimension (e.g. `source[..., a:b]`), and is only read from the calling thread. Memory use
    depends on the segment length, the number of models, shifts, workers and `segment_batch`
    (segments run in one forward, as in `apply_model`), not on the duration. Random shifts are
    drawn from `random` in the same order as `apply_model`, so both give the same result for the
    same seed (within the rounding of their overlap-adds). `callback` receives the same dicts as
    with `apply_model` (in processing order, interleaved between models); `models` is the size
    of the bag, 1 for a lone model. With `stems`, the blocks hold those stems only (see
    `apply_model`).
    """
    options = ApplyOptions(shifts, True, overlap, transition_power, segment, amp, segment_batch,
                           stems)
    return stream_with_options(model, source, options, device=device, progress=progress,
                               num_workers=num_workers, block_seconds=block_seconds,
                               callback=callback, callback_arg=callback_arg)


def stream_with_options(model: nn.Module, source, options: ApplyOptions, device=None,
                        progress: bool = False, num_workers: int = 0, block_seconds: float = 30.,
                        callback: tp.Optional[Callback] = None,
                        callback_arg: tp.Optional[dict] = None
                        ) -> tp.Iterator[tp.Tuple[int, torch.Tensor]]:
    """`apply_model_streaming` with its separation settings already validated in `options`
    (which must split the track); the other arguments are `apply_model_streaming`'s."""
    if not options.split:
        raise ValueError("separating in blocks needs split=True")
    device = torch.device("cpu") if device is None else torch.device(device)
    prepare_device(device)
    plan = make_plan(model, options, source.shape[-1], torch.device("cpu"))
    for leaf in plan.leaves():
        leaf.model.to(device)
        leaf.model.eval()
    evaluator = Evaluator(device, options.amp, callback, dict(callback_arg or {}, models=1),
                          _STREAM_LOCK)
    executor = _StreamingExecutor(plan, source, options, evaluator, num_workers,
                                  max(1, int(block_seconds * model.samplerate)))
    bar = tqdm.tqdm(total=source.shape[-1], unit_scale=1 / model.samplerate, ncols=120,
                    unit="seconds", disable=not progress)
    indices = stem_indices(model.sources, options.stems)
    with owned_pool(num_workers) as pool, random_state_of_plan():
        for start, block in executor.blocks(pool):
            yield start, block if indices is None else block[:, indices]
            bar.update(block.shape[-1])
    bar.close()
