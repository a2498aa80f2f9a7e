"""Audio input/output without torchaudio.

Reading goes through ffprobe/ffmpeg (any format and container ffmpeg knows, several streams,
seeking, resampling on the fly) and falls back to soundfile when ffmpeg is not installed or cannot
decode the file. Writing uses soundfile for `.wav`/`.flac` and lameenc for `.mp3`.

Every read problem (missing, empty, truncated, not audio, no channels) is reported as one
`AudioReadError` whose message names the file, and writing never leaves a partial output file.
"""
from fractions import Fraction
import json
import logging
import math
import os
from pathlib import Path
import shutil
import struct
import secrets
import subprocess
import tempfile
import typing as tp

import julius
import lameenc
import numpy as np
import soundfile
import torch
from torch.nn import functional as F

logger = logging.getLogger(__name__)

PathLike = tp.Union[str, os.PathLike]
SAVE_SUFFIXES = (".wav", ".flac", ".mp3")
CLIP_MODES = ("rescale", "clamp", "tanh", "none")
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


def _decode_ffmpeg(path: Path, stream_index: int, channels: int, seek_time: tp.Optional[float],
                   duration: tp.Optional[float], samplerate: tp.Optional[int]) -> torch.Tensor:
    """Decode one stream (global index `stream_index`) to float32 `[channels, time]`.

    ffmpeg writes raw samples to a temporary file that is then read in one go, so the memory used
    is about the size of the decoded audio (the result is a transposed view, not a copy).
    """
    command = ["ffmpeg", "-nostdin", "-y", "-loglevel", "error"]
    if seek_time:
        command += ["-ss", str(seek_time)]
    command += ["-i", str(path), "-map", f"0:{stream_index}"]
    if duration is not None:
        command += ["-t", str(duration)]
    command += ["-threads", "1", "-f", "f32le", "-ac", str(channels)]
    if samplerate is not None:
        command += ["-ar", str(samplerate)]
    with tempfile.TemporaryDirectory(prefix="demucs_decode_") as folder:
        raw = Path(folder) / "audio.f32"
        result = subprocess.run(command + [str(raw)], capture_output=True)
        if result.returncode != 0:
            message = _last_message(result.stderr.decode(errors="replace"))
            raise AudioReadError(f"ffmpeg cannot decode {path}: {message}")
        samples = np.fromfile(raw, dtype=np.float32) if raw.exists() else np.zeros(0, np.float32)
    usable = len(samples) - len(samples) % channels
    return torch.from_numpy(samples[:usable]).view(-1, channels).t()


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


class AudioFile:
    """An audio file on disk, described by ffprobe and decoded by ffmpeg (soundfile as fallback).

    `info` is the ffprobe JSON (`format`, `streams`), computed once. `len(AudioFile(p))` is the
    number of audio streams, described by `channels(stream)`, `samplerate(stream)` and
    `duration()`.
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
    def _audio_streams(self) -> tp.List[dict]:
        return [stream for stream in self.info["streams"] if stream.get("codec_type") == "audio"]

    def __len__(self) -> int:
        return len(self._audio_streams)

    def channels(self, stream: int = 0) -> int:
        return int(self._audio_streams[stream].get("channels", 0))

    def samplerate(self, stream: int = 0) -> int:
        return int(self._audio_streams[stream]["sample_rate"])

    def duration(self) -> float:
        """Duration in seconds of the longest stream (container duration when streams lack one)."""
        durations = [float(stream["duration"]) for stream in self._audio_streams
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

    def _read_stream(self, position: int, seek_time: tp.Optional[float],
                     duration: tp.Optional[float], samplerate: tp.Optional[int],
                     channels: tp.Optional[int]) -> torch.Tensor:
        native_channels = self.channels(position)
        if native_channels <= 0:
            raise AudioReadError(
                f"Audio file {self.path} has no audio channels (stream {position}).")
        rate = samplerate or self.samplerate(position)
        wav = self._decode(position, native_channels, seek_time, duration, samplerate)
        self._check_not_truncated(position, wav, rate, seek_time, duration)
        if channels is not None:
            wav = convert_audio_channels(wav, channels)
        if duration is not None:
            wav = wav[..., :int(rate * duration)]
        return wav

    def _decode(self, position: int, native_channels: int, seek_time: tp.Optional[float],
                duration: tp.Optional[float], samplerate: tp.Optional[int]) -> torch.Tensor:
        if self.info.get("backend") == "soundfile":
            return _decode_soundfile(self.path, seek_time, duration, samplerate)
        stream_index = int(self._audio_streams[position]["index"])
        try:
            return _decode_ffmpeg(self.path, stream_index, native_channels,
                                  seek_time, duration, samplerate)
        except AudioReadError as ffmpeg_error:
            if len(self) != 1:
                raise
            logger.debug("%s; trying soundfile", ffmpeg_error)
            try:
                return _decode_soundfile(self.path, seek_time, duration, samplerate)
            except AudioReadError as soundfile_error:
                raise AudioReadError(f"{ffmpeg_error}; {soundfile_error}") from None

    def _check_not_truncated(self, position: int, wav: torch.Tensor, rate: int,
                             seek_time: tp.Optional[float], duration: tp.Optional[float]) -> None:
        """Fail when the decoder stopped well before the duration the header promised.

        Only for codecs with an exact duration in their header (PCM, FLAC...).
        """
        stream = self._audio_streams[position]
        if not str(stream.get("codec_name", "")).startswith(_EXACT_DURATION_CODECS):
            return
        stream_duration = float(stream.get("duration", self.info["format"].get("duration", 0)))
        available = max(0.0, stream_duration - (seek_time or 0.0))
        expected = available if duration is None else min(duration, available)
        decoded = wav.shape[-1] / rate
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


def prevent_clip(wav: torch.Tensor, mode: tp.Optional[str] = "rescale") -> torch.Tensor:
    """Keep float audio inside [-1, 1] before it is written.

    Modes: `rescale` divides by `max(1.01 * peak, 1)` (no change if already safe), `clamp` clips
    to +/-0.99, `tanh` soft clips, `none` (or None) leaves the audio as is.
    """
    if mode is None or mode == "none":
        return wav
    if not wav.dtype.is_floating_point:
        raise ValueError(f"prevent_clip needs float audio, got {wav.dtype}.")
    if mode == "rescale":
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


def encode_mp3(wav: torch.Tensor, path: PathLike, samplerate: int = 44100, bitrate: int = 320,
               quality: int = 2, verbose: bool = False) -> None:
    """Encode `[C, T]` audio (C = 1 or 2) to a constant bit rate mp3 file with lameenc.

    `quality` is lame's algorithm quality, 2 (best) to 7 (fastest). A LAME "Info" tag is added
    so that decoders trim the codec delay and padding and give back exactly T samples.
    """
    channels = wav.shape[0]
    if channels not in (1, 2):
        raise ValueError(f"mp3 holds 1 or 2 channels, got {channels}; convert the audio first.")
    encoder = lameenc.Encoder()
    encoder.set_bit_rate(bitrate)
    encoder.set_in_sample_rate(samplerate)
    encoder.set_channels(channels)
    encoder.set_quality(quality)
    if not verbose:
        encoder.silence()
    pcm = i16_pcm(wav).t().contiguous().numpy()
    data = bytes(encoder.encode(pcm.tobytes()) + encoder.flush())
    with open(path, "wb") as file:
        file.write(_lame_info_frame(data, samplerate, wav.shape[-1]))
        file.write(data)


def _soundfile_subtype(bits_per_sample: int, as_float: bool, suffix: str) -> str:
    if as_float and suffix == ".wav":
        return "FLOAT"
    if as_float:  # FLAC is integer only: 24 bits is the closest to float precision.
        return "PCM_24"
    if bits_per_sample not in (16, 24):
        raise ValueError(f"bits_per_sample must be 16 or 24, got {bits_per_sample}.")
    return f"PCM_{bits_per_sample}"


def _write(wav: torch.Tensor, path: Path, suffix: str, samplerate: int, bitrate: int,
           bits_per_sample: int, as_float: bool, preset: int) -> None:
    if suffix == ".mp3":
        encode_mp3(wav, path, samplerate, bitrate=bitrate, quality=preset)
        return
    subtype = _soundfile_subtype(bits_per_sample, as_float, suffix)
    audio_format = "WAV" if suffix == ".wav" else "FLAC"
    data = wav.detach().cpu().float().t().contiguous().numpy()
    soundfile.write(str(path), data, samplerate, subtype=subtype, format=audio_format)


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
    suffix = path.suffix.lower()
    if suffix not in SAVE_SUFFIXES:
        raise ValueError(f"Cannot save audio to {path}: unsupported suffix {path.suffix!r}, "
                         f"use one of {', '.join(SAVE_SUFFIXES)}.")
    if wav.dim() == 1:
        wav = wav[None]
    if wav.dim() != 2:
        raise ValueError(
            f"save_audio expects [channels, time] audio, got shape {tuple(wav.shape)}.")
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"Cannot save audio to {path}: folder {path.parent} does not exist.")
    wav = prevent_clip(f32_pcm(wav.detach().cpu()), mode=clip)
    temp_path = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    try:
        _write(wav, temp_path, suffix, samplerate, bitrate, bits_per_sample, as_float, preset)
        os.replace(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
