"""Multichannel Wiener filter: shapes, mixture phase, residual, mixture consistency, reference
EM."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from demucs.wiener import expectation_maximization, wiener


def _problem(frames=6, bins=4, channels=2, sources=3, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    mags = torch.rand(frames, bins, channels, sources, generator=gen, dtype=dtype) * 2
    mix = torch.randn(frames, bins, channels, 2, generator=gen, dtype=dtype) * 3
    return mags, mix


def _complex(x):
    return x[..., 0, :] + 1j * x[..., 1, :]


def _reference_em(y, x, iterations, eps):
    """Straightforward per-bin, per-frame EM in numpy complex128 (loops, explicit inverses)."""
    frames, bins, channels, sources = y.shape
    for _ in range(iterations):
        v = np.mean(np.abs(y) ** 2, axis=2)
        R = np.zeros((sources, bins, channels, channels), dtype=complex)
        for j in range(sources):
            for f in range(bins):
                total = sum(np.outer(y[t, f, :, j], y[t, f, :, j].conj()) for t in range(frames))
                R[j, f] = total / (eps + v[:, f, j].sum())
        new = np.zeros_like(y)
        for t in range(frames):
            for f in range(bins):
                cxx = np.sqrt(eps) * np.eye(channels) + sum(
                    v[t, f, j] * R[j, f] for j in range(sources))
                inv = np.linalg.inv(cxx)
                for j in range(sources):
                    new[t, f, :, j] = v[t, f, j] * R[j, f] @ inv @ x[t, f]
        y = new
    return y


def test_output_shapes():
    mags, mix = _problem()
    assert wiener(mags, mix, 1).shape == (6, 4, 2, 2, 3)
    assert wiener(mags, mix, 1, residual=True).shape == (6, 4, 2, 2, 4)
    y, v, R = expectation_maximization(wiener(mags, mix, 0), mix, iterations=1)
    assert y.shape == (6, 4, 2, 2, 3) and v.shape == (6, 4, 3)
    assert len(R) == 3 and R[0].shape == (4, 2, 2, 2)


def test_no_iteration_gives_magnitudes_with_mixture_phase():
    mags, mix = _problem()
    y = _complex(wiener(mags, mix, 0))
    mix_c = torch.complex(mix[..., 0], mix[..., 1])
    assert torch.allclose(y.abs(), mags)
    phase_gap = y * mix_c[..., None].conj()  # real positive when the phases agree
    assert torch.allclose(phase_gap.imag, torch.zeros_like(phase_gap.imag), atol=1e-9)
    assert (phase_gap.real >= 0).all()


def test_softmask_splits_the_mixture_by_ratio():
    mags, mix = _problem()
    y = _complex(wiener(mags, mix, 0, softmask=True))
    mix_c = torch.complex(mix[..., 0], mix[..., 1])
    assert torch.allclose(y.sum(dim=-1), mix_c, atol=1e-8)
    ratios = mags / mags.sum(dim=-1, keepdim=True)
    assert torch.allclose(y.abs(), ratios * mix_c.abs()[..., None], atol=1e-8)


def test_residual_source_completes_the_mixture():
    mags, mix = _problem()
    y = _complex(wiener(mags, mix, 0, residual=True))
    mix_c = torch.complex(mix[..., 0], mix[..., 1])
    assert torch.allclose(y.sum(dim=-1), mix_c, atol=1e-10)


@settings(max_examples=10, deadline=None)
@given(channels=st.sampled_from([1, 2, 3]), iterations=st.integers(1, 3),
       seed=st.integers(0, 1000))
def test_filtered_sources_sum_to_the_mixture(channels, iterations, seed):
    mags, mix = _problem(channels=channels, seed=seed)
    y = _complex(wiener(mags, mix, iterations))
    mix_c = torch.complex(mix[..., 0], mix[..., 1])
    # Σ_j v_j R_j Cxx⁻¹ = I − √eps·Cxx⁻¹: only the regularisation leaks.
    leak = (y.sum(dim=-1) - mix_c).abs().max()
    assert leak < 1e-3 * mix_c.abs().max()


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("iterations", [1, 2])
def test_matches_reference_em(channels, iterations):
    eps = 1e-10
    mags, mix = _problem(frames=5, bins=3, channels=channels, seed=channels + iterations)
    y0 = _complex(wiener(mags, mix, 0)).numpy()
    x = torch.complex(mix[..., 0], mix[..., 1]).numpy()
    expected = _reference_em(y0, x, iterations, eps)
    # scale_factor large enough that no rescaling happens, so this compares EM alone.
    ours = _complex(wiener(mags, mix, iterations, scale_factor=1e9, eps=eps)).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-7, atol=1e-9)


def test_rescaling_only_changes_the_regularisation_weight():
    mags, mix = _problem(seed=3)
    scaled = _complex(wiener(mags * 100, mix * 100, 1))  # max|mix| / 10 > 1: rescaled inside
    plain = _complex(wiener(mags * 100, mix * 100, 1, scale_factor=1e12))
    assert not torch.equal(scaled, plain)
    assert (scaled - plain).abs().max() < 1e-4 * plain.abs().max()


def test_batches_of_frames_give_the_same_result():
    mags, mix = _problem(frames=9)
    y = wiener(mags, mix, 0)
    whole = expectation_maximization(y, mix, 2, batch_size=200)[0]
    batched = expectation_maximization(y, mix, 2, batch_size=4)[0]
    assert torch.allclose(whole, batched)


def test_gradients_flow_through_the_filter():
    mags, mix = _problem(dtype=torch.float32)
    mags.requires_grad_(True)
    wiener(mags, mix, 2).square().sum().backward()
    assert mags.grad is not None and torch.isfinite(mags.grad).all()
    assert mags.grad.abs().sum() > 0
