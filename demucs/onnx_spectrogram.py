"""Spectrograms on real tensors, for the ONNX export of hybrid models (`demucs.onnx_export`).

ONNX has no complex tensors: here a complex spectrogram [..., Fr, T] is a real one
[..., 2, Fr, T] (real part first). `real_stft` and `real_istft` are `demucs.spec`'s transforms
(same Hann window, padding and normalisation) written with the ONNX `STFT` and `DFT` operators,
and `RealSpectrogramMixin` puts them, with the masking, in place of a model's complex code.
"""
import math

import torch
from torch.nn import functional as F


class OnnxExportError(ValueError):
    """A model (or an export option) that cannot be exported to ONNX; the message says why."""


def _int64_constant(g, value: int):
    return g.op("Constant", value_t=torch.tensor(value, dtype=torch.int64))


class _FramesDft(torch.autograd.Function):
    """Onesided DFT of the windowed frames of real signals: [N, L] → [N, frames, bins, 2].

    Computed by `torch.stft` (no centring, no normalisation) in PyTorch, written as the ONNX
    `STFT` operator in the graph."""

    @staticmethod
    def forward(ctx, signal: torch.Tensor, window: torch.Tensor,  # type: ignore[override]
                hop: int) -> torch.Tensor:
        spec = torch.stft(signal, window.shape[-1], hop, window=window, center=False,
                          return_complex=True)
        return torch.view_as_real(spec).transpose(1, 2)

    @staticmethod
    def symbolic(g, signal, window, hop: int):
        axes = g.op("Constant", value_t=torch.tensor([-1], dtype=torch.int64))
        signal = g.op("Unsqueeze", signal, axes)
        return g.op("STFT", signal, _int64_constant(g, hop), window, onesided_i=1)


class _FramesInverseDft(torch.autograd.Function):
    """Inverse of a onesided DFT, frame by frame: [N, frames, bins, 2] → real [N, frames, n_fft].

    The imaginary parts of the first and last bins are ignored, as by `torch.fft.irfft`, which
    computes it in PyTorch; the graph uses the ONNX `DFT` operator (inverse, onesided)."""

    @staticmethod
    def forward(ctx, spec: torch.Tensor, n_fft: int) -> torch.Tensor:  # type: ignore[override]
        return torch.fft.irfft(torch.view_as_complex(spec), n=n_fft, dim=-1)

    @staticmethod
    def symbolic(g, spec, n_fft: int):
        frames = g.op("DFT", spec, _int64_constant(g, n_fft), axis_i=2, inverse_i=1, onesided_i=1)
        axes = g.op("Constant", value_t=torch.tensor([-1], dtype=torch.int64))
        return g.op("Squeeze", frames, axes)


def _hann(n_fft: int, like: torch.Tensor) -> torch.Tensor:
    return torch.hann_window(n_fft, dtype=like.dtype, device=like.device)


def real_stft(x: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """`demucs.spec.spectro(x, n_fft, hop)` with real and imaginary parts in a dimension of
    their own: [..., T] → [..., 2, n_fft // 2 + 1, frames]."""
    *leading, length = x.shape
    flat = F.pad(x.reshape(1, -1, length), (n_fft // 2, n_fft // 2), mode="reflect")[0]
    spec = _FramesDft.apply(flat, _hann(n_fft, x), hop) / math.sqrt(n_fft)
    _, frames, bins, _ = spec.shape
    return spec.permute(0, 3, 2, 1).reshape(*leading, 2, bins, frames)


def overlap_add(frames: torch.Tensor, hop: int) -> torch.Tensor:
    """Sums frames [N, F, n_fft] placed `hop` samples apart: [N, (F - 1) * hop + n_fft].

    `n_fft` must be a multiple of `hop`: each frame is cut in `n_fft // hop` blocks, and the
    block sequences are added with shifts of whole blocks (pads and adds, cheap in ONNX)."""
    count, num_frames, n_fft = frames.shape
    blocks = int(n_fft // hop)
    pieces = frames.reshape(count, num_frames, blocks, hop)
    total = None
    for index in range(blocks):
        piece = F.pad(pieces[:, :, index].reshape(count, num_frames * hop),
                      (index * hop, (blocks - 1 - index) * hop))
        total = piece if total is None else total + piece
    assert total is not None
    return total


def _inverse_envelope(window: torch.Tensor, hop: int, frames: int) -> torch.Tensor:
    """1 / Σ_t window²(n - t·hop): what `torch.istft` divides the overlap-added frames by."""
    squares = (window ** 2).expand(1, frames, -1)
    return 1 / overlap_add(squares, hop)[0]


def real_istft(z: torch.Tensor, hop: int, length: int) -> torch.Tensor:
    """`demucs.spec.ispectro(z, hop, length)` for real spectrograms [..., 2, bins, frames]
    (as made by `real_stft`): → [..., length]."""
    *leading, _, bins, frames = z.shape
    n_fft = int(2 * bins - 2)  # a plain int: the tracer turns shapes into tensors
    if n_fft % hop:
        raise OnnxExportError(f"the ONNX inverse STFT needs n_fft ({n_fft}) to be a multiple "
                              f"of the hop length ({hop})")
    spec = z.reshape(-1, 2, bins, frames).permute(0, 3, 2, 1)
    window = _hann(n_fft, z)
    frames_out = _FramesInverseDft.apply(spec.contiguous(), n_fft)
    signal = overlap_add(frames_out * (window * math.sqrt(n_fft)), hop)
    start = n_fft // 2
    envelope = _inverse_envelope(window, hop, int(frames))[start:start + length]
    signal = signal[:, start:start + length] * envelope
    if signal.shape[-1] < length:  # torch.istft zero pads past the last frame
        signal = F.pad(signal, (0, length - signal.shape[-1]))
    return signal.reshape(*leading, length)


class RealSpectrogramMixin:
    """Spectrogram side of `HDemucs`/`HTDemucs` on real tensors, for export.

    Mixed in before the model's class (`demucs.onnx_export.exportable_copy`), it replaces the
    complex STFT, the network input, the masking and the inverse STFT; a spectrogram [..., Fr, T]
    complex becomes [..., 2, Fr, T] real (real part first), which keeps the last two dimensions
    where the model's own padding and cropping of bins and frames expect them."""

    nfft: int
    hop_length: int
    cac: bool
    training: bool
    wiener_iters: int
    end_iters: int
    wiener_residual: bool

    def _stft(self, x: torch.Tensor) -> torch.Tensor:
        return real_stft(x, self.nfft, self.hop_length)

    def _istft(self, z: torch.Tensor, hop: int, length: int) -> torch.Tensor:
        return real_istft(z, hop, length)

    def _magnitude(self, z: torch.Tensor) -> torch.Tensor:
        """[B, C, 2, Fr, T] → real and imaginary parts as channels [B, 2C, Fr, T] (cac), or the
        magnitude [B, C, Fr, T]."""
        if self.cac:
            batch, channels, parts, freqs, frames = z.shape
            return z.reshape(batch, channels * parts, freqs, frames)
        return z.square().sum(dim=2).sqrt()

    def _mask(self, z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Source spectrograms [B, S, C, 2, Fr, T] from the network output `m`: its values
        (cac), else the magnitudes `m` with the mixture's phase (without Wiener iterations)."""
        if self.cac:
            batch, sources, _, freqs, frames = m.shape
            return m.view(batch, sources, -1, 2, freqs, frames)
        magnitude = z.square().sum(dim=2, keepdim=True).sqrt()
        if (self.end_iters if self.training else self.wiener_iters) < 0:
            return z[:, None] / (1e-8 + magnitude[:, None]) * m[:, :, :, None]
        return _with_mixture_phase(z, magnitude, m)


def _with_mixture_phase(z: torch.Tensor, magnitude: torch.Tensor,
                        m: torch.Tensor) -> torch.Tensor:
    """`demucs.wiener.wiener(..., iterations=0)`: magnitudes `m` [B, S, C, Fr, T] times
    (cos, sin) of the mixture's angle, the angle of a zero bin being 0 (as `atan2(0, 0)`)."""
    zero = magnitude == 0
    unit = torch.where(zero, torch.ones_like(magnitude), magnitude)
    phase = z / unit
    phase = torch.where(zero, torch.tensor([1., 0.], dtype=z.dtype).view(2, 1, 1), phase)
    return phase[:, None] * m[:, :, :, None]
