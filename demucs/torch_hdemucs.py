"""Hybrid Demucs as implemented in torchaudio, wrapped as a Demucs model (`model=torch_hdemucs`).

Its class keeps the path Demucs 4.1 pickles it under, `demucs.train.TorchHDemucsWrapper` (the
training module re-exports it), so packages load in both; it lives here, with the models, so that
loading such a package does not import the training code.
"""
import torch
from torch import nn

from .utils import capture_init

TORCHAUDIO_HINT = (
    "model=torch_hdemucs needs torchaudio, which is not installed. Install the torchaudio release "
    "matching your torch ({torch}), e.g. `pip install \"torch=={torch}\" torchaudio`, or pick "
    "model=hdemucs, which is the same architecture implemented in Demucs itself.")


class TorchHDemucsWrapper(nn.Module):
    """Hybrid Demucs as implemented in torchaudio (`torchaudio.models.HDemucs`), kept as child
    `torch_hdemucs` so that checkpoints use torchaudio's parameter names.

    Args:
        samplerate: sample rate the model is trained at (kept as an attribute, like other models).
        segment: training segment length in seconds (attribute only).
        **kwargs: forwarded to `torchaudio.models.HDemucs` (`sources`, `audio_channels`, `channels`,
            `growth`, `nfft`, `depth`, ...).
    """

    @capture_init
    def __init__(self, **kwargs):
        super().__init__()
        try:
            from torchaudio.models import HDemucs as TorchHDemucs
        except ImportError as error:
            version = torch.__version__.split("+")[0]
            raise ImportError(TORCHAUDIO_HINT.format(torch=version)) from error
        self.samplerate = kwargs.pop("samplerate")
        self.segment = kwargs.pop("segment")
        self.sources = kwargs["sources"]
        self.audio_channels = kwargs.get("audio_channels", 2)
        self.torch_hdemucs = TorchHDemucs(**kwargs)

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        """Separate `mix` [B, C, T] into [B, S, C, T]."""
        return self.torch_hdemucs(mix)


TorchHDemucsWrapper.__module__ = "demucs.train"  # where Demucs 4.1 defines (and pickles) it
