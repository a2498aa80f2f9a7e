"""Audio input and output without torchaudio: every decode, encode and block-wise stream.

Reading goes through ffprobe/ffmpeg (any format and container ffmpeg knows, several streams,
seeking, resampling on the fly) and falls back to soundfile when ffmpeg is not installed or cannot
decode the file. Writing uses soundfile for `.wav`/`.flac` and lameenc for `.mp3`, whose files
start with a gapless Info/LAME frame so that decoders give back exactly the samples written.

Long tracks are handled block by block so that memory does not grow with their duration:
`AudioFile.decode_to_spool` decodes a stream once into an `AudioSpool` (float32 samples in an
anonymous temporary file), and `AudioWriter` accumulates blocks in one before encoding them.
`save_audio` (one tensor), the `demucs` command and `demucs.api` all encode through the same
writers.

Every read problem (missing, empty, truncated, not audio, no channels) is reported as one
`AudioReadError` whose message names the file, and every file is written through
`demucs.files.atomic_write`, so that a failure never leaves a partial output file.
"""
from contextlib import closing, contextmanager
from fractions import Fraction
import io
import json
import logging
import math
import mmap
import os
from pathlib import Path
import shutil
import struct
import subprocess
import tempfile
import typing as tp

import julius
import lameenc
import numpy as np
import soundfile
import torch
from torch.nn import functional as F

from .files import atomic_write
from .utils import temp_filenames  # noqa: F401  (a name of Demucs 4.1's audio module)

logger = logging.getLogger(__name__)

PathLike = tp.Union[str, os.PathLike]
T = tp.TypeVar("T")
SpoolT = tp.TypeVar("SpoolT", bound="AudioSpool")
SAVE_SUFFIXES = (".wav", ".flac", ".mp3")
CLIP_MODES = ("rescale", "clamp", "tanh", "none")
# Frames per block when audio is streamed from ffmpeg, through a spool or to an encoder.
BLOCK_FRAMES = 2 ** 16
# A decode may come out this much shorter than the probed duration (codec delay and padding, e.g.
# one mp3 frame) before the file is reported as truncated.
_SHORT_READ_TOLERANCE_S = 0.1
# Codecs whose duration is read from the header rather than estimated from the bit rate: only for
# them can a short decode be told apart from an inaccurate estimate (e.g. VBR mp3 without tag).
_EXACT_DURATION_CODECS = ("pcm", "flac", "wav", "aiff", "alac", "wavpack")
_I16_SCALE = 2 ** 15 - 1
# julius resamples with a [new, 1, ~old] filter bank for the reduced ratio new/old: past this
# many coefficients (4 MB) the ratio is approximated, since an exact one can need gigabytes
# (44101 -> 44100 Hz: 2e9 coefficients).
_MAX_RESAMPLE_KERNEL = 2 ** 20
_JULIUS_ZEROS, _JULIUS_ROLLOFF = 24, 0.945


class AudioReadError(Exception):
    """An audio file could not be read: missing, empty, truncated, not audio or without channels."""


def _ffmpeg_available() -> bool:
    return shutil.which("ffprobe") is not None and shutil.which("ffmpeg") is not None


def _last_message(text: str) -> str:
    """The last non-empty line of a tool's stderr, usually the most specific one."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def _check_readable_file(path: Path) -> None:
    """Reject what no decoder can read: a missing path, a folder, an empty or truncated file."""
    if not path.exists():
        raise AudioReadError(f"Audio file {path} does not exist.")
    if not path.is_file():
        raise AudioReadError(f"Audio path {path} is not a regular file.")
    if path.stat().st_size == 0:
        raise AudioReadError(f"Audio file {path} is empty (0 bytes).")
    missing = _riff_missing_bytes(path)
    if missing > 0:
        raise AudioReadError(
            f"Audio file {path} is truncated: its WAV header announces {missing} more bytes of "
            "samples than the file holds. Re-create or re-download it.")


def _riff_missing_bytes(path: Path) -> int:
    """Bytes of the `data` chunk that a RIFF/WAVE header announces but the file lacks (0 if none).

    Decoders silently accept a WAV file cut short at a sample boundary, so this is checked from the
    header itself. Streamed WAVs whose header carries a placeholder size (0 or 0xFFFFFFFF) pass.
    """
    size = path.stat().st_size
    with open(path, "rb") as file:
        header = file.read(12)
        if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            return 0
        position = 12
        while position + 8 <= size:
            file.seek(position)
            chunk_id, chunk_size = struct.unpack("<4sI", file.read(8))
            if chunk_id == b"data":
                if chunk_size in (0, 0xFFFFFFFF):
                    return 0
                return max(0, position + 8 + chunk_size - size)
            position += 8 + chunk_size + (chunk_size & 1)
    return 0


def _probe_ffmpeg(path: Path) -> dict:
    """ffprobe's JSON description (`format` and `streams`) of `path`."""
    command = ["ffprobe", "-loglevel", "error", "-print_format", "json",
               "-show_format", "-show_streams", str(path)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise AudioReadError(f"ffprobe cannot read {path}: {_last_message(result.stderr)}")
    return json.loads(result.stdout)


def _probe_soundfile(path: Path) -> dict:
    """The same description as ffprobe's, built from soundfile (one audio stream)."""
    try:
        info = soundfile.info(str(path))
    except (soundfile.LibsndfileError, RuntimeError) as exc:
        raise AudioReadError(f"soundfile cannot read {path}: {exc}") from None
    duration = info.frames / info.samplerate if info.samplerate else 0.0
    stream = {"index": 0, "codec_type": "audio", "codec_name": info.format.lower(),
              "channels": info.channels,
              "sample_rate": str(info.samplerate), "duration": str(duration)}
    return {"format": {"duration": str(duration), "format_name": info.format},
            "streams": [stream], "backend": "soundfile"}


def _ffmpeg_command(path: Path, stream_index: int, channels: int, seek_time: tp.Optional[float],
                    duration: tp.Optional[float], samplerate: tp.Optional[int],
                    output: str) -> tp.List[str]:
    """ffmpeg decoding stream `stream_index` (global index) to raw float32 samples in `output`."""
    command = ["ffmpeg", "-nostdin", "-y", "-loglevel", "error"]
    if seek_time:
        command += ["-ss", str(seek_time)]
    command += ["-i", str(path), "-map", f"0:{stream_index}"]
    if duration is not None:
        command += ["-t", str(duration)]
    command += ["-threads", "1", "-f", "f32le", "-ac", str(channels)]
    if samplerate is not None:
        command += ["-ar", str(samplerate)]
    return command + [output]


def _decode_ffmpeg(path: Path, stream_index: int, channels: int, seek_time: tp.Optional[float],
                   duration: tp.Optional[float], samplerate: tp.Optional[int]) -> torch.Tensor:
    """Decode one stream (global index `stream_index`) to float32 `[channels, time]`.

    ffmpeg writes raw samples to a temporary file that is then read in one go, so the memory used
    is about the size of the decoded audio (the result is a transposed view, not a copy).
    """
    with tempfile.TemporaryDirectory(prefix="demucs_decode_") as folder:
        raw = Path(folder) / "audio.f32"
        command = _ffmpeg_command(path, stream_index, channels, seek_time, duration, samplerate,
                                  str(raw))
        result = subprocess.run(command, capture_output=True)
        if result.returncode != 0:
            message = _last_message(result.stderr.decode(errors="replace"))
            raise AudioReadError(f"ffmpeg cannot decode {path}: {message}")
        samples = np.fromfile(raw, dtype=np.float32) if raw.exists() else np.zeros(0, np.float32)
    usable = len(samples) - len(samples) % channels
    return torch.from_numpy(samples[:usable]).view(-1, channels).t()


def _ffmpeg_blocks(path: Path, stream_index: int, channels: int,
                   samplerate: int) -> tp.Iterator[torch.Tensor]:
    """Decode a whole stream like `_decode_ffmpeg`, yielding `[channels, n]` blocks of
    `BLOCK_FRAMES` frames as ffmpeg writes them to a pipe (memory does not grow with the
    duration). ffmpeg's messages go to a temporary file: a pipe would fill up and stall it."""
    command = _ffmpeg_command(path, stream_index, channels, None, None, samplerate, "-")
    frame_bytes = 4 * channels
    with tempfile.TemporaryFile() as messages:
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=messages) as process:
            assert process.stdout is not None
            while True:
                data = process.stdout.read(BLOCK_FRAMES * frame_bytes)
                if not data:
                    break
                data = data[:len(data) - len(data) % frame_bytes]
                samples = np.frombuffer(data, dtype=np.float32).reshape(-1, channels)
                yield torch.from_numpy(samples.T.copy())
        if process.returncode != 0:
            messages.seek(0)
            message = _last_message(messages.read().decode(errors="replace"))
            raise AudioReadError(f"ffmpeg cannot decode {path}: {message}")


def _decode_soundfile(path: Path, seek_time: tp.Optional[float], duration: tp.Optional[float],
                      samplerate: tp.Optional[int]) -> torch.Tensor:
    """Decode the single stream of `path` with soundfile, resampling with julius if asked."""
    try:
        with soundfile.SoundFile(str(path)) as file:
            native_rate = file.samplerate
            start = int(round((seek_time or 0) * native_rate))
            frames = -1 if duration is None else int(np.ceil(duration * native_rate))
            if start:
                file.seek(min(start, file.frames))
            samples = file.read(frames, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError) as exc:
        raise AudioReadError(f"soundfile cannot decode {path}: {exc}") from None
    wav = torch.from_numpy(samples.T.copy())
    if samplerate is not None and samplerate != native_rate:
        try:
            wav = resample(wav, native_rate, samplerate)
        except ValueError as exc:
            raise AudioReadError(f"{path} has an unusable sample rate: {exc}") from None
    return wav


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


def _tensor_blocks(wav: torch.Tensor, frames: int = BLOCK_FRAMES) -> tp.Iterator[torch.Tensor]:
    """Consecutive `[..., frames]` views of `wav` (the last one shorter)."""
    for start in range(0, wav.shape[-1], frames):
        yield wav[..., start:start + frames]


def check_finite(wav: torch.Tensor, origin: str, samplerate: int, offset: int = 0) -> None:
    """Raise `ValueError` naming the first NaN or infinite sample of `wav` `[C, T]`, if any.

    Such samples would turn every separated stem into NaN; `offset` is the position of `wav`
    in the whole track, for the time reported.
    """
    bad = ~torch.isfinite(wav)
    if not bad.any():
        return
    first = int(bad.any(0).nonzero()[0, 0]) + offset
    raise ValueError(f"{origin} holds {int(bad.sum())} NaN or infinite sample(s), the first at "
                     f"sample {first} ({first / samplerate:.3f} s); repair or re-encode the audio "
                     "before separating it.")


@contextmanager
def _closed_on_error(resource: tp.Any) -> tp.Iterator[None]:
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
        with _closed_on_error(decoded):
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
        _check_readable_file(self.path)
        failures = []
        probes = [_probe_ffmpeg] if _ffmpeg_available() else []
        for probe in probes + [_probe_soundfile]:
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
            blocks = _ffmpeg_blocks(self.path, self._stream_index(position), native_channels,
                                    samplerate)
            with closing(blocks):  # stops ffmpeg at once when a block is refused
                return DecodedAudio.from_blocks(self.path, samplerate, channels, blocks)

        def from_soundfile() -> DecodedAudio:
            wav = _decode_soundfile(self.path, None, None, samplerate)
            return DecodedAudio.from_blocks(self.path, samplerate, channels, _tensor_blocks(wav))

        decoders = {"ffmpeg": from_ffmpeg, "soundfile": from_soundfile}
        try:
            decoded = _first_success([decoders[name] for name in self._decoder_names()])
        except ValueError as error:  # NaN or infinite samples: another decoder would find them too
            raise AudioReadError(str(error)) from None
        with _closed_on_error(decoded):
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
        decoders = {
            "ffmpeg": lambda: _decode_ffmpeg(self.path, self._stream_index(position),
                                             native_channels, seek_time, duration, samplerate),
            "soundfile": lambda: _decode_soundfile(self.path, seek_time, duration, samplerate),
        }
        wav = _first_success([decoders[name] for name in self._decoder_names()])
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


def convert_audio_channels(wav: torch.Tensor, channels: int = 2) -> torch.Tensor:
    """Convert `[*, C, T]` audio to `channels` channels.

    Mono output is the mean of the input channels; mono input is repeated; extra input channels
    are dropped (the first `channels` are kept). Upmixing from more than one channel is an error.
    """
    *shape, src_channels, length = wav.shape
    if src_channels == channels:
        return wav
    if channels == 1:
        return wav.mean(dim=-2, keepdim=True)
    if src_channels == 1:
        return wav.expand(*shape, channels, length)
    if src_channels > channels:
        return wav[..., :channels, :]
    raise ValueError(f"Cannot convert audio with {src_channels} channels to {channels} channels: "
                     "only mono can be upmixed.")


def convert_audio(wav: torch.Tensor, from_samplerate: float, to_samplerate: float,
                  channels: int) -> torch.Tensor:
    """Convert `[*, C, T]` audio to `channels` channels and resample it (see `resample`)."""
    wav = convert_audio_channels(wav, channels)
    return resample(wav, from_samplerate, to_samplerate)


def _resample_kernel_size(old: int, new: int) -> int:
    """Coefficients of julius' filter bank from `old` to `new` Hz (0 when nothing to do)."""
    gcd = math.gcd(old, new)
    old, new = old // gcd, new // gcd
    if old == new:
        return 0
    width = math.ceil(_JULIUS_ZEROS * old / (_JULIUS_ROLLOFF * min(old, new)))
    return new * (2 * width + old)


def _close_ratio(from_samplerate: int, to_samplerate: int) -> Fraction:
    """The closest fraction to `to / from` whose filter bank fits `_MAX_RESAMPLE_KERNEL`."""
    exact = Fraction(to_samplerate, from_samplerate)
    denominator = min(from_samplerate, 2 ** 12)
    while denominator >= 1:
        ratio = max(exact.limit_denominator(denominator), Fraction(1, denominator))
        if _resample_kernel_size(ratio.denominator, ratio.numerator) <= _MAX_RESAMPLE_KERNEL:
            return ratio
        denominator //= 2
    raise ValueError(f"cannot resample from {from_samplerate} to {to_samplerate} Hz: the ratio "
                     "is too large")


def resample(wav: torch.Tensor, from_samplerate: int, to_samplerate: int) -> torch.Tensor:
    """Resample `[*, T]` audio to `int(T * to / from)` samples with julius.

    Exact for the usual rates. When the reduced ratio `to / from` would need a huge filter bank
    (e.g. 44101 -> 44100 Hz, gigabytes), a close ratio is used instead (relative error below
    0.1 %, under 2 cents of pitch, for rates of 8 to 96 kHz; logged) and the output is cut or
    zero padded to the same length.
    """
    if int(from_samplerate) != from_samplerate or int(to_samplerate) != to_samplerate \
            or from_samplerate <= 0 or to_samplerate <= 0:
        raise ValueError(f"sample rates must be positive integers, got {from_samplerate} and "
                         f"{to_samplerate}")
    from_samplerate, to_samplerate = int(from_samplerate), int(to_samplerate)
    if _resample_kernel_size(from_samplerate, to_samplerate) <= _MAX_RESAMPLE_KERNEL:
        return julius.resample_frac(wav, from_samplerate, to_samplerate)
    ratio = _close_ratio(from_samplerate, to_samplerate)
    error = abs(float(ratio / Fraction(to_samplerate, from_samplerate)) - 1)
    logger.info("resampling %d -> %d Hz with the close ratio %s (relative error %.1e)",
                from_samplerate, to_samplerate, ratio, error)
    out = julius.resample_frac(wav, ratio.denominator, ratio.numerator, full=True)
    length = wav.shape[-1] * to_samplerate // from_samplerate
    return F.pad(out, (0, max(0, length - out.shape[-1])))[..., :length]


def prevent_clip(wav: torch.Tensor, mode: tp.Optional[str] = "rescale",
                 peak: tp.Optional[float] = None) -> torch.Tensor:
    """Keep float audio inside [-1, 1] before it is written.

    Modes: `rescale` divides by `max(1.01 * peak, 1)` (no change if already safe), `clamp` clips
    to +/-0.99, `tanh` soft clips, `none` (or None) leaves the audio as is. `peak` is the
    largest absolute sample of the whole audio when `wav` is one block of it (default: `wav`'s),
    so that every block is rescaled alike.
    """
    if mode is None or mode == "none":
        return wav
    if not wav.dtype.is_floating_point:
        raise ValueError(f"prevent_clip needs float audio, got {wav.dtype}.")
    if mode == "rescale":
        if peak is None:
            peak = wav.abs().max().item() if wav.numel() else 0.0
        return wav / max(1.01 * peak, 1.0)
    if mode == "clamp":
        return wav.clamp(-0.99, 0.99)
    if mode == "tanh":
        return torch.tanh(wav)
    raise ValueError(f"Invalid clip mode {mode!r}, expected one of {', '.join(CLIP_MODES)}.")


def i16_pcm(wav: torch.Tensor) -> torch.Tensor:
    """Float audio in [-1, 1] (clamped) to int16 PCM; int16 input is returned unchanged."""
    if wav.dtype.is_floating_point:
        return (wav.clamp(-1, 1) * _I16_SCALE).round().to(torch.int16)
    if wav.dtype != torch.int16:
        raise ValueError(f"i16_pcm expects float or int16 audio, got {wav.dtype}.")
    return wav


def f32_pcm(wav: torch.Tensor) -> torch.Tensor:
    """int16 PCM to float audio in [-1, 1]; float input is returned unchanged."""
    if wav.dtype.is_floating_point:
        return wav
    return wav.float() / _I16_SCALE


def as_dtype_pcm(wav: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Convert PCM audio to `dtype`: float audio for a float dtype, int16 otherwise."""
    if dtype.is_floating_point:
        return f32_pcm(wav).to(dtype)
    return i16_pcm(wav)


# MPEG-1 Layer III constants, for the gapless "Info"/LAME tag written by `encode_mp3`.
_MP3_BITRATES_KBPS = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
_MP3_SAMPLERATE_INDEX = {44100: 0, 48000: 1, 32000: 2}
# What an MPEG-1 Layer III stream can hold: sample rates (Hz) and constant bitrates (kbps); lame
# silently picks another bitrate for any other value.
MP3_SAMPLERATES = tuple(sorted(_MP3_SAMPLERATE_INDEX))
MP3_BITRATES = _MP3_BITRATES_KBPS[1:]
_MP3_FRAME_SAMPLES = 1152
_LAME_ENCODER_DELAY = 576
_XING_FLAGS = 0x0F  # frame count, byte count, table of contents and quality fields present.


def _mp3_stream_frames(data: bytes, samplerate: int) -> tp.Optional[tp.Tuple[int, int]]:
    """(frame count, first frame header) when `data` is an MPEG-1 Layer III stream without CRC at
    `samplerate`, else None (e.g. lame resampled a low bit rate to MPEG-2)."""
    expected_rate = _MP3_SAMPLERATE_INDEX.get(samplerate)
    position, frames, first_header = 0, 0, None
    while position + 4 <= len(data):
        header = int.from_bytes(data[position:position + 4], "big")
        is_mpeg1_layer3 = header >> 17 == 0x7FFD and header >> 16 & 1
        bitrate_index = header >> 12 & 15
        if (not is_mpeg1_layer3 or header >> 10 & 3 != expected_rate
                or bitrate_index in (0, 15)):
            return None
        bitrate = _MP3_BITRATES_KBPS[bitrate_index] * 1000
        position += 144 * bitrate // samplerate + (header >> 9 & 1)
        frames += 1
        first_header = first_header or header
    if position != len(data) or first_header is None:
        return None
    return frames, first_header


def _crc16_arc(data: bytes) -> int:
    """CRC-16/ARC (reflected polynomial 0xA001), the checksum of the LAME tag."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def _lame_info_frame(data: bytes, samplerate: int, samples: int) -> bytes:
    """A silent first frame holding a Xing "Info" and LAME tag for the CBR stream `data`.

    It records the encoder delay and the end padding, so that ffmpeg, mpg123 (soundfile) and most
    players decode exactly `samples` samples per channel instead of about 1,600 more. Returns
    b"" when the stream is not a plain MPEG-1 Layer III one.
    """
    described = _mp3_stream_frames(data, samplerate)
    if described is None:
        logger.debug("mp3 stream is not MPEG-1 Layer III at %d Hz: no gapless tag", samplerate)
        return b""
    frames, header = described
    header &= ~(1 << 9)  # no padding byte: the frame length is then exact.
    bitrate = _MP3_BITRATES_KBPS[header >> 12 & 15] * 1000
    frame = bytearray(144 * bitrate // samplerate)
    side_info = 17 if header >> 6 & 3 == 3 else 32
    total_bytes = len(frame) + len(data)
    padding = frames * _MP3_FRAME_SAMPLES - _LAME_ENCODER_DELAY - samples
    xing = (b"Info" + struct.pack(">III", _XING_FLAGS, frames, total_bytes)
            + bytes(i * 256 // 100 for i in range(100)) + struct.pack(">I", 0))
    lame = (b"LAME3.100" + bytes([1, 0]) + struct.pack(">IHH", 0, 0, 0)
            + bytes([0, min(bitrate // 1000, 255)])
            + (_LAME_ENCODER_DELAY << 12 | padding).to_bytes(3, "big")
            + struct.pack(">BBHIH", 0, 0, 0, total_bytes, 0))
    body = struct.pack(">I", header) + bytes(side_info) + xing + lame
    if not 0 <= padding < 4096 or len(body) + 2 > len(frame):
        return b""
    frame[:len(body)] = body
    frame[len(body):len(body) + 2] = struct.pack(">H", _crc16_arc(bytes(body)))
    return bytes(frame)


class AudioFormat(tp.NamedTuple):
    """How audio is encoded: the file type (`ext`: "wav", "flac" or "mp3") and its options."""
    ext: str
    samplerate: int
    clip: tp.Optional[str] = "rescale"  # see `prevent_clip`
    bits_per_sample: int = 16  # wav and flac PCM: 16 or 24
    as_float: bool = False  # wav as 32-bit float (flac, integer only, then uses 24 bits)
    bitrate: int = 320  # mp3, in kbps
    preset: int = 2  # mp3: lame's algorithm quality, 2 (best) to 7 (fastest)


def _soundfile_subtype(fmt: AudioFormat) -> str:
    if fmt.as_float and fmt.ext == "wav":
        return "FLOAT"
    if fmt.as_float:  # FLAC is integer only: 24 bits is the closest to float precision.
        return "PCM_24"
    if fmt.bits_per_sample not in (16, 24):
        raise ValueError(f"bits_per_sample must be 16 or 24, got {fmt.bits_per_sample}.")
    return f"PCM_{fmt.bits_per_sample}"


def _encode_soundfile(blocks: tp.Iterable[torch.Tensor], path: Path, channels: int,
                      fmt: AudioFormat) -> None:
    subtype = _soundfile_subtype(fmt)
    with soundfile.SoundFile(str(path), "w", fmt.samplerate, channels, subtype,
                             format=fmt.ext.upper()) as file:
        for block in blocks:
            file.write(block.float().t().contiguous().numpy())


def _lame_encoder(channels: int, fmt: AudioFormat, verbose: bool) -> lameenc.Encoder:
    if channels not in (1, 2):
        raise ValueError(f"mp3 holds 1 or 2 channels, got {channels}; convert the audio first.")
    encoder = lameenc.Encoder()
    encoder.set_bit_rate(fmt.bitrate)
    encoder.set_in_sample_rate(fmt.samplerate)
    encoder.set_channels(channels)
    encoder.set_quality(fmt.preset)
    if not verbose:
        encoder.silence()
    return encoder


def _encode_mp3(blocks: tp.Iterable[torch.Tensor], path: Path, channels: int, fmt: AudioFormat,
                verbose: bool = False) -> None:
    """Encode to a constant bit rate mp3 that starts with a gapless Info/LAME frame.

    That frame describes the whole stream (frame count, length, end padding), so lame's output
    is first kept in an anonymous temporary file: an mp3 is small, but memory would still grow
    with the duration.
    """
    encoder = _lame_encoder(channels, fmt, verbose)
    samples = 0
    with tempfile.TemporaryFile() as stream:
        for block in blocks:
            stream.write(encoder.encode(i16_pcm(block).t().contiguous().numpy().tobytes()))
            samples += block.shape[-1]
        stream.write(encoder.flush())
        stream.flush()
        with open(path, "wb") as file:
            file.write(_info_frame_of_file(stream, fmt.samplerate, samples))
            stream.seek(0)
            shutil.copyfileobj(stream, file)


def mp3_round_trip(wav: torch.Tensor, samplerate: int, bitrate: int, preset: int = 7
                   ) -> torch.Tensor:
    """`[C, T]` audio (C = 1 or 2) encoded to mp3 at `bitrate` kbps and decoded back, in memory:
    the same length and level, with the codec's artefacts (for training augmentation).

    The level is scaled to full range for the 16-bit encoder and back. Needs a sample rate of
    MPEG-1 Layer III (32, 44.1 or 48 kHz), whose gapless tag makes the decoded length exact.
    """
    if samplerate not in MP3_SAMPLERATES:
        raise ValueError(f"mp3 round trips need a sample rate of 32000, 44100 or 48000 Hz, got "
                         f"{samplerate}")
    peak = float(wav.abs().max())
    if peak == 0:
        return wav.clone()
    encoder = _lame_encoder(wav.shape[0], AudioFormat("mp3", samplerate, bitrate=bitrate,
                                                      preset=preset), verbose=False)
    encoder.set_out_sample_rate(samplerate)  # low bitrates would otherwise be resampled
    data = encoder.encode(i16_pcm(wav / peak).t().contiguous().numpy().tobytes())
    data += encoder.flush()
    stream = io.BytesIO(_lame_info_frame(data, samplerate, wav.shape[-1]) + data)
    decoded, _ = soundfile.read(stream, dtype="float32", always_2d=True)
    out = torch.from_numpy(decoded.T.copy())[:, :wav.shape[-1]]
    out = F.pad(out, (0, wav.shape[-1] - out.shape[-1]))
    return (out * peak).to(wav.dtype)


def _info_frame_of_file(stream: tp.BinaryIO, samplerate: int, samples: int) -> bytes:
    """`_lame_info_frame` for the mp3 stream held in the file `stream`, read through mmap."""
    if stream.seek(0, os.SEEK_END) == 0:
        return b""
    with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _lame_info_frame(data, samplerate, samples)


def _encode(blocks: tp.Iterable[torch.Tensor], path: Path, channels: int,
            fmt: AudioFormat) -> None:
    """Write float audio blocks `[channels, n]`, already kept within [-1, 1], to `path`."""
    if fmt.ext == "mp3":
        _encode_mp3(blocks, path, channels, fmt)
    elif fmt.ext in ("wav", "flac"):
        _encode_soundfile(blocks, path, channels, fmt)
    else:
        raise ValueError(f"Cannot encode audio as {fmt.ext!r}: use one of "
                         f"{', '.join(suffix[1:] for suffix in SAVE_SUFFIXES)}.")


class AudioWriter(AudioSpool):
    """Accumulates float audio block by block in a spool, then encodes it to wav, flac or mp3.

    The peak of the whole audio is tracked as blocks arrive, so that `rescale` clipping divides
    every block by the factor `save_audio` would use for the whole audio in one go, while memory
    holds one block at a time.
    """

    def __init__(self, channels: int):
        super().__init__(channels)
        self.peak = 0.

    def append(self, block: torch.Tensor) -> None:
        block = block.detach().cpu().float()
        if block.numel():
            self.peak = max(self.peak, float(block.abs().max()))
        super().append(block)

    def encode(self, path: PathLike, fmt: AudioFormat) -> None:
        """Write everything appended to `path`, as is (wrap it in `atomic_write` to replace a
        file only on success)."""
        blocks = (prevent_clip(block, fmt.clip, peak=self.peak) for block in self.blocks())
        _encode(blocks, Path(path), self.channels, fmt)


def encode_mp3(wav: torch.Tensor, path: PathLike, samplerate: int = 44100, bitrate: int = 320,
               quality: int = 2, verbose: bool = False) -> None:
    """Encode `[C, T]` audio (C = 1 or 2) to a constant bit rate mp3 file with lameenc.

    `quality` is lame's algorithm quality, 2 (best) to 7 (fastest). A LAME "Info" tag is added
    so that decoders trim the codec delay and padding and give back exactly T samples.
    """
    fmt = AudioFormat("mp3", samplerate, bitrate=bitrate, preset=quality)
    with atomic_write(path) as temporary:
        _encode_mp3(_tensor_blocks(wav), temporary, wav.shape[0], fmt, verbose)


def _format_of(path: Path, samplerate: int, **options: tp.Any) -> AudioFormat:
    """The `AudioFormat` that `path`'s suffix chooses."""
    suffix = path.suffix.lower()
    if suffix not in SAVE_SUFFIXES:
        raise ValueError(f"Cannot save audio to {path}: unsupported suffix {path.suffix!r}, "
                         f"use one of {', '.join(SAVE_SUFFIXES)}.")
    return AudioFormat(suffix[1:], samplerate, **options)


def save_audio(wav: torch.Tensor, path: PathLike, samplerate: int, bitrate: int = 320,
               clip: tp.Optional[str] = "rescale", bits_per_sample: int = 16,
               as_float: bool = False, preset: int = 2) -> None:
    """Write `[C, T]` float audio (or `[T]` mono) to `.wav`, `.flac` or `.mp3`, chosen by suffix.

    Args:
        clip: how to avoid clipping, see `prevent_clip`.
        bitrate, preset: mp3 bit rate (kbps) and lame quality (2 best to 7 fastest).
        bits_per_sample: 16 or 24 for wav and flac PCM.
        as_float: wav as 32-bit float (flac, integer only, then uses 24 bits).

    The file is first written next to its destination under a temporary name, then renamed, so
    a failure never leaves a partial output file.
    """
    path = Path(path)
    fmt = _format_of(path, samplerate, clip=clip, bits_per_sample=bits_per_sample,
                     as_float=as_float, bitrate=bitrate, preset=preset)
    if wav.dim() == 1:
        wav = wav[None]
    if wav.dim() != 2:
        raise ValueError(
            f"save_audio expects [channels, time] audio, got shape {tuple(wav.shape)}.")
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"Cannot save audio to {path}: folder {path.parent} does not exist.")
    wav = prevent_clip(f32_pcm(wav.detach().cpu()), mode=clip)
    with atomic_write(path) as temporary:
        _encode(_tensor_blocks(wav), temporary, wav.shape[0], fmt)


def encode_wav(wav: torch.Tensor, path: PathLike, samplerate: int, bits_per_sample: int = 16,
               as_float: bool = False) -> None:
    """Write `[C, T]` float audio, clamped to [-1, 1], as a wav file whatever `path`'s suffix:
    16 or 24-bit PCM, or 32-bit float with `as_float` (Demucs 4.1's `encode_wav`)."""
    fmt = AudioFormat("wav", samplerate, clip=None, bits_per_sample=bits_per_sample,
                      as_float=as_float)
    wav = f32_pcm(wav.detach().cpu()).clamp(-1, 1)
    with atomic_write(path) as temporary:
        _encode(_tensor_blocks(wav), temporary, wav.shape[0], fmt)


def _pcm_bytes(wav: torch.Tensor, bits_per_sample: int) -> bytes:
    """Interleaved little-endian PCM: int16 for 16 bits, full-scale int32 for 24 bits."""
    if bits_per_sample == 16:
        return i16_pcm(wav).t().contiguous().numpy().astype("<i2").tobytes()
    if bits_per_sample == 24:
        scaled = (f32_pcm(wav).double().clamp(-1, 1) * (2 ** 31 - 1)).round()
        return scaled.to(torch.int32).t().contiguous().numpy().astype("<i4").tobytes()
    raise ValueError(f"bits_per_sample must be 16 or 24, got {bits_per_sample}.")


def encode_ffmpeg(wav: torch.Tensor, path: PathLike, samplerate: int,
                  bits_per_sample: int = 16) -> None:
    """Write `[C, T]` float audio with ffmpeg, in the format `path`'s suffix names (any format
    ffmpeg can write, e.g. `.flac`, `.ogg`, `.m4a`; Demucs 4.1's `encode_ffmpeg`). Needs ffmpeg."""
    path = Path(path)
    channels = wav.shape[0]
    pcm = _pcm_bytes(wav.detach().cpu(), bits_per_sample)
    sample_format = "s16le" if bits_per_sample == 16 else "s32le"
    with tempfile.TemporaryDirectory(prefix="demucs_encode_") as folder:
        encoded = Path(folder) / path.name  # ffmpeg picks the format from this name's suffix
        command = ["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", sample_format,
                   "-ar", str(samplerate), "-ac", str(channels), "-i", "-", str(encoded)]
        try:
            result = subprocess.run(command, input=pcm, capture_output=True)
        except FileNotFoundError:
            raise RuntimeError(f"Cannot write {path}: ffmpeg is not installed; install it, "
                               "or save as .wav, .flac or .mp3 with save_audio.") from None
        if result.returncode != 0:
            message = _last_message(result.stderr.decode(errors="replace"))
            raise RuntimeError(f"ffmpeg cannot write {path}: {message}")
        with atomic_write(path) as temporary:
            shutil.move(str(encoded), temporary)
