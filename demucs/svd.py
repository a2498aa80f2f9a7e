"""Penalty on the largest singular value of each weight matrix (`svd.*` config), which keeps the
layers' Lipschitz constants small and makes the model more robust."""
import random
import typing as tp

import torch
from torch import nn


def power_iteration(m: torch.Tensor, niters: int = 1, bs: int = 1) -> torch.Tensor:
    """Estimate the largest eigenvalue of the square symmetric matrix `m` with `niters` power
    iterations, averaged over `bs` random start vectors."""
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"power_iteration needs a square matrix, got shape {tuple(m.shape)}")
    vectors = torch.randn(m.shape[0], bs, device=m.device, dtype=m.dtype)
    norm = torch.zeros(1, bs, device=m.device, dtype=m.dtype)
    for _ in range(niters):
        product = m.mm(vectors)
        norm = product.norm(dim=0, keepdim=True)
        vectors = product / (1e-10 + norm)
    return norm.mean()


# Shared generator deciding whether a call computes the penalty (`proba`), seeded for
# reproducibility.
penalty_rng = random.Random(1234)


def _as_matrix(module: nn.Module, param: torch.Tensor, convtr: bool, conv_only: bool
               ) -> tp.Optional[torch.Tensor]:
    """The 2-D view of `param` the penalty applies to, or None when it is skipped."""
    transposed = isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d))
    if convtr and transposed and param.dim() in [3, 4]:
        param = param.transpose(0, 1).contiguous()
    if param.dim() in [3, 4]:
        return param.view(len(param), -1)
    if param.dim() == 1 or conv_only:
        return None
    return param


def _largest_sv_squared(matrix: torch.Tensor, dim: int, niters: int, powm: bool, exact: bool,
                        bs: int) -> torch.Tensor:
    if exact:
        return torch.linalg.svdvals(matrix).max().pow(2)
    if powm:
        rows, cols = matrix.shape
        gram = matrix.mm(matrix.t()) if rows < cols else matrix.t().mm(matrix)
        return power_iteration(gram, niters, bs)
    return torch.svd_lowrank(matrix, dim, niters)[1][0].pow(2)


def svd_penalty(model: nn.Module, min_size: float = 0.1, dim: int = 1, niters: int = 2,
                powm: bool = False, convtr: bool = True, proba: float = 1, conv_only: bool = False,
                exact: bool = False, bs: int = 1) -> tp.Union[float, torch.Tensor]:
    """Sum over weight matrices of their largest singular value squared, divided by `proba`.

    Args:
        min_size: only parameters of at least `min_size` MB in float32 (`numel / 2**18`) count.
        dim: rank of the randomized low-rank SVD (`torch.svd_lowrank`).
        niters: iterations of the low-rank SVD or of the power method.
        powm: use the power method on the Gram matrix instead of the low-rank SVD.
        convtr: transpose ConvTranspose weights so that rows are output channels.
        proba: the penalty is computed with this probability (and rescaled by 1 / proba), else 0.
        conv_only: skip 2-D (linear) weights, keeping convolutions only.
        exact: use the exact SVD (for validation metrics).
        bs: number of start vectors of the power method.
    """
    if penalty_rng.random() > proba:
        return 0.
    total: tp.Union[float, torch.Tensor] = 0.
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.numel() / 2 ** 18 < min_size:
                continue
            matrix = _as_matrix(module, param, convtr, conv_only)
            if matrix is None:
                continue
            total = total + _largest_sv_squared(matrix, dim, niters, powm, exact, bs)
    return total / proba
