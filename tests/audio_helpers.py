"""Audio made and written for the tests of the audio modules: tonal test signals, wav files and
hand-made wav headers."""
import math
from pathlib import Path
import struct

import torch

from demucs.audio_encoding import save_audio

SR = 44100


def tonal_audio(channels: int = 2, seconds: float = 1.0, samplerate: int = SR) -> torch.Tensor:
    """A few partials per channel plus a little noise, peak well below 1."""
    generator = torch.Generator().manual_seed(1234)
    time = torch.arange(int(seconds * samplerate)) / samplerate
    freqs = torch.tensor([220.0, 331.0, 440.0, 1250.0])[:, None]
    wav = torch.stack([(torch.sin(2 * math.pi * freqs * (1 + 0.01 * c) * time)).sum(0) / 8
                       for c in range(channels)])
    return wav + 0.01 * torch.randn(wav.shape, generator=generator)


def write_wav(tmp_path: Path, name: str = "ok.wav", **kwargs) -> Path:
    path = tmp_path / name
    save_audio(tonal_audio(**kwargs), path, SR, clip="none")
    return path


def wav_header(channels: int, data_bytes: int) -> bytes:
    fmt = struct.pack("<HHIIHH", 1, channels, SR, SR * 2 * channels, 2 * channels, 16)
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE" + b"fmt "
            + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", data_bytes))


def write_bytes(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def write_float_wav(tmp_path: Path, name: str, wav: torch.Tensor, samplerate: int = SR) -> Path:
    path = tmp_path / name
    save_audio(wav, path, samplerate, as_float=True, clip="none")
    return path
