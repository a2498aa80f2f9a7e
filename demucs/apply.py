"""Running a separation model (or a bag of models) on a mixture of any length.

`apply_model` keeps the upstream semantics and numerics: random time shifts averaged together (shift
trick), overlapping segments blended with triangular weights, neighbouring audio used as context
padding, and bags of models weighted per source. `apply_model_streaming` computes exactly the same
output block by block, reading the mixture from any sliceable source, so that memory stays bounded
for tracks of any duration.
"""
from collections import deque
from concurrent.futures import ThreadPoolExecutor
import heapq
import itertools
import logging
import random
from threading import Lock
import typing as tp

import torch
from torch import nn
from torch.nn import functional as F
import tqdm

from .utils import autocast, center_trim, check_amp, DummyPoolExecutor

logger = logging.getLogger(__name__)

Model = nn.Module
Callback = tp.Callable[[dict], None]


def _is_htdemucs(model: nn.Module) -> bool:
    """True for the transformer model, whose input length is fixed by its training segment."""
    try:
        from .htdemucs import HTDemucs
    except ImportError:  # the transformer model is optional for the other architectures
        return False
    return isinstance(model, HTDemucs)


class BagOfModels(nn.Module):
    """Several separation models whose estimates are averaged, with one weight per model and source.

    Args:
        models: the member models; they must share `sources`, `samplerate` and `audio_channels`.
        weights: one list of per-source weights for each model (default: all ones). A zero weight
            removes a model's estimate of that source.
        segment: segment length in seconds given to the non-transformer members whose own segment
            is longer (transformer members keep the length they were trained on).
    """

    def __init__(self, models: tp.List[nn.Module],
                 weights: tp.Optional[tp.List[tp.List[float]]] = None,
                 segment: tp.Optional[float] = None):
        super().__init__()
        if not models:
            raise ValueError("BagOfModels needs at least one model")
        first = models[0]
        for index, other in enumerate(models[1:], 1):
            for attribute in ["sources", "samplerate", "audio_channels"]:
                if getattr(other, attribute) != getattr(first, attribute):
                    raise ValueError(
                        f"model {index} of the bag has {attribute}={getattr(other, attribute)!r} "
                        f"but model 0 has {getattr(first, attribute)!r}; all must agree")
            if segment is not None and not _is_htdemucs(other) and segment <= other.segment:
                other.segment = segment
        if segment is not None and not _is_htdemucs(first) and segment <= first.segment:
            first.segment = segment
        self.audio_channels = first.audio_channels
        self.samplerate = first.samplerate
        self.sources = first.sources
        self.models = nn.ModuleList(models)
        if weights is None:
            weights = [[1. for _ in first.sources] for _ in models]
        self._check_weights(weights)
        self.weights = weights

    def _check_weights(self, weights: tp.List[tp.List[float]]) -> None:
        if len(weights) != len(self.models):
            raise ValueError(f"the bag has {len(self.models)} models but {len(weights)} "
                             "weight lists")
        for index, model_weights in enumerate(weights):
            if len(model_weights) != len(self.sources):
                raise ValueError(f"weights of model {index} have {len(model_weights)} entries, "
                                 f"expected one per source {self.sources}")

    @property
    def max_allowed_segment(self) -> float:
        """Longest segment (seconds) usable with every member: the shortest transformer segment."""
        limit = float("inf")
        for model in self.models:
            if _is_htdemucs(model):
                limit = min(limit, float(model.segment))
        return limit

    def forward(self, x):
        raise NotImplementedError("a BagOfModels is applied with demucs.apply.apply_model")


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

    @classmethod
    def window(cls, tensor, offset: int, length: int) -> "TensorChunk":
        """A window of `length` samples at `offset` that may start before or end after the
        tensor (or chunk): `padded` reads zeros there. Used to shift a track without copying it.
        """
        base = tensor_chunk(tensor)
        chunk = cls.__new__(cls)
        chunk.tensor = base.tensor
        chunk.offset = base.offset + offset
        chunk.length = length
        chunk.device = base.device
        return chunk

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


def _replace_dict(_dict: tp.Optional[dict], *pairs: tp.Tuple[tp.Any, tp.Any]) -> dict:
    """A copy of `_dict` (or a new dict) with the given key/value pairs set."""
    result = dict(_dict) if _dict is not None else {}
    for key, value in pairs:
        result[key] = value
    return result


def _child_callback(callback: tp.Optional[Callback], key: str, value) -> tp.Optional[Callback]:
    """A callback that reports `key=value` on top of what the nested call reports."""
    if callback is None:
        return None
    return lambda info: callback(_replace_dict(info, (key, value)))


def leaf_input_length(model: nn.Module, length: int, segment: tp.Optional[float]) -> int:
    """Number of samples fed to a single model for a chunk of `length` samples."""
    if _is_htdemucs(model) and segment is not None:
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


def apply_model(model: nn.Module, mix, shifts: int = 1, split: bool = True,
                overlap: float = 0.25, transition_power: float = 1., progress: bool = False,
                device=None, num_workers: int = 0, segment: tp.Optional[float] = None,
                pool=None, lock=None, callback: tp.Optional[Callback] = None,
                callback_arg: tp.Optional[dict] = None, amp: tp.Optional[str] = None
                ) -> torch.Tensor:
    """Separate `mix` `[B, C, T]` into `[B, S, C, T]` with `model` (a model or a BagOfModels).

    Args:
        shifts: number of random time shifts (up to 0.5 s) whose estimates are averaged;
            0 disables the shift trick.
        split: process the mix in overlapping segments of `segment` seconds (default: the model's)
            blended with triangular weights, instead of all at once.
        overlap: fraction of a segment shared with the next one.
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
    """
    check_amp(amp)
    device = mix.device if device is None else torch.device(device)
    if pool is None:
        pool = ThreadPoolExecutor(num_workers) if num_workers > 0 and device.type == "cpu" \
            else DummyPoolExecutor()
    if lock is None:
        lock = Lock()
    callback_arg = _replace_dict(callback_arg, ("model_idx_in_bag", 0), ("shift_idx", 0),
                                 ("segment_offset", 0))
    kwargs: tp.Dict[str, tp.Any] = {
        "shifts": shifts, "split": split, "overlap": overlap,
        "transition_power": transition_power, "progress": progress, "device": device,
        "pool": pool, "segment": segment, "lock": lock, "amp": amp,
    }
    if isinstance(model, BagOfModels):
        return _apply_bag(model, mix, callback, callback_arg, kwargs)
    callback_arg.setdefault("models", 1)
    model.to(device)
    model.eval()
    if transition_power < 1:
        raise ValueError(f"transition_power must be >= 1, got {transition_power}")
    if shifts:
        return _apply_shifted(model, mix, callback, callback_arg, kwargs)
    if split:
        return _apply_split(model, mix, callback, callback_arg, kwargs)
    return _apply_leaf(model, mix, kwargs, callback, callback_arg)


def _apply_bag(bag: BagOfModels, mix, callback, callback_arg: dict, kwargs: dict) -> torch.Tensor:
    estimates: tp.Union[float, torch.Tensor] = 0.
    totals = [0.] * len(bag.sources)
    callback_arg["models"] = len(bag.models)
    for sub_model, model_weights in zip(bag.models, bag.weights):
        original_device = next(iter(sub_model.parameters())).device
        sub_model.to(kwargs["device"])
        out = apply_model(sub_model, mix, **kwargs, callback_arg=callback_arg,
                          callback=_child_callback(callback, "model_idx_in_bag",
                                                   callback_arg["model_idx_in_bag"]))
        sub_model.to(original_device)
        for k, source_weight in enumerate(model_weights):
            out[:, k, :, :] *= source_weight
            totals[k] += source_weight
        estimates += out
        del out
        callback_arg["model_idx_in_bag"] += 1
    assert isinstance(estimates, torch.Tensor)
    for k in range(estimates.shape[1]):
        estimates[:, k, :, :] /= totals[k]
    return estimates


def _apply_shifted(model, mix, callback, callback_arg: dict, kwargs: dict) -> torch.Tensor:
    shifts = kwargs["shifts"]
    kwargs = dict(kwargs, shifts=0)
    length = mix.shape[-1]
    max_shift = int(0.5 * model.samplerate)
    out: tp.Union[float, torch.Tensor] = 0.
    for shift_idx in range(shifts):
        offset = random.randint(0, max_shift)
        # The mix delayed by max_shift - offset samples (zeros before it), as a window: the
        # whole track is never copied into a padded one.
        shifted = TensorChunk.window(mix, offset - max_shift, length + max_shift - offset)
        shifted_out = apply_model(model, shifted, **kwargs, callback_arg=callback_arg,
                                  callback=_child_callback(callback, "shift_idx", shift_idx))
        out += shifted_out[..., max_shift - offset:]
    assert isinstance(out, torch.Tensor)
    out /= shifts
    return out


def _segment_length(model, segment: tp.Optional[float]) -> int:
    if segment is None:
        segment = model.segment
    if segment is None or segment <= 0:
        raise ValueError(f"splitting needs a positive segment length, got {segment}")
    return int(model.samplerate * segment)


def _apply_split(model, mix, callback, callback_arg: dict, kwargs: dict) -> torch.Tensor:
    kwargs = dict(kwargs, split=False)
    pool = kwargs["pool"]
    batch, channels, length = mix.shape
    out = torch.zeros(batch, len(model.sources), channels, length, device=mix.device)
    sum_weight = torch.zeros(length, device=mix.device)
    segment_length = _segment_length(model, kwargs["segment"])
    stride = int((1 - kwargs["overlap"]) * segment_length)
    if stride <= 0:
        raise ValueError(f"overlap {kwargs['overlap']} leaves no stride between segments of "
                         f"{segment_length} samples; use a longer segment or a smaller overlap")
    weight = segment_weight(segment_length, kwargs["transition_power"], mix.device)
    futures = []
    for offset in range(0, length, stride):
        chunk = TensorChunk(mix, offset, segment_length)
        future = pool.submit(apply_model, model, chunk, **kwargs, callback_arg=callback_arg,
                             callback=_child_callback(callback, "segment_offset", offset))
        futures.append((future, offset))
    iterator: tp.Iterable = futures
    if kwargs["progress"]:
        scale = float(format(stride / model.samplerate, ".2f"))
        iterator = tqdm.tqdm(futures, unit_scale=scale, ncols=120, unit="seconds")
    for future, offset in iterator:
        try:
            chunk_out = future.result()
        except Exception:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        chunk_length = chunk_out.shape[-1]
        # in place: no temporary of the weighted segment
        out[..., offset:offset + chunk_length].addcmul_(weight[:chunk_length],
                                                        chunk_out.to(mix.device))
        sum_weight[offset:offset + chunk_length] += weight[:chunk_length]
    if sum_weight.min() <= 0:
        raise RuntimeError("some samples were covered by no segment; check overlap < 1")
    out /= sum_weight
    return out


def _report(callback, callback_arg: dict, lock, state: str) -> None:
    if callback is not None:
        with lock:
            callback(_replace_dict(callback_arg, ("state", state)))


def _apply_leaf(model, mix, kwargs: dict, callback, callback_arg: dict) -> torch.Tensor:
    length = mix.shape[-1]
    device = kwargs["device"]
    padded_mix = tensor_chunk(mix).padded(leaf_input_length(model, length, kwargs["segment"]))
    _report(callback, callback_arg, kwargs["lock"], "start")
    out = run_model(model, padded_mix.to(device), kwargs["amp"])
    _report(callback, callback_arg, kwargs["lock"], "end")
    return center_trim(out, length)


def run_model(model: nn.Module, mix: torch.Tensor, amp: tp.Optional[str] = None) -> torch.Tensor:
    """`model(mix)` without gradients, in the precision `amp` selects (see `apply_model`);
    the output is always float32."""
    with torch.no_grad(), autocast(mix.device, amp):
        out = model(mix)
    return out.float()


# ----------------------------------------------------------------------------------------------
# Streaming: the same computation, yielding the output block by block.


_STREAM_LOCK = Lock()


class _ShiftedSplitRun:
    """One (model, shift) pass of the split computation, accumulated over a sliding window.

    Segments are accumulated in time order; samples before the next segment's start receive no
    further contribution, so they can be normalised and released.
    """

    def __init__(self, model, length: int, shift_offset: int, max_shift: int,
                 segment_length: int, stride: int, weight: torch.Tensor, report_info: dict):
        self.model = model
        self.report_info = report_info
        self.base = shift_offset - max_shift  # start of the shifted view in track coordinates
        self.view_length = length + max_shift - shift_offset
        self.segment_length = segment_length
        self.stride = stride
        self.weight = weight.cpu()
        self.window_start = self.base
        self.out: tp.Optional[torch.Tensor] = None
        self.sum_weight = torch.zeros(0)

    def starts(self) -> tp.Iterator[int]:
        """Track position of each segment, in order."""
        for position in range(0, self.view_length, self.stride):
            yield self.base + position

    def read_input(self, source, start: int, segment: tp.Optional[float]) -> torch.Tensor:
        """The model input for the segment at `start`, with its context (zeros off the track)."""
        chunk_length = self._chunk_length(start)
        input_length = leaf_input_length(self.model, chunk_length, segment)
        return read_padded(source, start - (input_length - chunk_length) // 2, input_length)

    def _chunk_length(self, start: int) -> int:
        return min(self.segment_length, self.base + self.view_length - start)

    def evaluate(self, mix: torch.Tensor, start: int, device, callback,
                 amp: tp.Optional[str] = None) -> torch.Tensor:
        """Model output for the segment at `start` (thread safe)."""
        info = _replace_dict(self.report_info, ("segment_offset", start - self.base))
        _report(callback, info, _STREAM_LOCK, "start")
        out = run_model(self.model, mix.to(device), amp)
        out = center_trim(out, self._chunk_length(start)).cpu()
        _report(callback, info, _STREAM_LOCK, "end")
        return out

    def accumulate(self, chunk_out: torch.Tensor, start: int) -> None:
        weight = self.weight[:chunk_out.shape[-1]]
        at = start - self.window_start
        end = at + chunk_out.shape[-1]
        if self.out is None:
            self.out = torch.zeros(*chunk_out.shape[:-1], 0)
        if end > self.out.shape[-1]:
            grow = end - self.out.shape[-1]
            self.out = F.pad(self.out, (0, grow))
            self.sum_weight = F.pad(self.sum_weight, (0, grow))
        self.out[..., at:end] += weight * chunk_out
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


def _leaves_and_weights(model: nn.Module) -> tp.Tuple[tp.List[nn.Module], tp.List[tp.List[float]]]:
    if isinstance(model, BagOfModels):
        if any(isinstance(member, BagOfModels) for member in model.models):
            raise ValueError("streaming separation does not support nested bags of models")
        return list(model.models), model.weights
    return [model], [[1.] * len(model.sources)]


def apply_model_streaming(model: nn.Module, source, shifts: int = 1, overlap: float = 0.25,
                          transition_power: float = 1., device=None,
                          segment: tp.Optional[float] = None, progress: bool = False,
                          num_workers: int = 0, block_seconds: float = 30.,
                          callback: tp.Optional[Callback] = None,
                          callback_arg: tp.Optional[dict] = None, amp: tp.Optional[str] = None
                          ) -> tp.Iterator[tp.Tuple[int, torch.Tensor]]:
    """Yield `(start, estimates [1, S, C, n])` blocks of `apply_model(model, mix, split=True, ...)`.

    `source` gives the mixture `[1, C, T]` lazily: it needs `shape` and slicing on the last
    dimension (e.g. `source[..., a:b]`), and is only read from the calling thread. Memory use
    depends on the segment length, the number of models, shifts and workers, not on the
    duration. Random shifts are drawn from `random` in the same order as `apply_model`, so both
    give the same result for the same seed. `callback` receives the same dicts as with
    `apply_model` (in processing order, interleaved between models).
    """
    check_amp(amp)
    if transition_power < 1:
        raise ValueError(f"transition_power must be >= 1, got {transition_power}")
    device = torch.device("cpu") if device is None else torch.device(device)
    length = source.shape[-1]
    leaves, weights = _leaves_and_weights(model)
    runs = _make_runs(leaves, length, shifts, overlap, transition_power, segment,
                      _replace_dict(callback_arg, ("models", len(leaves))))
    for leaf in leaves:
        leaf.to(device)
        leaf.eval()
    totals = [sum(column) for column in zip(*weights)]
    block_length = max(1, int(block_seconds * leaves[0].samplerate))
    flat = [run for leaf_runs in runs for run in leaf_runs]
    # Every segment of every run, by start position: accumulating in this order means that all
    # samples before the next start are final.
    schedule = heapq.merge(*[zip(run.starts(), itertools.repeat(index))
                             for index, run in enumerate(flat)])
    pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else DummyPoolExecutor()
    pending: tp.Deque[tp.Tuple[int, int, tp.Any]] = deque()
    bar = tqdm.tqdm(total=length, unit_scale=1 / leaves[0].samplerate, ncols=120,
                    unit="seconds", disable=not progress)
    emitted = 0
    with pool:
        for start, index in itertools.chain(schedule, [(length, -1)]):
            if index >= 0:  # (length, -1) marks the end: drain every pending segment
                run = flat[index]
                mix = run.read_input(source, start, segment)
                pending.append((start, index, pool.submit(run.evaluate, mix, start, device,
                                                          callback, amp)))
            while len(pending) > (num_workers if index >= 0 else 0):
                done_start, done_index, future = pending.popleft()
                flat[done_index].accumulate(future.result(), done_start)
            # Samples before the next segment still to accumulate are final.
            frontier = max(emitted, min(length, pending[0][0] if pending else start))
            if frontier - emitted >= block_length or (frontier == length > emitted):
                yield emitted, _combine(runs, weights, totals, frontier)
                bar.update(frontier - emitted)
                emitted = frontier
    bar.close()


def _make_runs(leaves, length: int, shifts: int, overlap: float, transition_power: float,
               segment: tp.Optional[float], report_info: dict
               ) -> tp.List[tp.List[_ShiftedSplitRun]]:
    runs = []
    for leaf_index, leaf in enumerate(leaves):
        segment_length = _segment_length(leaf, segment)
        stride = int((1 - overlap) * segment_length)
        if stride <= 0:
            raise ValueError(f"overlap {overlap} leaves no stride between segments")
        weight = segment_weight(segment_length, transition_power)
        if shifts:
            max_shift = int(0.5 * leaf.samplerate)
            offsets = [random.randint(0, max_shift) for _ in range(shifts)]
        else:
            max_shift, offsets = 0, [0]
        runs.append([_ShiftedSplitRun(leaf, length, offset, max_shift, segment_length, stride,
                                      weight, _replace_dict(report_info,
                                                            ("model_idx_in_bag", leaf_index),
                                                            ("shift_idx", shift_idx)))
                     for shift_idx, offset in enumerate(offsets)])
    return runs


def _combine(runs, weights, totals, end: int) -> torch.Tensor:
    """Average over shifts, then weight per source over models, as `apply_model` does."""
    estimates: tp.Union[float, torch.Tensor] = 0.
    for leaf_runs, model_weights in zip(runs, weights):
        out: tp.Union[float, torch.Tensor] = 0.
        for run in leaf_runs:
            out += _pop_track_range(run, end)
        assert isinstance(out, torch.Tensor)
        out /= len(leaf_runs)
        for k, source_weight in enumerate(model_weights):
            out[:, k] *= source_weight
        estimates += out
    assert isinstance(estimates, torch.Tensor)
    for k, total in enumerate(totals):
        estimates[:, k] /= total
    return estimates


def _pop_track_range(run: _ShiftedSplitRun, end: int) -> torch.Tensor:
    """Output of `run` for the track positions from where it stopped (at least 0) up to `end`."""
    if run.window_start < 0:
        run.pop(0)  # the part of the shifted view before the track start is dropped
    return run.pop(end)
