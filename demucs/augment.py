"""Augmentations of training batches of stems `[batch, sources, channels, time]`, on any device.

Each module is active only in training mode (except `Shift`, which also trims in eval mode so that
lengths match) and draws its randomness from torch's global generator, except whether `Scale` and
`Remix` apply to a batch: that is drawn from Python's `random`, as the official trainer does.
"""
import math
import random
import typing as tp

import numpy as np
import torch
from torch import nn

from .audio import MP3_SAMPLERATES, mp3_round_trip


def _chance(proba: float) -> bool:
    """True with probability `proba` (from torch's generator; no draw when `proba` is 0)."""
    return proba > 0 and torch.rand(()).item() < proba


def _official_chance(proba: float) -> bool:
    """True with probability `proba`, drawn from Python's `random`, even when `proba` is 0: the
    official trainer decides so for Scale and Remix, and a seeded run only matches it (batch for
    batch) when every generator is drawn from in the same order."""
    return random.random() < proba


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
        if not self.training or not _official_chance(self.proba):
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
        if not self.training or not _official_chance(self.proba):
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


# ----------------------------------------------------------------------------------------------
# Augmentations of single examples `[sources, channels, time]`, in the data-loading workers (CPU),
# for data that is not studio-clean. Both are opt-in (proba 0 by default).

# Lowest mp3 bitrate of the codec round trip: below it, lame leaves MPEG-1 and the decoded stem
# would no longer line up with the others.
MIN_CODEC_BITRATE = 64


class LossyCodec:
    """Each stem of an example, with probability `proba`, goes through an mp3 encoder and decoder
    at a bitrate drawn from `bitrates` (`augment.codec`): the model learns from sources that were
    lossy (the mixture is the sum of the stems, so it carries the artefacts too). Length and
    level are kept.

    Args:
        samplerate: of the examples (`dset.samplerate`): 32000, 44100 or 48000 Hz.
        proba: chance of each stem to be coded.
        bitrates: kbps to draw from, each at least `MIN_CODEC_BITRATE`.
    """

    def __init__(self, samplerate: int, proba: float = 0., bitrates: tp.Sequence[int] = (128,)):
        low = [rate for rate in bitrates if rate < MIN_CODEC_BITRATE]
        if not bitrates or low:
            raise ValueError(f"augment.codec.bitrates={list(bitrates)}: give bitrates of at "
                             f"least {MIN_CODEC_BITRATE} kbps")
        if samplerate not in MP3_SAMPLERATES:
            raise ValueError(f"augment.codec needs dset.samplerate of 32000, 44100 or 48000 Hz "
                             f"(mp3), got {samplerate}")
        self.samplerate = samplerate
        self.proba = proba
        self.bitrates = list(bitrates)

    def __call__(self, example: torch.Tensor) -> torch.Tensor:
        out = example
        for index in range(example.shape[0]):
            if _chance(self.proba):
                bitrate = self.bitrates[int(torch.randint(len(self.bitrates), ()))]
                out = out.clone() if out is example else out
                out[index] = mp3_round_trip(example[index], self.samplerate, bitrate)
        return out


class RandomEQ:
    """Each stem of an example, with probability `proba`, gets a random gain in each of three
    bands, below `cutoffs[0]` Hz, between the cutoffs and above `cutoffs[1]` (`augment.eq`):
    a random equalisation, for recordings of other timbres. The gain curve moves from one band
    to the next over an octave around each cutoff, and is applied in the frequency domain (one
    FFT per stem).

    Args:
        samplerate: of the examples (`dset.samplerate`).
        proba: chance of each stem to be equalised.
        max_db: the gain of each band is drawn uniformly in [-max_db, max_db] dB.
        cutoffs: the band edges in Hz.
    """

    def __init__(self, samplerate: int, proba: float = 0., max_db: float = 6.,
                 cutoffs: tp.Sequence[float] = (300., 3000.)):
        if not 0 < cutoffs[0] < cutoffs[1] < samplerate / 2:
            raise ValueError(f"augment.eq cutoffs {list(cutoffs)} must rise and stay below "
                             f"half of dset.samplerate={samplerate}")
        self.samplerate = samplerate
        self.proba = proba
        self.max_db = max_db
        low, high = math.log2(cutoffs[0]), math.log2(cutoffs[1])
        self._knees = [low - 0.5, low + 0.5, high - 0.5, high + 0.5]

    def _gain_curve(self, length: int, decibels: torch.Tensor) -> torch.Tensor:
        """Linear gains at the rfft frequencies of `length` samples for band gains `decibels`:
        piecewise linear in log-frequency between the knees, flat beyond them."""
        freqs = np.log2(np.maximum(np.fft.rfftfreq(length, 1 / self.samplerate), 1.))
        low, mid, high = decibels.tolist()
        curve = np.interp(freqs, self._knees, [low, mid, mid, high])
        return torch.from_numpy(10 ** (curve / 20)).float()

    def __call__(self, example: torch.Tensor) -> torch.Tensor:
        out = example
        length = example.shape[-1]
        for index in range(example.shape[0]):
            if _chance(self.proba):
                decibels = (torch.rand(3) * 2 - 1) * self.max_db
                spectrum = torch.fft.rfft(example[index].float(), dim=-1)
                spectrum *= self._gain_curve(length, decibels)
                out = out.clone() if out is example else out
                out[index] = torch.fft.irfft(spectrum, n=length, dim=-1).to(example.dtype)
        return out


class AugmentedExamples(torch.utils.data.Dataset):
    """`dataset` whose examples go through `transforms` in order (in the loading workers)."""

    def __init__(self, dataset: torch.utils.data.Dataset,
                 transforms: tp.Sequence[tp.Callable[[torch.Tensor], torch.Tensor]]):
        self.dataset = dataset
        self.transforms = list(transforms)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> torch.Tensor:
        example = self.dataset[index]
        for transform in self.transforms:
            example = transform(example)
        return example


def example_augmentations(args) -> tp.List[tp.Callable[[torch.Tensor], torch.Tensor]]:
    """The opt-in example augmentations of a training config (`augment.codec`, `augment.eq`),
    checked on creation."""
    transforms: tp.List[tp.Callable[[torch.Tensor], torch.Tensor]] = []
    codec = args.augment.get("codec")
    if codec is not None and codec.proba:
        transforms.append(LossyCodec(args.dset.samplerate, codec.proba, list(codec.bitrates)))
    eq = args.augment.get("eq")
    if eq is not None and eq.proba:
        transforms.append(RandomEQ(args.dset.samplerate, eq.proba, eq.max_db))
    return transforms
