"""Short-time Fourier transform helpers shared by the hybrid models (HDemucs, HTDemucs).

Both directions use a Hann window, `normalized=True` and centred frames with reflect padding, so
that `ispectro(spectro(x), length=x.shape[-1])` gives `x` back. Any number of leading dimensions
is kept.
"""
import typing as tp

import torch

_WINDOWS: tp.Dict[tp.Tuple[int, str, torch.dtype], torch.Tensor] = {}


def _hann_window(size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Hann window of `size` samples, built once per (size, device, dtype) and then reused."""
    key = (size, str(device), dtype)
    window = _WINDOWS.get(key)
    if window is None:
        window = torch.hann_window(size, device=device, dtype=dtype)
        _WINDOWS[key] = window
    return window


def _needs_cpu(device: torch.device) -> bool:
    """MPS has no complex FFT support, so the transforms run on the CPU there."""
    return device.type == "mps"


def spectro(x: torch.Tensor, n_fft: int = 512, hop_length: tp.Optional[int] = None,
            pad: int = 0) -> torch.Tensor:
    """Complex spectrogram of `x` [..., T] → [..., n_fft // 2 * (1 + pad) + 1, frames].

    Args:
        x: real signal, any leading dimensions.
        n_fft: window length in samples.
        hop_length: hop between frames, `n_fft // 4` when not given.
        pad: zero padding factor of each frame (the FFT size is `n_fft * (1 + pad)`).
    """
    *leading, length = x.shape
    flat = x.reshape(-1, length)
    device = flat.device
    if _needs_cpu(device):
        flat = flat.cpu()
    z = torch.stft(flat, n_fft * (1 + pad), hop_length or n_fft // 4,
                   window=_hann_window(n_fft, flat.device, flat.dtype), win_length=n_fft,
                   normalized=True, center=True, return_complex=True, pad_mode="reflect")
    _, freqs, frames = z.shape
    return z.view(*leading, freqs, frames)


def ispectro(z: torch.Tensor, hop_length: tp.Optional[int] = None,
             length: tp.Optional[int] = None, pad: int = 0) -> torch.Tensor:
    """Inverse of `spectro`: complex [..., freqs, frames] → real [..., length].

    Args:
        z: complex spectrogram, any leading dimensions.
        hop_length: hop between frames (the one given to `spectro`).
        length: number of output samples; when not given, what the frames cover.
        pad: the `pad` given to `spectro`.
    """
    *leading, freqs, frames = z.shape
    n_fft = 2 * freqs - 2
    win_length = n_fft // (1 + pad)
    flat = z.reshape(-1, freqs, frames)
    if _needs_cpu(flat.device):
        flat = flat.cpu()
    x = torch.istft(flat, n_fft, hop_length,
                    window=_hann_window(win_length, flat.device, flat.real.dtype),
                    win_length=win_length, normalized=True, length=length, center=True)
    _, out_length = x.shape
    return x.view(*leading, out_length)
