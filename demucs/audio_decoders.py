"""The two decoders of audio files, ffmpeg (with ffprobe) and soundfile, called one file and one
stream at a time, and the checks made before either runs.

Every problem is raised as `AudioReadError`, whose message names the file. Choosing a decoder,
falling back from one to the other and checking the result is `demucs.audio_file.AudioFile`'s job.
"""
import json
from pathlib import Path
import shutil
import struct
import subprocess
import tempfile
import typing as tp

import numpy as np
import soundfile
import torch

from .audio_conversion import resample
from .audio_spool import BLOCK_FRAMES


class AudioReadError(Exception):
    """An audio file could not be read: missing, empty, truncated, not audio or without channels."""


def ffmpeg_available() -> bool:
    return shutil.which("ffprobe") is not None and shutil.which("ffmpeg") is not None


def last_message(text: str) -> str:
    """The last non-empty line of a tool's stderr, usually the most specific one."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def check_readable_file(path: Path) -> None:
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


def probe_ffmpeg(path: Path) -> dict:
    """ffprobe's JSON description (`format` and `streams`) of `path`."""
    command = ["ffprobe", "-loglevel", "error", "-print_format", "json",
               "-show_format", "-show_streams", str(path)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise AudioReadError(f"ffprobe cannot read {path}: {last_message(result.stderr)}")
    return json.loads(result.stdout)


def probe_soundfile(path: Path) -> dict:
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


def decode_ffmpeg(path: Path, stream_index: int, channels: int, seek_time: tp.Optional[float],
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
            message = last_message(result.stderr.decode(errors="replace"))
            raise AudioReadError(f"ffmpeg cannot decode {path}: {message}")
        samples = np.fromfile(raw, dtype=np.float32) if raw.exists() else np.zeros(0, np.float32)
    usable = len(samples) - len(samples) % channels
    return torch.from_numpy(samples[:usable]).view(-1, channels).t()


def ffmpeg_blocks(path: Path, stream_index: int, channels: int,
                  samplerate: int) -> tp.Iterator[torch.Tensor]:
    """Decode a whole stream like `decode_ffmpeg`, yielding `[channels, n]` blocks of
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
            message = last_message(messages.read().decode(errors="replace"))
            raise AudioReadError(f"ffmpeg cannot decode {path}: {message}")


def decode_soundfile(path: Path, seek_time: tp.Optional[float], duration: tp.Optional[float],
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
