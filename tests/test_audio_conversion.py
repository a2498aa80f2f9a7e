"""Conversions: channel counts, resampling, clipping modes and PCM sample types."""
from hypothesis import given, settings, strategies as st
import numpy as np
import pytest
import torch

from demucs.audio_conversion import (as_dtype_pcm, convert_audio, convert_audio_channels,
                                     f32_pcm, i16_pcm, prevent_clip)

SR = 44100


@pytest.mark.parametrize("src, dst, expected", [(2, 1, 1), (1, 2, 2), (3, 2, 2), (2, 2, 2)])
def test_convert_audio_channels_shapes(src, dst, expected):
    wav = torch.randn(4, src, 100)
    out = convert_audio_channels(wav, dst)
    assert out.shape == (4, expected, 100)
    if dst == 1:
        assert torch.allclose(out[:, 0], wav.mean(1))
    elif src >= dst:
        assert torch.equal(out, wav[:, :dst])
    else:
        assert torch.equal(out[:, 1], wav[:, 0])


def test_convert_audio_channels_refuses_upmix_from_stereo():
    with pytest.raises(ValueError, match="2 channels to 3"):
        convert_audio_channels(torch.zeros(2, 10), 3)


def test_convert_audio_resamples_and_converts():
    out = convert_audio(torch.randn(2, 1, SR), SR, 22050, channels=2)
    assert out.shape == (2, 2, 22050)


def test_prevent_clip_modes():
    wav = torch.linspace(-3, 3, 101)
    assert prevent_clip(wav, "rescale").abs().max().item() == pytest.approx(1 / 1.01)
    assert torch.equal(prevent_clip(wav * 0.1, "rescale"), wav * 0.1)
    assert prevent_clip(wav, "clamp").abs().max().item() == pytest.approx(0.99)
    assert torch.allclose(prevent_clip(wav, "tanh"), torch.tanh(wav))
    assert prevent_clip(wav, "none") is wav and prevent_clip(wav, None) is wav
    with pytest.raises(ValueError, match="'loud'"):
        prevent_clip(wav, "loud")


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(-2 ** 15 + 1, 2 ** 15 - 1), min_size=1, max_size=64))
def test_pcm_int16_float_round_trip(values):
    pcm = torch.tensor(values, dtype=torch.int16)
    as_float = f32_pcm(pcm)
    assert as_float.abs().max().item() <= 1
    assert torch.equal(i16_pcm(as_float), pcm)
    assert torch.equal(as_dtype_pcm(as_dtype_pcm(pcm, torch.float32), torch.int16), pcm)


def test_i16_pcm_clamps_float():
    assert i16_pcm(torch.tensor([-2.0, 0.5, 2.0])).tolist() == [-32767, 16384, 32767]
    np.testing.assert_array_equal(f32_pcm(torch.tensor([0.25])).numpy(), [0.25])
