"""Tests for demucs.repitch (needs the soundstretch program, else the tests needing it skip)."""
import math
import shutil

import pytest
import torch

from demucs import repitch as rp

needs_soundstretch = pytest.mark.skipif(shutil.which("soundstretch") is None,
                                        reason="soundstretch is not installed")
SR = 16000


def tone(freq=440., seconds=1.0, channels=2):
    t = torch.arange(int(seconds * SR)) / SR
    return (0.5 * torch.sin(2 * math.pi * freq * t)).expand(channels, -1).contiguous()


def dominant_frequency(wav: torch.Tensor) -> float:
    spectrum = torch.fft.rfft(wav[0]).abs()
    return spectrum.argmax().item() * SR / wav.shape[-1]


@needs_soundstretch
@pytest.mark.parametrize("tempo", [-12., 0., 10.])
def test_repitch_tempo_changes_length(tempo):
    out = rp.repitch(tone(), 0, tempo, samplerate=SR)
    assert out.shape[0] == 2
    assert out.shape[1] == pytest.approx(SR / (1 + tempo / 100), rel=0.01)


@needs_soundstretch
def test_repitch_pitch_moves_frequency():
    out = rp.repitch(tone(440.), 2, 0, samplerate=SR)
    assert dominant_frequency(out) == pytest.approx(440 * 2 ** (2 / 12), rel=0.02)


class Stems:
    """A dataset of identical-tone 4-stem examples."""

    def __init__(self, length=4):
        self.length = length
        self.samplerate = SR

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return torch.stack([tone(220. * (1 + k)) for k in range(4)])


def test_wrapper_always_crops():
    wrapped = rp.RepitchedWrapper(Stems(), proba=0, max_tempo=12)
    item = wrapped[0]
    assert len(wrapped) == 4
    assert item.shape == (4, 2, int(0.88 * SR))
    torch.testing.assert_close(item, Stems()[0][..., :int(0.88 * SR)])


@needs_soundstretch
def test_wrapper_repitches_all_stems_alike():
    import random
    random.seed(0)
    wrapped = rp.RepitchedWrapper(Stems(), proba=1, max_pitch=2, max_tempo=12, tempo_std=5)
    item = wrapped[0]
    assert item.shape == (4, 2, int(0.88 * SR))
    ratios = [dominant_frequency(item[k]) / (220. * (1 + k)) for k in range(4)]
    assert max(ratios) - min(ratios) < 0.03


def test_missing_soundstretch_fails_early(monkeypatch):
    monkeypatch.setattr(rp, "SOUNDSTRETCH", "soundstretch-not-installed-anywhere")
    with pytest.raises(rp.SoundstretchMissingError, match="augment.repitch.proba=0"):
        rp.RepitchedWrapper(Stems(), proba=0.2)
    with pytest.raises(rp.SoundstretchMissingError, match="apt-get install soundstretch"):
        rp.check_soundstretch()
    assert len(rp.RepitchedWrapper(Stems(), proba=0)) == 4


@needs_soundstretch
def test_repitch_keep_level_keeps_loud_signals_intact():
    """Normalized examples exceed 1: with keep_level, no clipping, no garbage (soundstretch
    misreads float wavs)."""
    wav = 5 * torch.randn(2, SR, generator=torch.Generator().manual_seed(0))
    out = rp.repitch(wav, 0, 0, samplerate=SR, keep_level=True)
    assert out.shape == wav.shape
    assert ((out - wav).norm() / wav.norm()).item() < 0.01


def test_repitch_clamps_like_the_official_trainer_by_default():
    """The default hands soundstretch what the official trainer does (clamped to 0.99, 16-bit):
    a quiet signal comes back as it went (to 16-bit precision), a loud one clipped."""
    quiet = 0.3 * torch.randn(2, SR, generator=torch.Generator().manual_seed(0))
    quiet = quiet.clamp(-0.9, 0.9)
    assert (rp.repitch(quiet, 0, 0, samplerate=SR) - quiet).abs().max() < 2e-3
    loud = rp.repitch(5 * quiet, 0, 0, samplerate=SR)
    assert loud.abs().max() <= rp.OFFICIAL_CLAMP + 1e-3
