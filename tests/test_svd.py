"""svd_penalty against exact singular values; power iteration on a known spectrum."""
import pytest
import torch
from torch import nn

from demucs import svd
from demucs.svd import power_iteration, svd_penalty


def _largest_sv2(matrix: torch.Tensor) -> float:
    return float(torch.linalg.svdvals(matrix.detach()).max() ** 2)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(8, 16, 3), nn.ConvTranspose1d(16, 4, 5), nn.Linear(12, 6))


def test_exact_penalty_is_sum_of_largest_singular_values_squared():
    model = _model()
    conv, convtr, linear = model
    expected = (_largest_sv2(conv.weight.view(16, -1))
                + _largest_sv2(convtr.weight.transpose(0, 1).reshape(4, -1))
                + _largest_sv2(linear.weight))
    got = svd_penalty(model, min_size=0, exact=True)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_conv_only_skips_linear_and_min_size_skips_small():
    model = _model()
    conv, convtr, _ = model
    expected = (_largest_sv2(conv.weight.view(16, -1))
                + _largest_sv2(convtr.weight.transpose(0, 1).reshape(4, -1)))
    assert float(svd_penalty(model, min_size=0, exact=True, conv_only=True)) == pytest.approx(
        expected, rel=1e-5)
    assert svd_penalty(model, min_size=1, exact=True) == 0.


@pytest.mark.parametrize("powm", [False, True])
def test_estimates_are_close_to_exact(powm):
    model = _model()
    exact = float(svd_penalty(model, min_size=0, exact=True))
    torch.manual_seed(1)
    estimate = float(svd_penalty(model, min_size=0, dim=4, niters=30, powm=powm, bs=4))
    assert estimate == pytest.approx(exact, rel=0.05)


def test_power_iteration_finds_top_eigenvalue():
    torch.manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(6, 6))
    matrix = basis @ torch.diag(torch.tensor([9., 3., 2., 1., .5, .1])) @ basis.t()
    assert float(power_iteration(matrix, niters=60)) == pytest.approx(9., rel=1e-4)
    with pytest.raises(ValueError, match="square"):
        power_iteration(torch.randn(3, 4))


def test_proba_skips_and_rescales(monkeypatch):
    model = _model()
    exact = float(svd_penalty(model, min_size=0, exact=True))
    monkeypatch.setattr(svd.penalty_rng, "random", lambda: 0.9)
    assert svd_penalty(model, min_size=0, exact=True, proba=0.5) == 0.
    monkeypatch.setattr(svd.penalty_rng, "random", lambda: 0.1)
    rescaled = float(svd_penalty(model, min_size=0, exact=True, proba=0.5))
    assert rescaled == pytest.approx(2 * exact, rel=1e-5)
