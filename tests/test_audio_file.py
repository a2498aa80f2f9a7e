"""AudioFile: reading streams, seeking, resampling, the soundfile fallback, clear errors for bad
files, and decoding block by block into a spool."""
from pathlib import Path
import math
import shutil
import subprocess

import pytest
import torch

from demucs import audio_decoders
from demucs.audio_decoders import AudioReadError
from demucs.audio_encoding import encode_mp3, save_audio
from demucs.audio_file import AudioFile, read_audio

from tests.audio_helpers import SR, tonal_audio, wav_header, write_bytes, write_float_wav, write_wav


def test_mp3_without_ffmpeg_has_the_same_length(tmp_path, monkeypatch):
    wav = tonal_audio(channels=1, seconds=0.7)
    path = tmp_path / "mono.mp3"
    encode_mp3(wav, path, SR, bitrate=128)
    monkeypatch.setattr(audio_decoders, "ffmpeg_available", lambda: False)
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

    monkeypatch.setattr(audio_decoders, "decode_ffmpeg", broken_ffmpeg)
    assert torch.allclose(read_audio(path), expected)
    monkeypatch.setattr(audio_decoders, "ffmpeg_available", lambda: False)
    part = AudioFile(path).read(seek_time=0.25, duration=0.5, streams=0, samplerate=22050)
    assert part.shape == (2, int(0.5 * 22050))


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
        monkeypatch.setattr(audio_decoders, "ffmpeg_available", lambda: False)
    with pytest.raises(AudioReadError, match=str(path).replace(".", r"\.")):
        READERS[reader](path)


def test_missing_stream_is_a_clear_error(tmp_path):
    path = write_wav(tmp_path)
    with pytest.raises(AudioReadError, match="stream 3 does not exist"):
        AudioFile(path).read(streams=3)


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
        monkeypatch.setattr(audio_decoders, "ffmpeg_available", lambda: False)
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

    monkeypatch.setattr(audio_decoders, "ffmpeg_blocks", broken_ffmpeg)
    with AudioFile(path).decode_to_spool(SR, 2) as decoded:
        assert torch.equal(decoded.read(0, decoded.length), read_audio(path))


@pytest.mark.parametrize("ffmpeg", [True, False], ids=["ffmpeg", "soundfile"])
def test_decode_to_spool_refuses_non_finite_samples_where_they_are(tmp_path, monkeypatch,
                                                                   ffmpeg):
    wav = tonal_audio(seconds=2)
    wav[1, 70_000:70_003] = math.inf
    path = write_float_wav(tmp_path, "inf.wav", wav)
    if not ffmpeg:
        monkeypatch.setattr(audio_decoders, "ffmpeg_available", lambda: False)
    message = (r"inf\.wav holds 3 NaN or infinite sample\(s\), the first at sample 70000 "
               r"\(1\.587 s\)")
    with pytest.raises(AudioReadError, match=message):
        AudioFile(path).decode_to_spool(SR, 2)


def test_decode_to_spool_refuses_a_stream_without_samples(tmp_path):
    path = write_bytes(tmp_path / "silent.wav", wav_header(2, 0))
    with pytest.raises(AudioReadError, match="silent.wav holds no audio samples"):
        AudioFile(path).decode_to_spool(SR, 2)
