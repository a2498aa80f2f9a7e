"""Encoders: round trips per format, mp3 length and bytes, clipping, the block writer, failed
writes that leave no file, the mode of written files, encode_wav and encode_ffmpeg."""
import os
from pathlib import Path
import shutil
import subprocess

import numpy as np
import pytest
import torch

from demucs.audio_encoding import (AudioFormat, AudioWriter, encode_ffmpeg, encode_wav,
                                   save_audio)
from demucs.audio_file import AudioFile, read_audio

from tests.audio_helpers import SR, tonal_audio


@pytest.mark.parametrize("suffix, kwargs, tolerance", [
    (".wav", dict(bits_per_sample=16), 1.5 / 2 ** 15),
    (".wav", dict(bits_per_sample=24), 1.5 / 2 ** 23),
    (".wav", dict(as_float=True), 1e-7),
    (".flac", dict(bits_per_sample=16), 1.5 / 2 ** 15),
    (".flac", dict(bits_per_sample=24), 1.5 / 2 ** 23),
])
def test_round_trip_within_format_precision(tmp_path, suffix, kwargs, tolerance):
    wav = tonal_audio()
    path = tmp_path / f"x{suffix}"
    save_audio(wav, path, SR, clip="none", **kwargs)
    file = AudioFile(path)
    assert (len(file), file.channels(), file.samplerate()) == (1, 2, SR)
    assert file.duration() == pytest.approx(1.0, abs=1e-4)
    back = file.read(streams=0)
    assert back.dtype == torch.float32 and back.shape == wav.shape
    assert (back - wav).abs().max().item() <= tolerance


def test_mp3_decodes_to_input_length_and_content(tmp_path):
    wav = tonal_audio(seconds=1.3)
    path = tmp_path / "x.mp3"
    save_audio(wav, path, SR, bitrate=192, preset=5)
    back = read_audio(path)
    assert back.shape == wav.shape
    error = (back - wav).pow(2).mean() / wav.pow(2).mean()
    assert error.item() < 0.05, "decoded mp3 is not aligned with its input"


def ffmpeg_decoded_frames(path: Path) -> int:
    """How many samples per channel ffmpeg decodes from `path` (f32le straight from ffmpeg)."""
    result = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(path),
                             "-f", "f32le", "-"], capture_output=True, check=True)
    return len(result.stdout) // 4 // AudioFile(path).channels()


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg to decode")
@pytest.mark.parametrize("channels", [1, 2])
def test_mp3_writers_give_exactly_the_input_length_and_the_same_file(tmp_path, channels):
    """save_audio (one tensor) and AudioWriter (blocks, as the demucs command writes) share one
    mp3 encoder: the same bytes, with a gapless Info frame, so 3 s decode to 132,300 samples."""
    wav = tonal_audio(channels=channels, seconds=3.0)
    save_audio(wav, tmp_path / "whole.mp3", SR, preset=7)
    with AudioWriter(channels) as writer:
        for start in range(0, wav.shape[-1], 50000):
            writer.append(wav[:, start:start + 50000])
        writer.encode(tmp_path / "blocks.mp3", AudioFormat("mp3", SR, preset=7))
    assert (tmp_path / "whole.mp3").read_bytes() == (tmp_path / "blocks.mp3").read_bytes()
    assert ffmpeg_decoded_frames(tmp_path / "whole.mp3") == 132_300


def test_save_rejects_unknown_suffix_without_writing(tmp_path):
    with pytest.raises(ValueError, match=r"'\.ogg'.*\.wav, \.flac, \.mp3"):
        save_audio(tonal_audio(), tmp_path / "x.ogg", SR)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, kwargs", [
    ("x.wav", dict(bits_per_sample=12)),
    ("x.mp3", dict(wav=torch.zeros(3, 1000))),
])
def test_failed_save_leaves_no_partial_file(tmp_path, name, kwargs):
    target = tmp_path / name
    target.write_bytes(b"previous content")
    wav = kwargs.pop("wav", tonal_audio())
    with pytest.raises(ValueError):
        save_audio(wav, target, SR, **kwargs)
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert target.read_bytes() == b"previous content"


def test_save_into_missing_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_audio(tonal_audio(), tmp_path / "nope" / "x.wav", SR)


def test_save_rescales_to_avoid_clipping(tmp_path):
    loud = tonal_audio() * 8
    path = tmp_path / "loud.wav"
    save_audio(loud, path, SR, as_float=True)
    back = read_audio(path)
    assert back.abs().max().item() == pytest.approx(1 / 1.01, rel=1e-4)
    assert torch.allclose(back * 1.01 * loud.abs().max(), loud, atol=1e-4)


def test_writer_rescales_every_block_like_save_audio(tmp_path):
    loud = tonal_audio(seconds=3) * torch.linspace(0, 8, 3 * SR)
    save_audio(loud, tmp_path / "whole.wav", SR)
    with AudioWriter(2) as writer:
        for start in range(0, loud.shape[-1], 40_000):
            writer.append(loud[:, start:start + 40_000])
        assert writer.peak == loud.abs().max().item()
        writer.encode(tmp_path / "blocks.wav", AudioFormat("wav", SR))
    assert (tmp_path / "whole.wav").read_bytes() == (tmp_path / "blocks.wav").read_bytes()


@pytest.fixture
def umask():
    """Set the process umask for a test (`umask(0o022)`), restored afterwards."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
@pytest.mark.parametrize("name", ["x.wav", "x.flac", "x.mp3"])
def test_saved_files_get_the_mode_of_a_plain_open(tmp_path, umask, mask, mode, name):
    umask(mask)
    save_audio(tonal_audio(seconds=0.2), tmp_path / name, SR)
    assert (tmp_path / name).stat().st_mode & 0o777 == mode
    assert [path.name for path in tmp_path.iterdir()] == [name]


@pytest.mark.parametrize("bits,as_float,subtype", [(16, False, "PCM_16"), (24, False, "PCM_24"),
                                                   (16, True, "FLOAT")])
def test_encode_wav_writes_wav_whatever_the_suffix(tmp_path, bits, as_float, subtype):
    import soundfile
    wav = torch.linspace(-1.5, 1.5, 2 * 4410).view(2, -1)  # clamped to [-1, 1]
    path = tmp_path / "stem.bin"
    encode_wav(wav, path, 44100, bits_per_sample=bits, as_float=as_float)
    info = soundfile.info(str(path))
    assert (info.format, info.subtype, info.frames, info.channels) == ("WAV", subtype, 4410, 2)
    data, _ = soundfile.read(str(path), dtype="float32", always_2d=True)
    tolerance = 1e-7 if as_float else 1.01 / 2 ** (bits - 1)  # one quantization step at full scale
    assert np.abs(data.T - wav.clamp(-1, 1).numpy()).max() < tolerance
    assert [p.name for p in tmp_path.iterdir()] == ["stem.bin"]


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
@pytest.mark.parametrize("bits", [16, 24])
def test_encode_ffmpeg_follows_the_suffix(tmp_path, bits):
    wav = 0.5 * torch.sin(torch.arange(2 * 22050) / 10.).view(2, -1)
    path = tmp_path / "stem.flac"
    encode_ffmpeg(wav, path, 44100, bits_per_sample=bits)
    decoded = AudioFile(path).read(streams=0)
    assert decoded.shape == wav.shape
    assert (decoded - wav).abs().max() < 2 / 2 ** 15
    assert [p.name for p in tmp_path.iterdir()] == ["stem.flac"]


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_encode_ffmpeg_names_the_file_when_the_format_is_unknown(tmp_path):
    with pytest.raises(RuntimeError, match=r"ffmpeg cannot write .*stem\.notaformat"):
        encode_ffmpeg(torch.zeros(2, 100), tmp_path / "stem.notaformat", 44100)
    assert list(tmp_path.iterdir()) == []


def test_encode_ffmpeg_without_ffmpeg_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="ffmpeg is not installed"):
        encode_ffmpeg(torch.zeros(2, 100), tmp_path / "stem.flac", 44100)
