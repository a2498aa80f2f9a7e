"""Spectrograms on real tensors for the ONNX export: the PyTorch side of the transforms equals
`demucs.spec`'s, and a hop that does not divide n_fft is refused. Needs no ONNX package."""
import pytest
import torch

from demucs.onnx_spectrogram import OnnxExportError, real_istft, real_stft
from demucs.spec import ispectro, spectro


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).norm() / reference.norm())


def test_real_transforms_match_torch_stft():
    """The real-valued STFT/iSTFT of the export equal demucs.spec's (PyTorch side)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5000)
    z = spectro(x, 512, 128)
    real = real_stft(x, 512, 128)
    assert real.shape == (2, 3, 2, 257, z.shape[-1])
    assert relative_error(real, torch.stack([z.real, z.imag], dim=2)) < 1e-6
    back = real_istft(real, 128, 5000)
    assert relative_error(back, ispectro(z, 128, 5000)) < 1e-6
    assert relative_error(back, x) < 1e-5


def test_inverse_refuses_a_hop_that_does_not_divide_n_fft():
    with pytest.raises(OnnxExportError, match=r"n_fft \(512\) to be a multiple of the hop "
                                              r"length \(100\)"):
        real_istft(torch.zeros(1, 2, 257, 10), 100, 1000)
