"""Transformer building blocks of HTDemucs (v4): embeddings, masks, layer scale,
self/cross-attention encoder layers and the cross-domain transformer encoder."""
import torch
from torch import nn


class LayerScale(nn.Module):
    """Learnt per-channel rescaling of a residual branch (CaiT-style layer scale).

    Starting from a small `init` lets a deep residual stack begin close to the identity.

    Args:
        channels: number of channels to scale.
        init: initial value of every per-channel scale.
        channel_last: if True the channel dimension is last (B, T, C), otherwise it is
            the second one (B, C, T).
    """

    def __init__(self, channels: int, init: float = 0, channel_last: bool = False):
        super().__init__()
        self.channel_last = channel_last
        self.scale = nn.Parameter(torch.full((channels,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_last:
            return self.scale * x
        return self.scale[:, None] * x
