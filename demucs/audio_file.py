"""`AudioFile`: one audio file on disk, its streams described once, decoded into memory (`read`) or
block by block into a spool (`decode_to_spool`).

ffmpeg decodes when it is installed and soundfile is the fallback (`demucs.audio_decoders`); a
decode that comes out well shorter than the header promised is reported as a truncated file.
"""
from contextlib import closing
import logging
from pathlib import Path
import typing as tp

import torch

from . import audio_decoders as decoders
from .audio_conversion import convert_audio_channels
from .audio_decoders import AudioReadError
from .audio_spool import DecodedAudio, closed_on_error, tensor_blocks
from .files import PathLike

logger = logging.getLogger(__name__)

T = tp.TypeVar("T")
# A decode may come out this much shorter than the probed duration (codec delay and padding, e.g.
# one mp3 frame) before the file is reported as truncated.
_SHORT_READ_TOLERANCE_S = 0.1
# Codecs whose duration is read from the header rather than estimated from the bit rate: only for
# them can a short decode be told apart from an inaccurate estimate (e.g. VBR mp3 without tag).
_EXACT_DURATION_CODECS = ("pcm", "flac", "wav", "aiff", "alac", "wavpack")


def _first_success(attempts: tp.Sequence[tp.Callable[[], T]]) -> T:
    """The result of the first attempt that does not raise `AudioReadError`; when all of them
    fail, one `AudioReadError` with every message."""
    failures = []
    for attempt in attempts:
        try:
            return attempt()
        except AudioReadError as error:
            logger.debug("%s", error)
            failures.append(str(error))
    raise AudioReadError("; ".join(failures))


class AudioFile:
    """An audio file on disk, described by ffprobe and decoded by ffmpeg (soundfile as fallback).

    `info` is the ffprobe JSON (`format`, `streams`), computed once. `len(AudioFile(p))` is the
    number of audio streams, described by `audio_streams`, `channels(stream)`,
    `samplerate(stream)` and `duration()`. `read` decodes into memory, `decode_to_spool` block by
    block into a temporary file.
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self._info: tp.Optional[dict] = None

    def __repr__(self) -> str:
        return f"AudioFile({str(self.path)!r})"

    @property
    def info(self) -> dict:
        if self._info is None:
            self._info = self._probe()
        return self._info

    def _probe(self) -> dict:
        decoders.check_readable_file(self.path)
        failures = []
        probes = [decoders.probe_ffmpeg] if decoders.ffmpeg_available() else []
        for probe in probes + [decoders.probe_soundfile]:
            try:
                info = probe(self.path)
            except AudioReadError as exc:
                failures.append(str(exc))
                continue
            if any(stream.get("codec_type") == "audio" for stream in info.get("streams", [])):
                return info
            failures.append(f"no audio stream found in {self.path}")
        raise AudioReadError(f"{self.path} is not a readable audio file ({'; '.join(failures)}).")

    @property
    def audio_streams(self) -> tp.List[dict]:
        """ffprobe's description of each audio stream, in file order."""
        return [stream for stream in self.info["streams"] if stream.get("codec_type") == "audio"]

    def __len__(self) -> int:
        return len(self.audio_streams)

    def channels(self, stream: int = 0) -> int:
        return int(self.audio_streams[stream].get("channels", 0))

    def samplerate(self, stream: int = 0) -> int:
        return int(self.audio_streams[stream]["sample_rate"])

    def duration(self) -> float:
        """Duration in seconds of the longest stream (container duration when streams lack one)."""
        durations = [float(stream["duration"]) for stream in self.audio_streams
                     if "duration" in stream]
        if durations:
            return max(durations)
        return float(self.info["format"].get("duration", 0.0))

    def read(self, seek_time: tp.Optional[float] = None, duration: tp.Optional[float] = None,
             streams: tp.Union[int, slice, tp.Sequence[int]] = slice(None),
             samplerate: tp.Optional[int] = None,
             channels: tp.Optional[int] = None) -> torch.Tensor:
        """Decode audio as float32 in [-1, 1].

        Args:
            seek_time: start, in seconds (None: from the start).
            duration: how many seconds to read (None: up to the end). The result is cut to exactly
                `int(samplerate * duration)` samples when the file holds that many.
            streams: an int gives `[channels, time]`; a slice or list of stream positions (among
                the audio streams) gives `[streams, channels, time]`.
            samplerate: resample to this rate (None: keep the file's rate).
            channels: convert to this many channels (see `convert_audio_channels`); mono is the
                channel mean.
        """
        single = isinstance(streams, int)
        positions = self._stream_positions(streams)
        wavs = [self._read_stream(position, seek_time, duration, samplerate, channels)
                for position in positions]
        if single:
            return wavs[0]
        length = min(wav.shape[-1] for wav in wavs)
        return torch.stack([wav[..., :length] for wav in wavs])

    def decode_to_spool(self, samplerate: int, channels: int, stream: int = 0) -> DecodedAudio:
        """Decode audio stream `stream` once, block by block, resampled to `samplerate` and
        converted to `channels`, into a `DecodedAudio` (the caller closes it).

        With ffmpeg, memory does not grow with the duration (soundfile, the fallback, decodes the
        stream in one go). Raises `AudioReadError` for an unreadable, truncated or empty stream
        and for NaN or infinite samples; gives the samples `read` would.
        """
        position = self._stream_positions(stream)[0]
        native_channels = self._native_channels(position)

        def from_ffmpeg() -> DecodedAudio:
            blocks = decoders.ffmpeg_blocks(self.path, self._stream_index(position),
                                            native_channels, samplerate)
            with closing(blocks):  # stops ffmpeg at once when a block is refused
                return DecodedAudio.from_blocks(self.path, samplerate, channels, blocks)

        def from_soundfile() -> DecodedAudio:
            wav = decoders.decode_soundfile(self.path, None, None, samplerate)
            return DecodedAudio.from_blocks(self.path, samplerate, channels, tensor_blocks(wav))

        attempts = {"ffmpeg": from_ffmpeg, "soundfile": from_soundfile}
        try:
            decoded = _first_success([attempts[name] for name in self._decoder_names()])
        except ValueError as error:  # NaN or infinite samples: another decoder would find them too
            raise AudioReadError(str(error)) from None
        with closed_on_error(decoded):
            self._check_not_truncated(position, decoded.length, samplerate, None, None)
            if decoded.length == 0:
                raise AudioReadError(f"{self.path} holds no audio samples.")
        return decoded

    def _stream_positions(self, streams: tp.Union[int, slice, tp.Sequence[int]]) -> tp.List[int]:
        count = len(self)
        if isinstance(streams, int):
            positions = [streams]
        elif isinstance(streams, slice):
            positions = list(range(count))[streams]
        else:
            positions = list(streams)
        for position in positions:
            if not -count <= position < count:
                raise AudioReadError(
                    f"{self.path} has {count} audio stream(s), stream {position} does not exist.")
        if not positions:
            raise AudioReadError(f"No stream of {self.path} selected by {streams!r}.")
        return positions

    def _stream_index(self, position: int) -> int:
        """The global index (among all streams, as ffmpeg counts) of an audio stream."""
        return int(self.audio_streams[position]["index"])

    def _native_channels(self, position: int) -> int:
        channels = self.channels(position)
        if channels <= 0:
            raise AudioReadError(
                f"Audio file {self.path} has no audio channels (stream {position}).")
        return channels

    def _decoder_names(self) -> tp.List[str]:
        """The decoders to try, in order: ffmpeg when it described the file, then soundfile,
        which only reads files with a single stream."""
        if self.info.get("backend") == "soundfile":
            return ["soundfile"]
        return ["ffmpeg", "soundfile"] if len(self) == 1 else ["ffmpeg"]

    def _read_stream(self, position: int, seek_time: tp.Optional[float],
                     duration: tp.Optional[float], samplerate: tp.Optional[int],
                     channels: tp.Optional[int]) -> torch.Tensor:
        native_channels = self._native_channels(position)
        attempts = {
            "ffmpeg": lambda: decoders.decode_ffmpeg(self.path, self._stream_index(position),
                                                     native_channels, seek_time, duration,
                                                     samplerate),
            "soundfile": lambda: decoders.decode_soundfile(self.path, seek_time, duration,
                                                           samplerate),
        }
        wav = _first_success([attempts[name] for name in self._decoder_names()])
        rate = samplerate or self.samplerate(position)
        self._check_not_truncated(position, wav.shape[-1], rate, seek_time, duration)
        if channels is not None:
            wav = convert_audio_channels(wav, channels)
        if duration is not None:
            wav = wav[..., :int(rate * duration)]
        return wav

    def _check_not_truncated(self, position: int, length: int, rate: int,
                             seek_time: tp.Optional[float], duration: tp.Optional[float]) -> None:
        """Fail when the decoder gave `length` samples at `rate`, well less than the duration
        the header promised. Only for codecs with an exact duration in their header (PCM,
        FLAC...)."""
        stream = self.audio_streams[position]
        if not str(stream.get("codec_name", "")).startswith(_EXACT_DURATION_CODECS):
            return
        stream_duration = float(stream.get("duration", self.info["format"].get("duration", 0)))
        available = max(0.0, stream_duration - (seek_time or 0.0))
        expected = available if duration is None else min(duration, available)
        decoded = length / rate
        if decoded < expected - _SHORT_READ_TOLERANCE_S:
            raise AudioReadError(
                f"Audio file {self.path} is truncated or corrupt: expected {expected:.2f} s of "
                f"audio, could decode only {decoded:.2f} s.")


def read_audio(path: PathLike, samplerate: tp.Optional[int] = None,
               channels: tp.Optional[int] = None) -> torch.Tensor:
    """The whole first audio stream of `path` as float32 `[channels, time]`.

    Optionally resampled to `samplerate` and converted to `channels`. Raises `AudioReadError`.
    """
    return AudioFile(path).read(streams=0, samplerate=samplerate, channels=channels)
