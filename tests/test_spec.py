"""STFT helpers: shapes, leading dimensions, perfect reconstruction, window cache."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from demucs.spec import _hann_window, ispectro, spectro


@settings(max_examples=20, deadline=None)
@given(length=st.integers(min_value=300, max_value=3000),
       n_fft=st.sampled_from([64, 128, 256]),
       leading=st.sampled_from([(), (3,), (2, 2)]))
def test_round_trip_restores_signal(length, n_fft, leading):
    x = torch.randn(*leading, length, generator=torch.Generator().manual_seed(length))
    z = spectro(x, n_fft)
    y = ispectro(z, n_fft // 4, length=length)
    assert y.shape == x.shape
    assert torch.allclose(y, x, atol=1e-5)


def test_spectro_shape_keeps_leading_dims():
    x = torch.randn(2, 3, 4, 1000)
    z = spectro(x, 256, 64)
    assert z.is_complex()
    assert z.shape == (2, 3, 4, 129, 1000 // 64 + 1)  # centred frames


def test_default_hop_is_quarter_window():
    x = torch.randn(2, 1024)
    assert torch.equal(spectro(x, 128), spectro(x, 128, 32))


def test_pad_zero_pads_each_frame():
    x = torch.randn(1, 2048)
    z = spectro(x, 256, 64, pad=1)
    assert z.shape[-2] == 257  # FFT over 2 * 256 samples
    y = ispectro(z, 64, length=2048, pad=1)
    assert torch.allclose(y, x, atol=1e-5)


def test_normalized_transform_preserves_energy_scale():
    # normalized=True divides by sqrt(n_fft): a unit sine has its peak near
    # sqrt(n_fft) / 4 * window.
    n_fft = 256
    t = torch.arange(4096, dtype=torch.float32)
    x = torch.cos(2 * math.pi * 16 * t / n_fft)
    z = spectro(x, n_fft)
    peak = z.abs()[:, 10].argmax()
    assert peak == 16
    window_sum = torch.hann_window(n_fft).sum()
    expected = float(window_sum / 2 / math.sqrt(n_fft))
    assert z.abs()[16, 10].item() == pytest.approx(expected, rel=1e-3)


def test_window_is_cached_per_size_device_dtype():
    first = _hann_window(512, torch.device("cpu"), torch.float32)
    assert _hann_window(512, torch.device("cpu"), torch.float32) is first
    other = _hann_window(512, torch.device("cpu"), torch.float64)
    assert other.dtype == torch.float64 and other is not first
    assert torch.equal(first, torch.hann_window(512))


def test_float64_round_trip():
    x = torch.randn(2, 777, dtype=torch.float64)
    y = ispectro(spectro(x, 128), 32, length=777)
    assert y.dtype == torch.float64
    assert torch.allclose(y, x, atol=1e-10)
