"""Audio I/O: round trips per format, mp3 length, conversions, the clear read errors, the spool,
block-wise decoding and writing, and the mode of written files."""
import math
import os
from pathlib import Path
import shutil
import struct
import subprocess

from hypothesis import given, settings, strategies as st
import numpy as np
import pytest
import torch

from demucs import audio
from demucs.audio import (AudioFile, AudioFormat, AudioReadError, AudioSpool, AudioWriter,
                          as_dtype_pcm, convert_audio, convert_audio_channels, encode_mp3,
                          f32_pcm, i16_pcm, prevent_clip, read_audio, save_audio)

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


READERS = {
    "in memory": read_audio,
    "spooled": lambda path: AudioFile(path).decode_to_spool(SR, 2).close(),
}


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("ffmpeg", [True, False], ids=["ffmpeg", "soundfile"])
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_input_gives_clear_error(tmp_path, monkeypatch, case, ffmpeg, reader):
    path = BAD_FILES[case](tmp_path)
    if not ffmpeg:
        monkeypatch.setattr(audio, "_ffmpeg_available", lambda: False)
    with pytest.raises(AudioReadError, match=str(path).replace(".", r"\.")):
        READERS[reader](path)


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


def test_spool_round_trip():
    generator = torch.Generator().manual_seed(0)
    blocks = [torch.randn(3, length, generator=generator) for length in (5, 0, 70_000, 3)]
    whole = torch.cat(blocks, dim=-1)
    with AudioSpool(3) as spool:
        for block in blocks:
            spool.append(block)
        assert spool.length == whole.shape[-1]
        assert torch.equal(spool.read(0, spool.length), whole)
        assert torch.equal(spool.read(65_000, 65_010), whole[:, 65_000:65_010])
        assert torch.equal(spool.read(70_000, 80_000), whole[:, 70_000:])  # past the end
        assert spool.read(10, 10).shape == (3, 0)
        parts = list(spool.blocks(frames=30_000))
        assert [part.shape[-1] for part in parts] == [30_000, 30_000, 10_008]
        assert torch.equal(torch.cat(parts, dim=-1), whole)


def write_float_wav(tmp_path: Path, name: str, wav: torch.Tensor, samplerate: int = SR) -> Path:
    path = tmp_path / name
    save_audio(wav, path, samplerate, as_float=True, clip="none")
    return path


SPOOL_CASES = {  # file written, samplerate and channels asked
    "stereo": (lambda tmp: write_float_wav(tmp, "a.wav", tonal_audio(seconds=2)), SR, 2),
    "mono to stereo": (lambda tmp: write_float_wav(tmp, "m.wav", tonal_audio(1, 2)), SR, 2),
    "stereo to mono": (lambda tmp: write_float_wav(tmp, "s.wav", tonal_audio(2, 2)), SR, 1),
    "6 channels to stereo": (lambda tmp: write_float_wav(tmp, "6.wav", tonal_audio(6, 1)), SR, 2),
    "48 kHz": (lambda tmp: write_float_wav(tmp, "h.wav", tonal_audio(2, 2, 48000), 48000), SR, 2),
    "mp3": (lambda tmp: write_wav(tmp, "x.mp3", seconds=2), SR, 2),
}


@pytest.mark.parametrize("ffmpeg", [True, False], ids=["ffmpeg", "soundfile"])
@pytest.mark.parametrize("case", list(SPOOL_CASES))
def test_decode_to_spool_gives_the_samples_read_gives(tmp_path, monkeypatch, case, ffmpeg):
    make, samplerate, channels = SPOOL_CASES[case]
    path = make(tmp_path)
    if not ffmpeg:
        monkeypatch.setattr(audio, "_ffmpeg_available", lambda: False)
    expected = AudioFile(path).read(streams=0, samplerate=samplerate, channels=channels)
    with AudioFile(path).decode_to_spool(samplerate, channels) as decoded:
        assert (decoded.channels, decoded.length) == tuple(expected.shape)
        assert torch.equal(decoded.read(0, decoded.length), expected)
        mono = expected.double().mean(0)
        assert decoded.mono_mean == pytest.approx(mono.mean().item(), abs=1e-12)
        assert decoded.mono_std == pytest.approx(mono.std().item(), rel=1e-9)


def test_decode_to_spool_falls_back_to_soundfile_when_ffmpeg_fails(tmp_path, monkeypatch):
    path = write_float_wav(tmp_path, "x.wav", tonal_audio())

    def broken_ffmpeg(*args, **kwargs):
        raise AudioReadError("ffmpeg cannot decode (simulated)")
        yield  # a generator, as the real one

    monkeypatch.setattr(audio, "_ffmpeg_blocks", broken_ffmpeg)
    with AudioFile(path).decode_to_spool(SR, 2) as decoded:
        assert torch.equal(decoded.read(0, decoded.length), read_audio(path))


@pytest.mark.parametrize("ffmpeg", [True, False], ids=["ffmpeg", "soundfile"])
def test_decode_to_spool_refuses_non_finite_samples_where_they_are(tmp_path, monkeypatch,
                                                                   ffmpeg):
    wav = tonal_audio(seconds=2)
    wav[1, 70_000:70_003] = math.inf
    path = write_float_wav(tmp_path, "inf.wav", wav)
    if not ffmpeg:
        monkeypatch.setattr(audio, "_ffmpeg_available", lambda: False)
    message = (r"inf\.wav holds 3 NaN or infinite sample\(s\), the first at sample 70000 "
               r"\(1\.587 s\)")
    with pytest.raises(AudioReadError, match=message):
        AudioFile(path).decode_to_spool(SR, 2)


def test_decode_to_spool_refuses_a_stream_without_samples(tmp_path):
    path = write_bytes(tmp_path / "silent.wav", wav_header(2, 0))
    with pytest.raises(AudioReadError, match="silent.wav holds no audio samples"):
        AudioFile(path).decode_to_spool(SR, 2)


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
    audio.encode_wav(wav, path, 44100, bits_per_sample=bits, as_float=as_float)
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
    audio.encode_ffmpeg(wav, path, 44100, bits_per_sample=bits)
    decoded = AudioFile(path).read(streams=0)
    assert decoded.shape == wav.shape
    assert (decoded - wav).abs().max() < 2 / 2 ** 15
    assert [p.name for p in tmp_path.iterdir()] == ["stem.flac"]


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_encode_ffmpeg_names_the_file_when_the_format_is_unknown(tmp_path):
    with pytest.raises(RuntimeError, match=r"ffmpeg cannot write .*stem\.notaformat"):
        audio.encode_ffmpeg(torch.zeros(2, 100), tmp_path / "stem.notaformat", 44100)
    assert list(tmp_path.iterdir()) == []


def test_encode_ffmpeg_without_ffmpeg_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="ffmpeg is not installed"):
        audio.encode_ffmpeg(torch.zeros(2, 100), tmp_path / "stem.flac", 44100)
