"""Multichannel Wiener filtering of source magnitude estimates (used by non-cac HDemucs / HTDemucs).

Same interface and maths as Open-Unmix's `filtering.wiener` (which Demucs used), without depending
on it: the source estimates get the mixture phase, then a few expectation-maximisation iterations
re-estimate each source's power spectral density `v_j(t, f)` and spatial covariance `R_j(f)` and
re-filter the mixture with the multichannel Wiener gains `v_j R_j Cxx⁻¹`, where
`Cxx = Σ_j v_j R_j + √eps·I`.

Tensors follow Open-Unmix's layout: complex values as a trailing dimension of size 2 (real, imag),
frames first: mixture [frames, bins, channels, 2], sources [frames, bins, channels, (2,) sources].
Internally the computation uses torch complex tensors.
"""
import typing as tp

import torch


def atan2(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Element-wise angle of `x + iy` in radians (0 where both are 0), as `torch.atan2`; kept
    because Demucs 4.1 exposes it here (its own copy modifies `x` in place, this one does not)."""
    return torch.atan2(y, x)


def _to_complex(x: torch.Tensor) -> torch.Tensor:
    return torch.complex(x[..., 0], x[..., 1])


def _sources_to_real(y: torch.Tensor) -> torch.Tensor:
    """Complex sources [..., channels, sources] → real [..., channels, 2, sources]."""
    return torch.view_as_real(y).transpose(-1, -2)


def _invert(matrices: torch.Tensor) -> torch.Tensor:
    """Inverse of complex [..., C, C] matrices, in closed form for 1×1 and 2×2 (the audio cases)."""
    channels = matrices.shape[-1]
    if channels == 1:
        return 1 / matrices
    if channels == 2:
        a, b = matrices[..., 0, 0], matrices[..., 0, 1]
        c, d = matrices[..., 1, 0], matrices[..., 1, 1]
        inv_det = 1 / (a * d - b * c)
        rows = [torch.stack([d, -b], dim=-1), torch.stack([-c, a], dim=-1)]
        return torch.stack(rows, dim=-2) * inv_det[..., None, None]
    return torch.linalg.inv(matrices)


def _source_model(y: torch.Tensor, eps: float) -> tp.Tuple[torch.Tensor, torch.Tensor]:
    """Power spectral densities v [T, F, S] (channel-averaged power) and spatial covariances
    R [F, C, C, S] (frame sums of y yᴴ, normalised by the total power of each bin)."""
    power = y.real ** 2 + y.imag ** 2
    v = power.mean(dim=-2)
    covariance = torch.einsum("tfcs,tfds->fcds", y, y.conj())
    weight = eps + v.sum(dim=0)  # F, S
    return v, covariance / weight[:, None, None, :]


def _refilter(x: torch.Tensor, v: torch.Tensor, R: torch.Tensor, eps: float) -> torch.Tensor:
    """Applies the multichannel Wiener gains v_j R_j Cxx⁻¹ to the mixture x [T, F, C]."""
    channels = x.shape[-1]
    regularization = eps ** 0.5 * torch.eye(channels, dtype=x.dtype, device=x.device)
    spatial = R.permute(3, 0, 1, 2)  # S, F, C, C
    weighted = v.permute(2, 0, 1)[..., None, None] * spatial[:, None]  # S, T, F, C, C
    inv_cxx = _invert(regularization + weighted.sum(dim=0))  # T, F, C, C
    gains = weighted @ inv_cxx  # S, T, F, C, C
    y = gains @ x[None, ..., None]  # S, T, F, C, 1
    return y[..., 0].permute(1, 2, 3, 0)


def expectation_maximization(y: torch.Tensor, x: torch.Tensor, iterations: int = 2,
                             eps: float = 1e-10, batch_size: int = 200):
    """Refines source estimates so that they are consistent with the multichannel mixture.

    Args:
        y: initial source estimates [frames, bins, channels, 2, sources].
        x: mixture STFT [frames, bins, channels, 2].
        iterations: number of EM iterations.
        eps: regularisation (√eps on the mixture covariance diagonal, eps on the weights).
        batch_size: frames re-filtered at once (bounds memory).

    Returns:
        (y, v, R): refined estimates (same shape as `y`), power spectral densities
        [frames, bins, sources] and the list of per-source spatial covariances
        [bins, channels, channels, 2].
    """
    sources = _to_complex(y.transpose(-1, -2))  # T, F, C, S
    mix = _to_complex(x)
    frames, bins, channels, num_sources = sources.shape
    v = x.new_zeros(frames, bins, num_sources)
    R = sources.new_zeros(bins, channels, channels, num_sources)
    step = batch_size or frames
    for _ in range(iterations):
        v, R = _source_model(sources, eps)
        sources = torch.cat([_refilter(mix[pos:pos + step], v[pos:pos + step], R, eps)
                             for pos in range(0, frames, step)], dim=0)
    covariances = [torch.view_as_real(R[..., j]) for j in range(R.shape[-1])]
    return _sources_to_real(sources), v, covariances


def wiener(targets_spectrograms: torch.Tensor, mix_stft: torch.Tensor, iterations: int = 1,
           softmask: bool = False, residual: bool = False, scale_factor: float = 10.0,
           eps: float = 1e-10) -> torch.Tensor:
    """Complex source STFTs from source magnitude estimates and the mixture STFT.

    Args:
        targets_spectrograms: source magnitudes [frames, bins, channels, sources].
        mix_stft: mixture STFT [frames, bins, channels, 2].
        iterations: EM refinement iterations (0: no refinement).
        softmask: start from ratio masks of the mixture instead of the magnitudes with the mixture
            phase.
        residual: add a last source, the mixture minus the sum of the others.
        scale_factor: the mixture is divided by max(1, max|mix| / scale_factor) during EM for
            numerical stability.
        eps: regularisation.

    Returns:
        source STFTs [frames, bins, channels, 2, sources (+1 with residual)].
    """
    mix = _to_complex(mix_stft)
    if softmask:
        total = eps + targets_spectrograms.sum(dim=-1, keepdim=True)
        y = mix[..., None] * (targets_spectrograms / total)
    else:
        angle = torch.atan2(mix.imag, mix.real)[..., None]
        y = torch.complex(targets_spectrograms * torch.cos(angle),
                          targets_spectrograms * torch.sin(angle))
    if residual:
        y = torch.cat([y, mix[..., None] - y.sum(dim=-1, keepdim=True)], dim=-1)
    if iterations == 0:
        return _sources_to_real(y)
    one = torch.ones((), dtype=mix_stft.dtype, device=mix_stft.device)
    max_abs = torch.maximum(one, mix.abs().max() / scale_factor)
    refined = expectation_maximization(_sources_to_real(y / max_abs), mix_stft / max_abs,
                                       iterations, eps=eps)[0]
    return refined * max_abs
