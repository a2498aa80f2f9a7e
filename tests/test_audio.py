"""Audio I/O: round trips per format, mp3 length, conversions and the clear read errors."""
import math
from pathlib import Path
import shutil
import struct
import subprocess

from hypothesis import given, settings, strategies as st
import numpy as np
import pytest
import torch

from demucs import audio
from demucs.audio import (AudioFile, AudioReadError, as_dtype_pcm, convert_audio,
                          convert_audio_channels, encode_mp3, f32_pcm, i16_pcm, prevent_clip,
                          read_audio, save_audio)

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
    assert back.shape[0] == 2
    assert abs(back.shape[-1] - wav.shape[-1]) <= 1152
    length = min(back.shape[-1], wav.shape[-1])
    error = (back[:, :length] - wav[:, :length]).pow(2).mean() / wav.pow(2).mean()
    assert error.item() < 0.05, "decoded mp3 is not aligned with its input"


def test_mp3_without_ffmpeg_has_the_same_length(tmp_path, monkeypatch):
    wav = tonal_audio(channels=1, seconds=0.7)
    path = tmp_path / "mono.mp3"
    encode_mp3(wav, path, SR, bitrate=128)
    monkeypatch.setattr(audio, "_ffmpeg_available", lambda: False)
    assert abs(read_audio(path).shape[-1] - wav.shape[-1]) <= 1152


def test_read_seek_duration_and_streams(tmp_path):
    wav = tonal_audio(seconds=2)
    path = tmp_path / "x.wav"
    save_audio(wav, path, SR, as_float=True, clip="none")
    file = AudioFile(path)
    part = file.read(seek_time=0.5, duration=0.25, streams=0)
    start = int(0.5 * SR)
    assert part.shape == (2, int(0.25 * SR))
    assert torch.allclose(part, wav[:, start:start + part.shape[-1]], atol=1e-6)
    stacked = file.read(duration=0.1)
    assert stacked.shape == (1, 2, int(0.1 * SR))


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg to build the file")
def test_read_several_streams(tmp_path):
    first, second = tonal_audio(seconds=0.5), -0.5 * tonal_audio(seconds=0.5)
    save_audio(first, tmp_path / "a.wav", SR, as_float=True, clip="none")
    save_audio(second, tmp_path / "b.wav", SR, as_float=True, clip="none")
    both = tmp_path / "both.mka"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(tmp_path / "a.wav"), "-i",
                    str(tmp_path / "b.wav"), "-map", "0", "-map", "1", "-c:a", "pcm_f32le",
                    str(both)], check=True)
    file = AudioFile(both)
    assert len(file) == 2
    stacked = file.read()
    assert stacked.shape == (2, 2, first.shape[-1])
    assert torch.allclose(stacked[1], second, atol=1e-6)
    assert torch.allclose(file.read(streams=[1, 0])[1], first, atol=1e-6)


def test_read_resamples_and_converts_channels(tmp_path):
    path = write_wav(tmp_path)
    file = AudioFile(path)
    mono = file.read(streams=0, channels=1)
    assert torch.allclose(mono, file.read(streams=0).mean(0, keepdim=True), atol=1e-6)
    resampled = read_audio(path, samplerate=22050, channels=2)
    assert resampled.shape[0] == 2 and abs(resampled.shape[-1] - SR // 2) <= 2


def test_read_falls_back_to_soundfile(tmp_path, monkeypatch):
    path = write_wav(tmp_path)
    expected = read_audio(path)

    def broken_ffmpeg(*args, **kwargs):
        raise AudioReadError("ffmpeg cannot decode (simulated)")

    monkeypatch.setattr(audio, "_decode_ffmpeg", broken_ffmpeg)
    assert torch.allclose(read_audio(path), expected)
    monkeypatch.setattr(audio, "_ffmpeg_available", lambda: False)
    part = AudioFile(path).read(seek_time=0.25, duration=0.5, streams=0, samplerate=22050)
    assert part.shape == (2, int(0.5 * 22050))


def wav_header(channels: int, data_bytes: int) -> bytes:
    fmt = struct.pack("<HHIIHH", 1, channels, SR, SR * 2 * channels, 2 * channels, 16)
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE" + b"fmt "
            + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", data_bytes))


def write_bytes(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def truncate(path: Path, keep: int) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return path


BAD_FILES = {
    "missing": lambda tmp: tmp / "missing.wav",
    "folder": lambda tmp: tmp,
    "empty": lambda tmp: write_bytes(tmp / "empty.wav", b""),
    "header only": lambda tmp: truncate(write_wav(tmp), 30),
    "truncated wav mid sample": lambda tmp: truncate(write_wav(tmp), 44 + 4 * 1000 + 3),
    "truncated wav on a sample": lambda tmp: truncate(write_wav(tmp), 44 + 4 * 1000),
    "truncated flac": lambda tmp: truncate(write_wav(tmp, "x.flac"),
                                           (tmp / "x.flac").stat().st_size // 2),
    "text": lambda tmp: write_bytes(tmp / "notes.wav", b"not audio " * 50),
    "zero channels": lambda tmp: write_bytes(tmp / "zero.wav", wav_header(0, 400) + bytes(400)),
}


@pytest.mark.parametrize("ffmpeg", [True, False], ids=["ffmpeg", "soundfile"])
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_input_gives_clear_error(tmp_path, monkeypatch, case, ffmpeg):
    path = BAD_FILES[case](tmp_path)
    if not ffmpeg:
        monkeypatch.setattr(audio, "_ffmpeg_available", lambda: False)
    with pytest.raises(AudioReadError, match=str(path).replace(".", r"\.")):
        read_audio(path)


def test_missing_stream_is_a_clear_error(tmp_path):
    path = write_wav(tmp_path)
    with pytest.raises(AudioReadError, match="stream 3 does not exist"):
        AudioFile(path).read(streams=3)


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


@pytest.mark.parametrize("src, dst, expected", [(2, 1, 1), (1, 2, 2), (3, 2, 2), (2, 2, 2)])
def test_convert_audio_channels_shapes(src, dst, expected):
    wav = torch.randn(4, src, 100)
    out = convert_audio_channels(wav, dst)
    assert out.shape == (4, expected, 100)
    if dst == 1:
        assert torch.allclose(out[:, 0], wav.mean(1))
    elif src >= dst:
        assert torch.equal(out, wav[:, :dst])
    else:
        assert torch.equal(out[:, 1], wav[:, 0])


def test_convert_audio_channels_refuses_upmix_from_stereo():
    with pytest.raises(ValueError, match="2 channels to 3"):
        convert_audio_channels(torch.zeros(2, 10), 3)


def test_convert_audio_resamples_and_converts():
    out = convert_audio(torch.randn(2, 1, SR), SR, 22050, channels=2)
    assert out.shape == (2, 2, 22050)


def test_prevent_clip_modes():
    wav = torch.linspace(-3, 3, 101)
    assert prevent_clip(wav, "rescale").abs().max().item() == pytest.approx(1 / 1.01)
    assert torch.equal(prevent_clip(wav * 0.1, "rescale"), wav * 0.1)
    assert prevent_clip(wav, "clamp").abs().max().item() == pytest.approx(0.99)
    assert torch.allclose(prevent_clip(wav, "tanh"), torch.tanh(wav))
    assert prevent_clip(wav, "none") is wav and prevent_clip(wav, None) is wav
    with pytest.raises(ValueError, match="'loud'"):
        prevent_clip(wav, "loud")


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(-2 ** 15 + 1, 2 ** 15 - 1), min_size=1, max_size=64))
def test_pcm_int16_float_round_trip(values):
    pcm = torch.tensor(values, dtype=torch.int16)
    as_float = f32_pcm(pcm)
    assert as_float.abs().max().item() <= 1
    assert torch.equal(i16_pcm(as_float), pcm)
    assert torch.equal(as_dtype_pcm(as_dtype_pcm(pcm, torch.float32), torch.int16), pcm)


def test_i16_pcm_clamps_float():
    assert i16_pcm(torch.tensor([-2.0, 0.5, 2.0])).tolist() == [-32767, 16384, 32767]
    np.testing.assert_array_equal(f32_pcm(torch.tensor([0.25])).numpy(), [0.25])
