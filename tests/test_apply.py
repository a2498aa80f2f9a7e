"""apply_model semantics: shifts, segments, cross-fade, bags, callbacks, and the streaming path."""
import random

from hypothesis import given, settings, strategies as st
import pytest
import torch
from torch import nn

from demucs.apply import (BagOfModels, TensorChunk, apply_model, apply_model_streaming,
                          segment_weight, tensor_chunk)

SOURCES = ["drums", "bass", "other", "vocals"]
torch.set_num_threads(1)  # tiny models: extra threads only add contention


class ConvSeparator(nn.Module):
    """A tiny context-sensitive 'separator': one convolution per source, stride-free."""

    def __init__(self, samplerate: int = 100, segment: float = 1., seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.sources = list(SOURCES)
        self.samplerate = samplerate
        self.audio_channels = 2
        self.segment = segment
        self.conv = nn.Conv1d(2, 2 * len(SOURCES), 9, padding=4)

    def valid_length(self, length: int) -> int:
        """Ask for 4 samples of context on each side: the receptive field of the convolution."""
        return length + 8

    def forward(self, mix):
        out = self.conv(mix)
        return out.view(mix.shape[0], len(self.sources), 2, -1)


class Scaler(nn.Module):
    """A context-free 'separator' returning `factor * mix` for every source."""

    def __init__(self, factor: float, samplerate: int = 100):
        super().__init__()
        self.factor = nn.Parameter(torch.tensor(factor))
        self.sources = list(SOURCES)
        self.samplerate = samplerate
        self.audio_channels = 2
        self.segment = 1.

    def forward(self, mix):
        return self.factor * mix[:, None].expand(-1, len(self.sources), -1, -1)


def _mix(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 2, length, generator=torch.Generator().manual_seed(seed))


def test_tensor_chunk_pads_with_neighbouring_audio():
    mix = torch.arange(10.)[None]
    chunk = TensorChunk(mix, 3, 4)
    assert chunk.shape == [1, 4]
    assert chunk.padded(8).tolist() == [[1., 2., 3., 4., 5., 6., 7., 8.]]
    edge = TensorChunk(mix, 0, 3)
    assert edge.padded(5).tolist() == [[0., 0., 1., 2., 3.]]
    nested = TensorChunk(chunk, 1, 10)
    assert (nested.offset, nested.length) == (4, 3)  # bounded by the parent chunk
    assert tensor_chunk(chunk) is chunk
    with pytest.raises(ValueError, match="offset 10"):
        TensorChunk(mix, 10)


def test_segment_weight_is_a_normalised_triangle():
    weight = segment_weight(6, 1.)
    assert torch.allclose(weight, torch.tensor([1, 2, 3, 3, 2, 1]) / 3)
    assert torch.allclose(segment_weight(5, 2.), (torch.tensor([1, 2, 3, 2, 1]) / 3) ** 2)


@pytest.mark.parametrize("length", [37, 100, 333])
def test_split_output_has_input_length_and_matches_whole(length):
    model = ConvSeparator()
    mix = _mix(length)
    whole = apply_model(model, mix, shifts=0, split=False)
    split = apply_model(model, mix, shifts=0, split=True, overlap=0.25, segment=0.5)
    assert split.shape == (1, 4, 2, length)
    # Each segment gets its receptive field from the neighbouring audio, so no seam is visible.
    assert torch.allclose(whole, split, atol=1e-5)


def test_split_blends_segments_with_triangular_weights():
    model = Scaler(2.)
    mix = _mix(250)
    out = apply_model(model, mix, shifts=0, split=True, overlap=0.5, transition_power=3.)
    assert torch.allclose(out, 2 * mix[:, None].expand_as(out), atol=1e-6)


def test_shifts_average_randomly_shifted_estimates():
    model = ConvSeparator(samplerate=20)
    mix = _mix(90)
    random.seed(1)
    out = apply_model(model, mix, shifts=3, split=False)
    random.seed(1)
    max_shift = 10
    expected = 0
    for _ in range(3):
        offset = random.randint(0, max_shift)
        padded = nn.functional.pad(mix, (max_shift, max_shift))
        view = padded[..., offset:offset + 90 + max_shift - offset]
        expected = expected + model(view)[..., max_shift - offset:]
    assert torch.allclose(out, expected / 3, atol=1e-6)


def test_bag_applies_per_source_weights():
    first, second = Scaler(1.), Scaler(3.)
    weights = [[1., 0., 2., 1.], [1., 1., 1., 0.]]
    bag = BagOfModels([first, second], weights)
    mix = _mix(120)
    out = apply_model(bag, mix, shifts=0, split=True)
    factors = torch.tensor([(1 + 3) / 2, 3 / 1, (2 + 3) / 3, 1 / 1])
    expected = factors[None, :, None, None] * mix[:, None]
    assert torch.allclose(out, expected, atol=1e-6)


def test_bag_checks_members():
    other = Scaler(1., samplerate=200)
    with pytest.raises(ValueError, match="samplerate"):
        BagOfModels([Scaler(1.), other])
    with pytest.raises(ValueError, match="weights of model 0"):
        BagOfModels([Scaler(1.)], [[1., 1.]])
    bag = BagOfModels([ConvSeparator(segment=2.)], segment=1.5)
    assert bag.models[0].segment == 1.5
    assert bag.max_allowed_segment == float("inf")


def test_callbacks_report_every_evaluation():
    bag = BagOfModels([Scaler(1.), Scaler(2.)])
    events = []
    random.seed(0)
    apply_model(bag, _mix(150), shifts=2, split=True, overlap=0.25, callback=events.append,
                callback_arg={"audio_length": 150})
    starts = [e for e in events if e["state"] == "start"]
    ends = [e for e in events if e["state"] == "end"]
    assert len(starts) == len(ends) > 0
    assert {e["model_idx_in_bag"] for e in starts} == {0, 1}
    assert {e["shift_idx"] for e in starts} == {0, 1}
    assert all(e["models"] == 2 and e["audio_length"] == 150 for e in events)
    assert 75 in {e["segment_offset"] for e in starts}


def test_workers_give_the_same_result():
    model = ConvSeparator()
    mix = _mix(400)
    serial = apply_model(model, mix, shifts=0, overlap=0.3)
    threaded = apply_model(model, mix, shifts=0, overlap=0.3, num_workers=2)
    assert torch.equal(serial, threaded)


def test_transition_power_below_one_is_refused():
    with pytest.raises(ValueError, match="transition_power"):
        apply_model(Scaler(1.), _mix(50), transition_power=0.5)


def _streamed(model, mix, **kwargs) -> torch.Tensor:
    blocks = list(apply_model_streaming(model, mix, **kwargs))
    starts = [start for start, _ in blocks]
    assert starts == sorted(starts) and starts[0] == 0
    return torch.cat([block for _, block in blocks], dim=-1)


@settings(max_examples=15, deadline=None)
@given(length=st.integers(30, 700), shifts=st.integers(0, 2),
       overlap=st.sampled_from([0.1, 0.25, 0.5]),
       block=st.sampled_from([0.3, 1., 100.]), workers=st.sampled_from([0, 2]),
       seed=st.integers(0, 100))
def test_streaming_matches_in_memory(length, shifts, overlap, block, workers, seed):
    bag = BagOfModels([ConvSeparator(seed=1), ConvSeparator(seed=2, segment=0.7)],
                      [[1., 2., 0., 1.], [1., 1., 1., 1.]])
    mix = _mix(length, seed)
    random.seed(seed)
    expected = apply_model(bag, mix, shifts=shifts, overlap=overlap)
    random.seed(seed)
    streamed = _streamed(bag, mix, shifts=shifts, overlap=overlap, block_seconds=block,
                         num_workers=workers)
    assert streamed.shape == expected.shape
    assert torch.allclose(streamed, expected, atol=1e-6)


def test_streaming_reports_the_same_evaluations_as_apply_model():
    bag = BagOfModels([Scaler(1.), Scaler(2.)])
    mix = _mix(230)
    events, streamed_events = [], []
    random.seed(5)
    apply_model(bag, mix, shifts=2, overlap=0.25, callback=events.append)
    random.seed(5)
    list(apply_model_streaming(bag, mix, shifts=2, overlap=0.25, callback=streamed_events.append))

    def keyed(items):
        return sorted((e["model_idx_in_bag"], e["shift_idx"], e["segment_offset"], e["state"],
                       e["models"]) for e in items)

    assert keyed(streamed_events) == keyed(events)


@pytest.mark.parametrize("case", ["demucs_v3", "hdemucs_cac", "htdemucs_small"])
def test_streaming_matches_official_apply_model(golden_dir, case):
    from demucs.states import load_model
    model = load_model(golden_dir / case / "model.th")
    io = torch.load(golden_dir / case / "io.pt", weights_only=False)
    kwargs = dict(io["apply_kwargs"])
    assert kwargs.pop("split")
    streamed = _streamed(model, io["apply_mix"], block_seconds=0.5, **kwargs)
    reference = io["apply_out"]
    assert (streamed - reference).norm() / reference.norm() < 1e-4


class DtypeRecorder(ConvSeparator):
    """A ConvSeparator that records the dtype its convolution computes in."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def forward(self, mix):
        out = self.conv(mix)
        self.dtypes.append(out.dtype)
        return out.view(mix.shape[0], len(self.sources), 2, -1)


@pytest.mark.parametrize("amp, dtype", [(None, torch.float32), ("bf16", torch.bfloat16),
                                        ("fp16", torch.float16)])
@pytest.mark.parametrize("workers", [0, 2])
def test_amp_runs_every_segment_in_mixed_precision(amp, dtype, workers):
    model = DtypeRecorder()
    mix = _mix(350)
    reference = apply_model(model, mix, shifts=0, split=True)
    model.dtypes.clear()
    out = apply_model(model, mix, shifts=0, split=True, amp=amp, num_workers=workers)
    assert len(model.dtypes) == 5  # autocast is entered in each worker thread too
    assert set(model.dtypes) == {dtype}
    assert out.dtype == torch.float32
    error = float((out - reference).norm() / reference.norm())
    assert error < 1e-6 if amp is None else 1e-4 < error < 2e-2


def test_amp_streaming_matches_in_memory():
    model = DtypeRecorder()
    mix = _mix(400)
    random.seed(3)
    reference = apply_model(model, mix, shifts=1, amp="bf16")
    random.seed(3)
    blocks = list(apply_model_streaming(model, mix, shifts=1, amp="bf16", block_seconds=1.))
    assert set(model.dtypes) == {torch.bfloat16}
    assert torch.allclose(torch.cat([out for _, out in blocks], -1), reference, atol=1e-6)


@pytest.mark.parametrize("run", [apply_model, lambda *a, **k: list(apply_model_streaming(*a, **k))])
def test_unknown_amp_is_refused(run):
    with pytest.raises(ValueError, match="amp must be bf16, fp16 or None .* got 'fp8'"):
        run(ConvSeparator(), _mix(200), amp="fp8")
