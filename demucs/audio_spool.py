"""Spools: float32 audio `[C, T]` kept in an anonymous temporary file rather than in memory,
appended and read back block by block.

`AudioSpool` is the plain spool; `DecodedAudio` is a decoded track (made by
`AudioFile.decode_to_spool`) with the mono statistics separation normalises with. The writer of
stems, `AudioWriter`, is a spool too and lives with the encoders (`demucs.audio_encoding`).
"""
from contextlib import contextmanager
import os
from pathlib import Path
import tempfile
import typing as tp

import numpy as np
import torch

from .audio_conversion import check_finite, convert_audio_channels

SpoolT = tp.TypeVar("SpoolT", bound="AudioSpool")
# Frames per block when audio is streamed from ffmpeg, through a spool or to an encoder.
BLOCK_FRAMES = 2 ** 16


def tensor_blocks(wav: torch.Tensor, frames: int = BLOCK_FRAMES) -> tp.Iterator[torch.Tensor]:
    """Consecutive `[..., frames]` views of `wav` (the last one shorter)."""
    for start in range(0, wav.shape[-1], frames):
        yield wav[..., start:start + frames]


@contextmanager
def closed_on_error(resource: tp.Any) -> tp.Iterator[None]:
    """Close `resource` if the block raises (and re-raise)."""
    try:
        yield
    except BaseException:
        resource.close()
        raise


class AudioSpool:
    """Float32 audio `[C, T]` kept in an anonymous temporary file, appended and read in blocks.

    It holds a decoded track (`DecodedAudio`) or a stem being written (`AudioWriter`) outside
    of memory; the file disappears when the spool is closed (use it as a context manager), or
    when the process ends.
    """

    def __init__(self, channels: int):
        self.channels = channels
        self.length = 0
        self._file = tempfile.TemporaryFile()

    def __enter__(self: SpoolT) -> SpoolT:
        return self

    def __exit__(self, *exc: tp.Any) -> None:
        self.close()

    def append(self, block: torch.Tensor) -> None:
        """Add float32 samples `[C, n]` at the end."""
        self._file.seek(0, os.SEEK_END)
        self._file.write(block.t().contiguous().numpy())
        self.length += block.shape[-1]

    def read(self, start: int, end: int) -> torch.Tensor:
        """Samples `[C, end - start]` (fewer when `end` is past the end)."""
        self._file.seek(4 * self.channels * start)
        count = max(0, end - start) * self.channels
        samples = np.fromfile(self._file, dtype=np.float32, count=count)
        return torch.from_numpy(samples).view(-1, self.channels).t()

    def blocks(self, frames: int = BLOCK_FRAMES) -> tp.Iterator[torch.Tensor]:
        """Every sample, in consecutive `[C, frames]` blocks (the last one shorter)."""
        for start in range(0, self.length, frames):
            yield self.read(start, start + frames)

    def close(self) -> None:
        self._file.close()


class DecodedAudio(AudioSpool):
    """An audio stream decoded into a spool, with the statistics separation needs.

    Made by `AudioFile.decode_to_spool`. `mono_mean` and `mono_std` describe the mono mix (mean
    of the channels) of the whole stream, summed in float64 as the blocks arrive.
    """

    def __init__(self, path: Path, samplerate: int, channels: int):
        super().__init__(channels)
        self.path = path
        self.samplerate = samplerate
        self._sum = 0.
        self._sum_squares = 0.

    @classmethod
    def from_blocks(cls, path: Path, samplerate: int, channels: int,
                    blocks: tp.Iterable[torch.Tensor]) -> "DecodedAudio":
        """Spool decoded blocks (see `append`)."""
        decoded = cls(path, samplerate, channels)
        with closed_on_error(decoded):
            for block in blocks:
                decoded.append(block)
        return decoded

    def append(self, block: torch.Tensor) -> None:
        """Add a decoded block `[C', n]` (C' the file's channel count): refused (`ValueError`)
        if it holds NaN or infinite samples, then converted to this spool's channel count (see
        `convert_audio_channels`)."""
        check_finite(block, f"audio file {self.path}", self.samplerate, offset=self.length)
        block = convert_audio_channels(block, self.channels)
        mono = block.double().mean(0)
        self._sum += float(mono.sum())
        self._sum_squares += float((mono * mono).sum())
        super().append(block)

    @property
    def mono_mean(self) -> float:
        return self._sum / max(self.length, 1)

    @property
    def mono_std(self) -> float:
        """Standard deviation with Bessel's correction (0 for a single sample)."""
        spread = self._sum_squares - self.length * self.mono_mean ** 2
        return (max(spread, 0.) / max(self.length - 1, 1)) ** 0.5
