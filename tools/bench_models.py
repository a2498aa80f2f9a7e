"""The model and audio the benchmarks share: the released htdemucs configuration (XP 955717e8 of
the `mmi` grid) with random weights, its training example length, and a synthetic mixture."""
import logging
import math
from fractions import Fraction
import typing as tp

import torch

logger = logging.getLogger(__name__)

RELEASED_HTDEMUCS_SIG = "955717e8"


def released_htdemucs_config():
    """Config of the released htdemucs XP, from the `mmi` grid definition."""
    from demucs.grids.mmi import HTDEMUCS
    from demucs.train import main
    xp = main.get_xp(main.value_to_argv(HTDEMUCS))
    if xp.sig != RELEASED_HTDEMUCS_SIG:
        logger.warning("grid config has signature %s, not the released %s", xp.sig,
                       RELEASED_HTDEMUCS_SIG)
    return xp.cfg


def training_length(cfg) -> int:
    """Samples per training example as the model sees it: the dataset segment, cropped by the
    repitch augmentation (by its largest tempo change) and then by the random shift."""
    samplerate = cfg.dset.samplerate
    length = int(cfg.dset.segment * samplerate)
    if cfg.augment.repitch.proba:
        length = int((1 - cfg.augment.repitch.max_tempo / 100) * length)
    return length - int(cfg.dset.shift * samplerate)


def synthetic_mix(seconds: float, samplerate: int, channels: int, seed: int = 0) -> torch.Tensor:
    """A [1, channels, T] mixture: noise plus a few harmonic tones (as the peer benchmark)."""
    generator = torch.Generator().manual_seed(seed)
    length = int(seconds * samplerate)
    times = torch.arange(length) / samplerate
    mix = 0.1 * torch.randn(channels, length, generator=generator)
    for frequency in (55., 110., 220., 440., 880.):
        mix += 0.05 * torch.sin(2 * math.pi * frequency * times)
    return mix[None]


def separation_model(package: tp.Optional[str]) -> torch.nn.Module:
    """The model package `package`, or the released htdemucs configuration with random weights
    and the segment its package has (7.8 s, set by `tools.export`): a model fresh from
    `get_model` still has the configured 40 s, and would separate in 40 s segments."""
    if package:
        from demucs.states import load_model
        return load_model(package)
    from demucs.train import get_model
    torch.manual_seed(0)
    cfg = released_htdemucs_config()
    model = get_model(cfg)
    model.segment = Fraction(training_length(cfg), cfg.dset.samplerate)
    return model
