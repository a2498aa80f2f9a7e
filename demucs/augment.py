"""Augmentations of training batches of stems `[batch, sources, channels, time]`, on any device.

Each module is active only in training mode (except `Shift`, which also trims in eval mode so that
lengths match) and draws its randomness from torch's global generator.
"""
import typing as tp

import torch
from torch import nn


def _chance(proba: float) -> bool:
    """True with probability `proba`."""
    return proba > 0 and torch.rand(()).item() < proba


class Shift(nn.Module):
    """Random time shift: keep a window of `time - shift` samples starting at a random offset.

    Args:
        shift: maximum shift in samples; the output is `shift` samples shorter than the input.
        same: use one offset for all the sources of an example (keeps them aligned), otherwise each
            source gets its own offset (creates new mixtures).
    """

    def __init__(self, shift: int = 8192, same: bool = False):
        super().__init__()
        self.shift = shift
        self.same = same

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        if self.shift <= 0:
            return wav
        batch, sources, channels, time = wav.shape
        length = time - self.shift
        if not self.training:
            return wav[..., :length]
        groups = 1 if self.same else sources
        offsets = torch.randint(self.shift, (batch, groups, 1, 1), device=wav.device)
        offsets = offsets.expand(-1, sources, channels, -1)
        indexes = torch.arange(length, device=wav.device)
        return wav.gather(3, indexes + offsets)


class FlipChannels(nn.Module):
    """Randomly swap the left and right channels of each source of each example (stereo only)."""

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        batch, sources, channels, time = wav.shape
        if not self.training or channels != 2:
            return wav
        left = torch.randint(2, (batch, sources, 1, 1), device=wav.device)
        left = left.expand(-1, -1, -1, time)
        right = 1 - left
        return torch.cat([wav.gather(2, left), wav.gather(2, right)], dim=2)


class FlipSign(nn.Module):
    """Randomly multiply each source of each example by +1 or -1."""

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        batch, sources = wav.shape[:2]
        if not self.training:
            return wav
        signs = torch.randint(2, (batch, sources, 1, 1), device=wav.device, dtype=wav.dtype)
        return wav * (2 * signs - 1)


class Remix(nn.Module):
    """Shuffle each source across the examples of a group, making new mixtures.

    Args:
        proba: probability of remixing a batch.
        group_size: examples are remixed within consecutive groups of this size (the whole batch
            when 0); the batch size must be a multiple of it.
    """

    def __init__(self, proba: float = 1, group_size: int = 4):
        super().__init__()
        self.proba = proba
        self.group_size = group_size

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        batch, sources, channels, time = wav.shape
        if not self.training or not _chance(self.proba):
            return wav
        group_size = self.group_size or batch
        if batch % group_size != 0:
            raise ValueError(f"Remix: batch size {batch} is not a multiple of "
                             f"augment.remix.group_size={group_size}")
        groups = batch // group_size
        wav = wav.view(groups, group_size, sources, channels, time)
        keys = torch.rand(groups, group_size, sources, 1, 1, device=wav.device)
        order = torch.argsort(keys, dim=1)
        wav = wav.gather(1, order.expand(-1, -1, -1, channels, time))
        return wav.reshape(batch, sources, channels, time)


class Scale(nn.Module):
    """Multiply each source of each example by a gain drawn uniformly in `[min, max]`.

    Args:
        proba: probability of rescaling a batch.
        min: smallest gain.
        max: largest gain.
    """

    def __init__(self, proba: float = 1., min: float = 0.25, max: float = 1.25):
        super().__init__()
        self.proba = proba
        self.min = min
        self.max = max

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        batch, sources = wav.shape[:2]
        if not self.training or not _chance(self.proba):
            return wav
        scales = torch.empty(batch, sources, 1, 1, device=wav.device, dtype=wav.dtype)
        scales.uniform_(self.min, self.max)
        return wav * scales


def augmentation_from_config(args) -> nn.Sequential:
    """The training augmentation pipeline described by a training config (`augment.*`, `dset.*`).

    Shift by up to `dset.shift` seconds, then random channel/sign flips (`augment.flip`), random
    gains (`augment.scale`) and remixing across the batch (`augment.remix`), in that order.
    """
    modules: tp.List[nn.Module] = [
        Shift(shift=int(args.dset.samplerate * args.dset.shift), same=args.augment.shift_same)]
    if args.augment.flip:
        modules += [FlipChannels(), FlipSign()]
    if args.augment.scale.proba:
        modules.append(Scale(**args.augment.scale))
    if args.augment.remix.proba:
        modules.append(Remix(**args.augment.remix))
    return nn.Sequential(*modules)
