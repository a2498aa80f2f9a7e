"""apply_model semantics: shifts, segments, cross-fade, bags, callbacks, and the streaming path;
the options, the plan both executors share, and the allocator tuning at the first separation."""
import dataclasses
import random
import subprocess
import sys
import typing as tp

from hypothesis import given, settings, strategies as st
import pytest
import torch
from torch import nn

from demucs import runner as runner_module
from demucs import streaming as streaming_module
from demucs.apply import (ApplyOptions, BagOfModels, BagPlan, LeafPlan, TensorChunk, apply_model,
                          apply_model_streaming, make_plan, segment_weight, tensor_chunk)
from demucs.rounding import upstream_rounding

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
    out = _seeded(1, apply_model, model, mix, shifts=3, split=False)
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


def _seeded(seed: int, run: tp.Callable[..., tp.Any], *args, **kwargs) -> tp.Any:
    """`run(*args, **kwargs)` after seeding `random` (which draws the shift offsets)."""
    random.seed(seed)
    return run(*args, **kwargs)


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
    expected = _seeded(seed, apply_model, bag, mix, shifts=shifts, overlap=overlap)
    streamed = _seeded(seed, _streamed, bag, mix, shifts=shifts, overlap=overlap,
                       block_seconds=block, num_workers=workers)
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
    reference = _seeded(3, apply_model, model, mix, shifts=1, amp="bf16")
    random.seed(3)
    blocks = list(apply_model_streaming(model, mix, shifts=1, amp="bf16", block_seconds=1.))
    assert set(model.dtypes) == {torch.bfloat16}
    assert torch.allclose(torch.cat([out for _, out in blocks], -1), reference, atol=1e-6)


@pytest.mark.parametrize("run", [apply_model, lambda *a, **k: list(apply_model_streaming(*a, **k))])
def test_unknown_amp_is_refused(run):
    with pytest.raises(ValueError, match="amp must be bf16, fp16 or None .* got 'fp8'"):
        run(ConvSeparator(), _mix(200), amp="fp8")


# ---------------------------------------------------------------------------------------------
# Options: validated once, with messages that name the setting.


@pytest.mark.parametrize("settings_, message", [
    ({"shifts": -1}, "shifts must be 0 or more .* got -1"),
    ({"overlap": 1.}, r"overlap must be in \[0, 1\) .* got 1.0"),
    ({"overlap": -0.1}, r"overlap must be in \[0, 1\) .* got -0.1"),
    ({"overlap": float("nan")}, "overlap must be in .* got nan"),
    ({"transition_power": 0.5}, "transition_power must be >= 1, got 0.5"),
    ({"transition_power": float("nan")}, "transition_power must be >= 1, got nan"),
    ({"segment": 0.}, "segment must be a positive number of seconds .* got 0.0"),
    ({"segment": -2.}, "segment must be a positive number of seconds .* got -2.0"),
    ({"amp": "fp8"}, "amp must be bf16, fp16 or None .* got 'fp8'")])
def test_options_refuse_invalid_settings(settings_, message):
    with pytest.raises(ValueError, match=message):
        ApplyOptions(**settings_)


def test_options_are_frozen_and_default_to_apply_model_defaults():
    options = ApplyOptions()
    assert (options.shifts, options.split, options.overlap, options.transition_power,
            options.segment, options.amp) == (1, True, 0.25, 1., None, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.shifts = 2  # type: ignore[misc]


@pytest.mark.parametrize("run", [apply_model, lambda *a, **k: list(apply_model_streaming(*a, **k))])
def test_invalid_settings_are_refused_before_any_model_runs(run):
    model = DtypeRecorder()
    with pytest.raises(ValueError, match="overlap must be in"):
        run(model, _mix(200), overlap=1.5)
    assert model.dtypes == []


# ---------------------------------------------------------------------------------------------
# The plan: geometry, weights and shift offsets, decided once.


def test_plan_draws_offsets_leaf_after_leaf_then_shift_after_shift():
    inner = BagOfModels([ConvSeparator(seed=1), ConvSeparator(seed=2, segment=0.5)])
    bag = BagOfModels([inner, ConvSeparator(seed=3)])
    random.seed(7)
    plan = make_plan(bag, ApplyOptions(shifts=3), 500)
    after_plan = random.random()
    random.seed(7)
    expected = [tuple(random.randint(0, 50) for _ in range(3)) for _ in range(3)]
    leaves = list(plan.leaves())
    assert [leaf.shift_offsets for leaf in leaves] == expected
    assert [leaf.max_shift for leaf in leaves] == [50, 50, 50]
    assert [leaf.segment_length for leaf in leaves] == [100, 50, 100]
    assert random.random() == after_plan  # exactly 9 draws
    assert isinstance(plan, BagPlan) and isinstance(plan.members[0], BagPlan)
    assert [(leaf.bag_index, leaf.bag_size) for leaf in leaves] == [(0, 2), (0, 2), (1, 2)]


def test_plan_without_shifts_draws_nothing_and_has_one_unshifted_pass():
    random.seed(3)
    state = random.getstate()
    leaf = make_plan(ConvSeparator(), ApplyOptions(shifts=0), 250)
    assert random.getstate() == state
    assert isinstance(leaf, LeafPlan)
    assert (leaf.max_shift, leaf.shift_offsets, leaf.bag_size) == (0, (), None)
    (pass_,) = leaf.passes
    assert (pass_.shift_idx, pass_.start, pass_.length) == (0, 0, 250)


def test_plan_geometry_of_a_split_leaf():
    random.seed(0)
    leaf = make_plan(ConvSeparator(samplerate=100, segment=1.), ApplyOptions(
        shifts=2, overlap=0.4, transition_power=2.), 300)
    assert isinstance(leaf, LeafPlan)
    assert (leaf.segment_length, leaf.stride) == (100, 60)
    assert torch.equal(leaf.weight, segment_weight(100, 2.))
    for shift_idx, (pass_, offset) in enumerate(zip(leaf.passes, leaf.shift_offsets)):
        # the track delayed by max_shift - offset samples: the view starts that far before it
        assert (pass_.shift_idx, pass_.start, pass_.length) == (shift_idx, offset - 50,
                                                                300 + 50 - offset)
        assert list(pass_.segment_starts()) == list(range(offset - 50, 300, 60))
        last = pass_.segment_starts()[-1]
        assert pass_.chunk_length(last) == 300 - last
    whole = make_plan(ConvSeparator(), ApplyOptions(shifts=0, split=False), 300)
    assert (whole.segment_length, whole.stride, whole.weight) == (None, None, None)
    assert whole.passes[0].chunk_length(0) == 300


def test_plan_reads_segments_with_their_context():
    leaf = make_plan(ConvSeparator(samplerate=10, segment=1.), ApplyOptions(shifts=0, overlap=0.),
                     25)
    track = torch.arange(1., 26.)[None]
    first, second, last = (leaf.passes[0].read_input(track, 0, start, None)
                           for start in leaf.passes[0].segment_starts())
    # 10 samples and the 4 of context on each side the model asks for, zeros off the track
    assert first.tolist() == [[0.] * 4 + list(range(1, 15))]
    assert second.tolist() == [list(range(7, 25))]
    assert last.tolist() == [list(range(17, 26)) + [0.] * 4]  # the short last segment: 5 + 8
    # the same segment read from a longer source where the track starts at 3
    longer = torch.cat([torch.full((1, 3), -1.), track], -1)
    assert torch.equal(leaf.passes[0].read_input(longer, 3, 10, None), second)


@pytest.mark.parametrize("model, options, message", [
    (ConvSeparator(samplerate=3, segment=1.), ApplyOptions(overlap=0.9),
     "overlap 0.9 leaves no stride between segments of 3 samples"),
    (Scaler(1.), ApplyOptions(segment=None, transition_power=40.),
     "transition_power 40.0 makes the cross-fade weight of a 100-sample segment round to 0"),
])
def test_plan_refuses_unusable_segments(model, options, message):
    with pytest.raises(ValueError, match=message):
        make_plan(model, options, 1000)
    model.segment = None
    with pytest.raises(ValueError, match="splitting needs a positive segment length, got None"):
        make_plan(model, ApplyOptions(), 1000)
    make_plan(model, ApplyOptions(split=False), 1000)  # no segment needed without splitting


def test_applying_draws_the_same_offsets_as_the_plan():
    bag = BagOfModels([ConvSeparator(seed=1), ConvSeparator(seed=2)])
    for run in [apply_model, lambda *a, **k: list(apply_model_streaming(*a, **k))]:
        random.seed(11)
        make_plan(bag, ApplyOptions(shifts=2), 300)
        expected = random.random()
        random.seed(11)
        run(bag, _mix(300), shifts=2)
        assert random.random() == expected


# ---------------------------------------------------------------------------------------------
# Both executors run the same plan: bitwise equal with the same overlap-add formula.


class DrawingSeparator(ConvSeparator):
    """A ConvSeparator whose forward draws from `random` as HTDemucs's "sin" embedding does."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.crosstransformer = nn.Module()
        self.crosstransformer.emb = "sin"
        self.crosstransformer.sin_random_shift = 0

    def forward(self, mix):
        random.randrange(1)
        return super().forward(mix)


def _upstream_draws(models, length: int, shifts: int, overlap: float, seed: int):
    """Offsets and the next random number, drawn in upstream's recursion order: a shift's
    offset, then one draw per segment forward of that pass, model after model."""
    random.seed(seed)
    offsets = []
    for model in models:
        max_shift = int(0.5 * model.samplerate)
        stride = int((1 - overlap) * int(model.segment * model.samplerate))
        for _ in range(shifts):
            offsets.append(random.randint(0, max_shift))
            for _ in range(0, length + max_shift - offsets[-1], stride):
                random.randrange(1)
    return offsets, random.random()


@settings(max_examples=10, deadline=None, derandomize=True)
@given(length=st.integers(30, 600), shifts=st.integers(1, 3), batch=st.integers(1, 3),
       seed=st.integers(0, 100))
def test_shift_offsets_and_random_state_follow_upstreams_order(length, shifts, batch, seed):
    models = [DrawingSeparator(seed=1), DrawingSeparator(seed=2, segment=0.6)]
    bag = BagOfModels(models)
    offsets, after = _upstream_draws(models, length, shifts, 0.25, seed)
    random.seed(seed)
    plan = make_plan(bag, ApplyOptions(shifts=shifts), length)
    assert [offset for leaf in plan.leaves() for offset in leaf.shift_offsets] == offsets
    for run in [apply_model, lambda *a, **k: list(apply_model_streaming(*a, **k))]:
        random.seed(seed)
        run(bag, _mix(length), shifts=shifts, segment_batch=batch)
        assert random.random() == after  # the forwards' own draws were the plan's


def _nested_bag() -> BagOfModels:
    inner = BagOfModels([ConvSeparator(seed=3), Scaler(2.)], [[1., 1., .5, 1.], [.3, 1., 1., 1.]])
    return BagOfModels([inner, ConvSeparator(seed=4, segment=0.6)], [[1., 2., 1., 1.]] * 2)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(length=st.integers(30, 600), shifts=st.integers(0, 2),
       overlap=st.sampled_from([0.1, 0.25, 0.4]), power=st.sampled_from([1., 2.]),
       block=st.sampled_from([0.3, 100.]), workers=st.sampled_from([0, 2]),
       seed=st.integers(0, 100))
def test_streaming_is_bitwise_in_memory_with_the_same_overlap_add(
        length, shifts, overlap, power, block, workers, seed):
    bag = _nested_bag()
    mix = _mix(length, seed)
    expected = _seeded(seed, apply_model, bag, mix, shifts=shifts, overlap=overlap,
                       transition_power=power)
    random.seed(seed)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(streaming_module, "add_product", runner_module.add_fused)
        streamed = _streamed(bag, mix, shifts=shifts, overlap=overlap, transition_power=power,
                             block_seconds=block, num_workers=workers)
    assert torch.equal(streamed, expected)


@pytest.mark.parametrize("shifts", [0, 2])
def test_streaming_is_bitwise_in_memory_without_overlap(shifts):
    """Each sample gets one weighted segment: both overlap-add formulas round the same way."""
    bag = _nested_bag()
    mix = _mix(450, 1)
    expected = _seeded(shifts, apply_model, bag, mix, shifts=shifts, overlap=0.)
    random.seed(shifts)
    assert torch.equal(_streamed(bag, mix, shifts=shifts, overlap=0., block_seconds=0.5),
                       expected)


def test_upstream_rounding_overlap_adds_the_rounded_product():
    """The solver validates and tests inside `upstream_rounding()`: the in-memory overlap-add then
    rounds `weight * segment` before adding it, as upstream's apply_model (and the streaming
    executor) do, instead of one fused multiply-add."""
    bag = _nested_bag()
    mix = _mix(500, 2)
    streamed = _seeded(1, _streamed, bag, mix, shifts=1, overlap=0.25, block_seconds=100.)
    random.seed(1)
    with upstream_rounding():
        assert torch.equal(apply_model(bag, mix, shifts=1, overlap=0.25), streamed)


def test_nested_bags_report_the_outer_index_and_the_inner_size():
    inner = BagOfModels([Scaler(1.), Scaler(2.), Scaler(3.)])
    bag = BagOfModels([inner, Scaler(4.)])
    for run in [apply_model, lambda *a, **k: list(apply_model_streaming(*a, **k))]:
        events = []
        run(bag, _mix(120), shifts=0, callback=events.append, callback_arg={"track": "a"})
        pairs = sorted({(e["model_idx_in_bag"], e["models"]) for e in events})
        assert pairs == [(0, 3), (1, 2)]
        assert all(e["track"] == "a" for e in events)


def test_lone_model_reports_one_model_unless_callback_arg_says_otherwise():
    events = []
    apply_model(Scaler(1.), _mix(120), shifts=0, callback=events.append)
    assert [e["models"] for e in events] == [1, 1, 1, 1]
    assert list(events[0]) == ["model_idx_in_bag", "shift_idx", "segment_offset", "models",
                               "state"]
    events.clear()
    apply_model(Scaler(1.), _mix(120), shifts=0, callback=events.append,
                callback_arg={"models": 5})
    assert {e["models"] for e in events} == {5}


# ---------------------------------------------------------------------------------------------
# What apply_model accepts: chunks, batches, unsplit tracks, pools, progress bars.


def test_chunk_input_takes_its_context_from_the_surrounding_audio():
    model = ConvSeparator()
    track = _mix(300)
    out = apply_model(model, TensorChunk(track, 100, 100), shifts=0, split=False)
    whole = apply_model(model, track, shifts=0, split=False)
    assert out.shape == (1, 4, 2, 100)
    assert torch.allclose(out, whole[..., 100:200], atol=1e-6)


def test_batches_are_separated_item_by_item():
    model = ConvSeparator()
    mix = torch.cat([_mix(260, 1), _mix(260, 2)])
    out = _seeded(4, apply_model, model, mix, shifts=1, overlap=0.3)
    for index in range(2):
        random.seed(4)
        single = apply_model(model, mix[index:index + 1], shifts=1, overlap=0.3)
        assert torch.allclose(out[index:index + 1], single, atol=1e-6)


def test_a_given_pool_is_used_and_left_open():
    from concurrent.futures import ThreadPoolExecutor
    model = ConvSeparator()
    mix = _mix(400)
    with ThreadPoolExecutor(2) as pool:
        out = apply_model(model, mix, shifts=0, pool=pool)
        assert pool.submit(lambda: 1).result() == 1
    assert torch.equal(out, apply_model(model, mix, shifts=0))


def test_progress_bar_counts_the_segments(capsys):
    out = apply_model(Scaler(2.), _mix(450), shifts=0, overlap=0.5, progress=True)
    assert out.shape == (1, 4, 2, 450)
    assert "4.5/4.5" in capsys.readouterr().err  # 9 segments of 0.5 s stride


# ---------------------------------------------------------------------------------------------
# Segment batching: several segments of a pass in one forward, the same output.


class BatchRecorder(ConvSeparator):
    """A ConvSeparator that records the batch size of each forward."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.batches: list = []

    def forward(self, mix):
        self.batches.append(mix.shape[0])
        return super().forward(mix)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(length=st.integers(30, 700), shifts=st.integers(0, 2), batch=st.integers(2, 6),
       overlap=st.sampled_from([0.1, 0.25, 0.5]), workers=st.sampled_from([0, 2]),
       seed=st.integers(0, 100))
def test_segment_batching_gives_the_unbatched_output(length, shifts, batch, overlap, workers,
                                                     seed):
    bag = _nested_bag()
    mix = _mix(length, seed)
    expected = _seeded(seed, apply_model, bag, mix, shifts=shifts, overlap=overlap)
    batched = _seeded(seed, apply_model, bag, mix, shifts=shifts, overlap=overlap,
                      segment_batch=batch, num_workers=workers)
    assert torch.allclose(batched, expected, atol=1e-6, rtol=0)
    streamed = _seeded(seed, _streamed, bag, mix, shifts=shifts, overlap=overlap,
                       segment_batch=batch, num_workers=workers, block_seconds=0.3)
    assert torch.allclose(streamed, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("run", [apply_model, lambda *a, **k: list(apply_model_streaming(*a, **k))])
def test_segment_batching_groups_consecutive_segments_of_one_input_length(run):
    model = BatchRecorder()
    run(model, _mix(450), shifts=0, overlap=0., segment_batch=2)
    # 5 segments of 100 samples (the last one 50): 2 + 2, then the short one alone
    assert model.batches == [2, 2, 1]


def test_segment_batching_reports_every_segment_and_draws_the_same_shifts():
    mix = _mix(500)
    events, batched_events = [], []
    random.seed(3)
    apply_model(_nested_bag(), mix, shifts=2, callback=events.append)
    after = random.random()
    random.seed(3)
    apply_model(_nested_bag(), mix, shifts=2, callback=batched_events.append, segment_batch=3)
    assert random.random() == after

    def keyed(items):
        return sorted((e["model_idx_in_bag"], e["shift_idx"], e["segment_offset"], e["state"])
                      for e in items)
    assert keyed(batched_events) == keyed(events)


def _tiny_models() -> tp.List[nn.Module]:
    from demucs.demucs import Demucs
    from demucs.hdemucs import HDemucs
    from demucs.htdemucs import HTDemucs
    torch.manual_seed(0)
    return [Demucs(SOURCES, channels=4, depth=3, samplerate=8000, segment=0.3, lstm_layers=1),
            HDemucs(SOURCES, channels=4, nfft=256, depth=4, samplerate=8000, segment=0.3),
            HTDemucs(SOURCES, channels=8, depth=3, t_layers=1, t_heads=2, bottom_channels=16,
                     samplerate=8000, segment=0.3)]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["demucs", "hdemucs", "htdemucs"])
def test_segment_batching_matches_for_the_real_models(index):
    model = _tiny_models()[index].eval()
    mix = torch.randn(1, 2, 8000, generator=torch.Generator().manual_seed(index))
    expected = _seeded(0, apply_model, model, mix, shifts=2)
    batched = _seeded(0, apply_model, model, mix, shifts=2, segment_batch=4)
    assert torch.allclose(batched, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_segment_batch_must_be_a_positive_whole_number(value):
    with pytest.raises(ValueError, match=f"segment_batch must be a whole number >= 1 .* got "
                                         f"{value!r}"):
        ApplyOptions(segment_batch=value)


# ---------------------------------------------------------------------------------------------
# The allocator is tuned when a separation starts on CPU, not when the module is imported.


def test_importing_apply_leaves_the_allocator_alone():
    probe = ("import demucs.allocator as allocator\n"
             "allocator.tune_malloc = lambda: print('tuned')\n"
             "import demucs.apply\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True)
    assert "tuned" not in result.stdout


@pytest.mark.parametrize("run", [apply_model, lambda *a, **k: list(apply_model_streaming(*a, **k))])
def test_applying_on_cpu_tunes_the_allocator_once(monkeypatch, run):
    calls = []
    monkeypatch.setattr(runner_module.allocator, "tune_malloc", lambda: calls.append(1) or True)
    runner_module._tune_allocator_once.cache_clear()
    try:
        run(Scaler(1.), _mix(150), shifts=0)
        run(Scaler(1.), _mix(150), shifts=0)
    finally:
        runner_module._tune_allocator_once.cache_clear()
    assert calls == [1]


# ----------------------------------------------------------------------------------------------
# Only the stems asked for: bag members that do not weigh them are not run.


class CountingSeparator(DrawingSeparator):
    """A DrawingSeparator that counts its forwards."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.forwards = 0

    def forward(self, mix):
        self.forwards += 1
        return super().forward(mix)


def _specialists() -> BagOfModels:
    """Four specialists, each weighing one source only (as htdemucs_ft), of other segments."""
    models = [CountingSeparator(seed=seed, segment=segment)
              for seed, segment in zip(range(4), [1., 0.6, 0.8, 0.7])]
    weights = [[float(index == source) for source in range(4)] for index in range(4)]
    return BagOfModels(models, weights)


def _run_stems(run, bag, mix, seed, **kwargs) -> tp.Tuple[torch.Tensor, float]:
    random.seed(seed)
    out = run(bag, mix, **kwargs)
    return out, random.random()


@settings(max_examples=10, deadline=None, derandomize=True)
@given(length=st.integers(30, 500), shifts=st.integers(0, 2), seed=st.integers(0, 100),
       stems=st.sampled_from([["vocals"], ["drums"], ["vocals", "bass"], ["bass", "vocals"]]),
       streaming=st.booleans())
def test_stems_are_bit_identical_and_skip_the_members_that_do_not_weigh_them(
        length, shifts, seed, stems, streaming):
    run = _streamed if streaming else apply_model
    mix = _mix(length, seed)
    full, after_full = _run_stems(run, _specialists(), mix, seed, shifts=shifts)
    bag = _specialists()
    only, after_only = _run_stems(run, bag, mix, seed, shifts=shifts, stems=stems)
    indices = [SOURCES.index(stem) for stem in stems]
    assert torch.equal(only, full[:, indices])
    assert after_only == after_full  # skipped members still made their random draws
    ran = [model.forwards > 0 for model in bag.models]
    assert ran == [source in indices for source in range(4)]


def test_stems_of_a_single_model_are_its_outputs_for_them():
    model, mix = ConvSeparator(seed=3), _mix(300)
    full = _seeded(0, apply_model, model, mix, shifts=1)
    only = _seeded(0, apply_model, model, mix, shifts=1, stems=["other", "drums"])
    assert torch.equal(only, full[:, [2, 0]])


def test_stems_skip_inside_nested_bags():
    inner = _specialists()
    outer = BagOfModels([inner, ConvSeparator(seed=9)], [[1.] * 4, [0., 0., 1., 0.]])
    mix = _mix(250)
    full = _seeded(3, apply_model, outer, mix, shifts=2)
    for model in inner.models:
        model.forwards = 0
    only = _seeded(3, apply_model, outer, mix, shifts=2, stems=["vocals"])
    assert torch.equal(only, full[:, [3]])
    assert [model.forwards > 0 for model in inner.models] == [False, False, False, True]


@pytest.mark.parametrize("stems, error, message", [
    (["guitar"], ValueError, "stem 'guitar' is not a source of this model; its sources are "
                             "drums, bass, other, vocals"),
    ([], ValueError, "stems is empty"),
    (["bass", "bass"], ValueError, "stems names bass more than once"),
    ("vocals", TypeError, "stems must be a list of stem names"),
    ([3], TypeError, "stems must be a list of stem names")])
def test_invalid_stems_are_refused(stems, error, message):
    with pytest.raises(error, match=message):
        apply_model(ConvSeparator(), _mix(100), stems=stems)


def test_stems_no_member_weighs_are_refused():
    bag = BagOfModels([ConvSeparator(seed=1)], [[1., 1., 1., 0.]])
    with pytest.raises(ValueError, match="no model of the bag has a non-zero weight for vocals"):
        apply_model(bag, _mix(100), stems=["vocals"])
