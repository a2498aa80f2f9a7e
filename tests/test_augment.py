"""Tests for demucs.augment: each augmentation's effect on [batch, sources, channels, time]."""
from hypothesis import given, settings, strategies as st
import pytest
import torch

from demucs import augment


def batch(b=8, s=4, c=2, t=64, seed=0):
    return torch.randn(b, s, c, t, generator=torch.Generator().manual_seed(seed))


def is_window_of(out: torch.Tensor, wav: torch.Tensor) -> bool:
    """True when `out` is a contiguous time window of `wav`."""
    length = out.shape[-1]
    return any(torch.equal(out, wav[..., k:k + length]) for k in range(wav.shape[-1] - length + 1))


@settings(max_examples=20, deadline=None)
@given(shift=st.integers(1, 16), seed=st.integers(0, 1000))
def test_shift_windows(shift, seed):
    torch.manual_seed(seed)
    wav = batch(b=3, s=2, t=40)
    out = augment.Shift(shift)(wav)
    assert out.shape == (3, 2, 2, 40 - shift)
    for b in range(3):
        for s in range(2):
            assert is_window_of(out[b, s], wav[b, s])


def test_shift_same_keeps_sources_aligned():
    torch.manual_seed(1)
    wav = batch(b=16, s=1).expand(-1, 4, -1, -1).contiguous()
    same = augment.Shift(10, same=True)(wav)
    assert all(torch.equal(same[:, 0], same[:, s]) for s in range(4))
    torch.manual_seed(1)
    independent = augment.Shift(10, same=False)(wav)
    assert not all(torch.equal(independent[:, 0], independent[:, s]) for s in range(4))


def test_shift_eval_trims_and_zero_is_identity():
    wav = batch()
    module = augment.Shift(5).eval()
    assert torch.equal(module(wav), wav[..., :-5])
    assert torch.equal(augment.Shift(0)(wav), wav)


def test_flip_channels_swaps_or_keeps():
    torch.manual_seed(0)
    wav = batch(b=16)
    out = augment.FlipChannels()(wav)
    swapped = kept = 0
    for b in range(16):
        for s in range(4):
            if torch.equal(out[b, s], wav[b, s]):
                kept += 1
            else:
                assert torch.equal(out[b, s], wav[b, s].flip(0))
                swapped += 1
    assert swapped and kept
    mono = batch(c=1)
    assert torch.equal(augment.FlipChannels()(mono), mono)


def test_flip_sign():
    torch.manual_seed(0)
    wav = batch(b=16)
    out = augment.FlipSign()(wav)
    ratio = (out / wav)[..., 0, 0]
    assert set(ratio.round().unique().tolist()) == {-1., 1.}
    assert torch.equal(out.abs(), wav.abs())
    assert torch.equal(augment.FlipSign().eval()(wav), wav)


def test_scale_range_and_proba():
    torch.manual_seed(0)
    wav = batch(b=32).abs() + 0.1
    out = augment.Scale(proba=1, min=0.25, max=1.25)(wav)
    gains = out / wav
    per_source = gains[..., 0, 0]
    torch.testing.assert_close(gains, per_source[..., None, None].expand_as(gains))
    assert per_source.min() >= 0.25 and per_source.max() <= 1.25
    assert per_source.std() > 0.1
    assert torch.equal(augment.Scale(proba=0)(wav), wav)


def test_remix_permutes_sources_within_groups():
    torch.manual_seed(0)
    b, s = 8, 4
    wav = torch.arange(b * s, dtype=torch.float32).view(b, s, 1, 1).expand(b, s, 2, 16)
    out = augment.Remix(proba=1, group_size=4)(wav)
    ids = out[..., 0, 0].long()
    for group in range(2):
        rows = ids[group * 4:(group + 1) * 4]
        for source in range(s):
            expected = {(group * 4 + k) * s + source for k in range(4)}
            assert set(rows[:, source].tolist()) == expected
    assert not torch.equal(out, wav)


def test_remix_errors_on_indivisible_batch():
    with pytest.raises(ValueError, match="group_size=4"):
        augment.Remix(group_size=4)(batch(b=6))
    assert augment.Remix(group_size=0)(batch(b=6)).shape == (6, 4, 2, 64)


def test_training_pipeline_shape_and_determinism():
    def pipeline():
        return torch.nn.Sequential(augment.Shift(8, same=False), augment.FlipChannels(),
                                   augment.FlipSign(), augment.Scale(), augment.Remix())

    torch.manual_seed(3)
    first = pipeline()(batch())
    torch.manual_seed(3)
    second = pipeline()(batch())
    assert first.shape == (8, 4, 2, 56)
    assert torch.equal(first, second)


def test_augmentation_from_config_follows_the_config_keys():
    from omegaconf import OmegaConf
    from demucs.augment import augmentation_from_config
    args = OmegaConf.create({
        "dset": {"samplerate": 100, "shift": 0.5},
        "augment": {"shift_same": True, "flip": True,
                    "scale": {"proba": 1, "min": 0.25, "max": 1.25},
                    "remix": {"proba": 0, "group_size": 4}}})
    pipeline = augmentation_from_config(args)
    assert [type(m).__name__ for m in pipeline] == ["Shift", "FlipChannels", "FlipSign", "Scale"]
    assert pipeline[0].shift == 50 and pipeline[0].same
    args.augment.flip = False
    args.augment.scale.proba = 0
    args.augment.remix.proba = 1
    assert [type(m).__name__ for m in augmentation_from_config(args)] == ["Shift", "Remix"]


# ------------------------------------------------------------------ example augmentations
def _tones(seconds: float = 2., samplerate: int = 44100) -> torch.Tensor:
    """`[4, 2, T]` stems: a tone per stem and channel, at full scale times 2.5 (normalised data
    is not bounded by 1)."""
    time = torch.arange(int(seconds * samplerate)) / samplerate
    freqs = torch.tensor([110., 220., 440., 880.])[:, None, None] * torch.tensor([1., 1.5])[:, None]
    return 2.5 * torch.sin(2 * torch.pi * freqs * time)


@pytest.mark.parametrize("bitrate", [64, 128, 320])
def test_mp3_round_trip_keeps_length_alignment_and_level(bitrate):
    from demucs.audio import mp3_round_trip
    stem = _tones()[0]
    coded = mp3_round_trip(stem, 44100, bitrate)
    assert coded.shape == stem.shape and coded.dtype == stem.dtype
    error = (coded - stem).square().mean() / stem.square().mean()
    assert error < 0.01  # aligned: a shift of one sample would already cost more at 110 Hz
    assert coded.abs().max() == pytest.approx(2.5, rel=0.05)
    with pytest.raises(ValueError, match="32000, 44100 or 48000"):
        mp3_round_trip(stem, 8000, bitrate)


def test_lossy_codec_codes_the_chosen_stems_only():
    torch.manual_seed(0)
    example = _tones(1.)
    assert augment.LossyCodec(44100, proba=0., bitrates=[128])(example) is example
    coded = augment.LossyCodec(44100, proba=1., bitrates=[64, 128])(example)
    assert coded.shape == example.shape and torch.isfinite(coded).all()
    assert all(not torch.equal(coded[index], example[index]) for index in range(4))
    assert torch.equal(example, _tones(1.))  # the input is not modified
    with pytest.raises(ValueError, match="at least 64 kbps"):
        augment.LossyCodec(44100, proba=1., bitrates=[32, 128])
    with pytest.raises(ValueError, match="dset.samplerate"):
        augment.LossyCodec(8000, proba=1., bitrates=[128])


@given(max_db=st.floats(0.5, 12), seed=st.integers(0, 1000))
@settings(max_examples=15, deadline=None, derandomize=True, database=None)
def test_random_eq_gains_stay_within_max_db(max_db, seed):
    torch.manual_seed(seed)
    example = _tones(0.5)
    out = augment.RandomEQ(44100, proba=1., max_db=max_db)(example)
    ratio_db = 10 * torch.log10(out.square().mean(-1) / example.square().mean(-1))
    assert ratio_db.abs().max() <= max_db + 0.1  # each tone lies in one band: its band's gain
    assert not torch.allclose(out, example)


def test_random_eq_without_gain_is_the_identity_and_checks_its_bands():
    example = _tones(0.5)
    flat = augment.RandomEQ(44100, proba=1., max_db=0.)(example)
    assert torch.allclose(flat, example, atol=1e-4)
    with pytest.raises(ValueError, match="cutoffs"):
        augment.RandomEQ(8000, proba=1., cutoffs=(300, 5000))


def test_example_augmentations_from_the_config():
    from omegaconf import OmegaConf
    args = OmegaConf.create({"dset": {"samplerate": 44100}, "augment": {
        "codec": {"proba": 0.5, "bitrates": [96]}, "eq": {"proba": 0, "max_db": 6}}})
    transforms = augment.example_augmentations(args)
    assert [type(t).__name__ for t in transforms] == ["LossyCodec"]
    args.augment.eq.proba = 0.3
    dataset = augment.AugmentedExamples([_tones(0.2)], augment.example_augmentations(args))
    assert len(dataset) == 1 and dataset[0].shape == _tones(0.2).shape
    del args.augment["codec"], args.augment["eq"]  # configs made before these keys
    assert augment.example_augmentations(args) == []


@pytest.mark.parametrize("module", [augment.Scale(proba=0.), augment.Remix(proba=0., group_size=2),
                                    augment.Scale(proba=1.), augment.Remix(proba=1., group_size=2)])
def test_scale_and_remix_decide_with_python_random_as_the_official_trainer(module):
    """The random-draw contract (issue 16): one `random.random()` per batch, even at proba 0,
    and torch's generator only for the gains or the permutation themselves."""
    import random
    wav = torch.randn(4, 4, 2, 16)
    module.train()
    random.seed(7)
    expected_next = (random.random(), random.random())[1]
    random.seed(7)
    torch.manual_seed(0)
    torch_state = torch.get_rng_state()
    module(wav)
    assert random.random() == expected_next  # exactly one Python draw was used
    assert torch.equal(torch.get_rng_state(), torch_state) == (module.proba == 0)
