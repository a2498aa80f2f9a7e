"""When the models may take their faster CPU inference paths, and a switch that turns them off.

Without autograd on the CPU, the models compute some layers another way than upstream Demucs does
(the DConv branches as one matrix product with the GroupNorm folded into the 1x1 convolution, the
transposed convolutions as phase convolutions, the attention through
`scaled_dot_product_attention`, the token GroupNorm as a layer norm, the overlap-add of
`apply_model` as one fused multiply-add, windows of a channel-last track fed in that layout). They
give the same values up to float rounding, and are what separation uses.

Inside `upstream_rounding()` every model and `apply_model` compute in upstream's order of
operations instead, so that the same weights give bit-for-bit upstream's numbers on CPU: the
solver validates and tests inside it, which makes a run's valid loss and nSDRs those of the
official trainer. Training (autograd on) always takes upstream's order, switch or not.

The switch is process-wide (not per thread): `apply_model` may run its segments in a thread pool.
"""
import contextlib
import typing as tp

import torch

_depth = 0


@contextlib.contextmanager
def upstream_rounding() -> tp.Iterator[None]:
    """Within this block, models and `apply_model` round exactly as upstream Demucs does."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def exact() -> bool:
    """Whether `upstream_rounding()` is in force."""
    return _depth > 0


def fast_cpu_inference(x: torch.Tensor) -> bool:
    """Whether a layer computing `x` may take its faster CPU inference path: no autograd, a CPU
    tensor, and no `upstream_rounding()` in force."""
    return not torch.is_grad_enabled() and x.device.type == "cpu" and _depth == 0
