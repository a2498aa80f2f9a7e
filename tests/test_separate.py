"""The `demucs` command on a local model repository: flags, output names, formats and errors."""
import logging
import os
from pathlib import Path
import random
import typing as tp
import shutil
import subprocess

import numpy as np
import pytest
import soundfile
import torch

from demucs.api import Separator
from demucs.audio import AudioFile
from demucs.htdemucs import HTDemucs
from demucs.pretrained import SOURCES, demucs_unittest
from demucs.separate import main
from demucs.states import serialize_model

SAMPLERATE = 44100
LENGTH = int(1.2 * SAMPLERATE)
torch.set_num_threads(1)  # tiny models: extra threads only add contention


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    torch.manual_seed(0)
    torch.save(serialize_model(demucs_unittest(), {}), root / "tiny.th")
    torch.save(serialize_model(HTDemucs(SOURCES, channels=4, depth=2, t_layers=1, t_heads=1,
                                        segment=1, dconv_mode=0), {}), root / "transformer.th")
    # Specialists, as htdemucs_ft: the transformer alone weighs the vocals.
    (root / "specialists.yaml").write_text(
        "models: ['tiny', 'transformer']\nweights: [[1, 1, 1, 0], [0, 0, 0, 1]]\n")
    return root


@pytest.fixture(scope="module")
def track(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    time = np.arange(LENGTH) / SAMPLERATE
    wav = 0.5 * np.sin(2 * np.pi * 330 * time)[:, None] + 0.1 * rng.standard_normal((LENGTH, 2))
    path = tmp_path_factory.mktemp("audio") / "my song.wav"
    soundfile.write(str(path), wav.astype(np.float32), SAMPLERATE)
    return path


def _run(repo: Path, out: Path, *flags: str, name: str = "tiny") -> None:
    random.seed(0)
    main(["-n", name, "--repo", str(repo), "-o", str(out), "-d", "cpu", *flags])


def _read(path: Path) -> np.ndarray:
    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    assert rate == SAMPLERATE
    return data.T


def test_default_outputs_wav_stems(repo: Path, track: Path, tmp_path: Path):
    _run(repo, tmp_path, str(track))
    folder = tmp_path / "tiny" / "my song"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{s}.wav" for s in SOURCES)
    info = soundfile.info(str(folder / "drums.wav"))
    assert (info.frames, info.channels, info.subtype) == (LENGTH, 2, "PCM_16")


def test_streamed_cli_output_matches_in_memory_separation(repo: Path, track: Path, tmp_path: Path):
    _run(repo, tmp_path, "--float32", "--clip-mode", "none", "--shifts", "2", "--overlap", "0.4",
         "--segment", "1", str(track))
    separator = Separator("tiny", repo=repo, device="cpu", shifts=2, overlap=0.4, segment=1)
    random.seed(0)
    _, stems = separator.separate_audio_file(track)
    for name, stem in stems.items():
        written = torch.from_numpy(_read(tmp_path / "tiny" / "my song" / f"{name}.wav"))
        assert (written - stem).norm() / stem.norm() < 1e-4


def test_no_split_jobs_and_verbose(repo: Path, track: Path, tmp_path: Path):
    _run(repo, tmp_path / "a", "--float32", "--no-split", "--shifts", "0", "-v", str(track))
    _run(repo, tmp_path / "b", "--float32", "-j", "2", "--shifts", "0", str(track))
    for name in SOURCES:
        whole = _read(tmp_path / "a" / "tiny" / "my song" / f"{name}.wav")
        split = _read(tmp_path / "b" / "tiny" / "my song" / f"{name}.wav")
        assert whole.shape == split.shape == (2, LENGTH)
        # The track is shorter than the model's segment: splitting gives one whole-track chunk.
        assert np.allclose(whole, split, atol=1e-5)


@pytest.mark.parametrize("flags,suffix,subtype", [
    (["--flac"], "flac", "PCM_16"),
    (["--flac", "--int24"], "flac", "PCM_24"),
    (["--int24", "--clip-mode", "clamp"], "wav", "PCM_24"),
    (["--float32"], "wav", "FLOAT"),
])
def test_lossless_formats(repo, track, tmp_path, flags, suffix, subtype):
    _run(repo, tmp_path, "--shifts", "0", "--filename", "{stem}-{track}.{trackext}.{ext}",
         *flags, str(track))
    path = tmp_path / "tiny" / f"bass-my song.wav.{suffix}"
    info = soundfile.info(str(path))
    assert (info.frames, info.channels, info.subtype) == (LENGTH, 2, subtype)


def test_mp3(repo: Path, track: Path, tmp_path: Path):
    _run(repo, tmp_path, "--mp3", "--mp3-bitrate", "128", "--mp3-preset", "7", "--shifts", "0",
         "--filename", "{track}/{stem}.{ext}", str(track))
    path = tmp_path / "tiny" / "my song" / "vocals.mp3"
    audio = AudioFile(path)
    wav = audio.read(streams=0, samplerate=SAMPLERATE)
    assert wav.shape == (2, LENGTH)  # the Info frame tells decoders the delay and padding
    assert 120_000 < 8 * path.stat().st_size / audio.duration() < 140_000


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg to decode")
@pytest.mark.parametrize("channels", [1, 2])
def test_mp3_stems_decode_with_ffmpeg_to_exactly_the_input_length(repo, tmp_path, channels):
    time = np.arange(3 * SAMPLERATE) / SAMPLERATE
    wav = 0.5 * np.sin(2 * np.pi * 330 * time)[:, None] * np.linspace(1, 0.5, channels)
    track = tmp_path / "three seconds.wav"
    soundfile.write(str(track), wav.astype(np.float32), SAMPLERATE)
    _run(repo, tmp_path, "--mp3", "--shifts", "0", str(track))
    for name in SOURCES:
        decoded = subprocess.run(
            ["ffmpeg", "-nostdin", "-loglevel", "error", "-i",
             str(tmp_path / "tiny" / "three seconds" / f"{name}.mp3"), "-f", "f32le", "-"],
            capture_output=True, check=True).stdout
        assert len(decoded) // 4 // 2 == 132_300  # stereo stems, whatever the input


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.mark.parametrize("flags", [[], ["--flac"], ["--mp3"]])
def test_separated_files_get_the_mode_of_a_plain_open(repo, track, tmp_path, umask_022, flags):
    _run(repo, tmp_path, "--shifts", "0", *flags, str(track))
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert len(written) == len(SOURCES)
    assert {path.stat().st_mode & 0o777 for path in written} == {0o644}


@pytest.mark.parametrize("method,names", [
    ("add", ["no_vocals", "vocals"]),
    ("minus", ["minus_vocals", "vocals"]),
    ("none", ["vocals"]),
])
def test_two_stems(repo, track, tmp_path, method, names):
    flags = ["--float32", "--clip-mode", "none", "--shifts", "0"]
    _run(repo, tmp_path / "two", "--two-stems", "vocals", "--other-method", method, *flags,
         str(track))
    folder = tmp_path / "two" / "tiny" / "my song"
    assert sorted(p.stem for p in folder.iterdir()) == names
    vocals = _read(folder / "vocals.wav")
    if method == "minus":
        origin = _read(track)
        assert np.allclose(vocals + _read(folder / "minus_vocals.wav"), origin, atol=1e-5)
    if method == "add":
        _run(repo, tmp_path / "all", *flags, str(track))
        full = tmp_path / "all" / "tiny" / "my song"
        others = sum(_read(full / f"{name}.wav") for name in SOURCES if name != "vocals")
        assert np.allclose(_read(folder / "no_vocals.wav"), others, atol=1e-5)
        assert np.allclose(vocals, _read(full / "vocals.wav"), atol=1e-6)


def test_bad_tracks_are_reported_and_others_processed(repo, track, tmp_path, caplog):
    bad = tmp_path / "broken.mp3"
    bad.write_bytes(b"\x00garbage" * 100)
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_info:
        _run(repo, tmp_path / "out", "--shifts", "0", str(bad), str(track))
    assert exit_info.value.code == 1
    assert "broken.mp3" in caplog.text
    assert "1 of 2 track(s) could not be separated" in caplog.text
    outputs = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*")
                     if p.is_file())
    assert outputs == sorted(Path("tiny/my song") / f"{s}.wav" for s in SOURCES)


def test_missing_tracks_are_refused_before_any_work(repo, track, tmp_path, caplog):
    missing = [tmp_path / "missing.wav", tmp_path / "gone.flac"]
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_info:
        _run(repo, tmp_path / "out", "--shifts", "0", str(missing[0]), str(track),
             str(missing[1]))
    assert exit_info.value.code == 1
    assert f"no such file: {missing[0]}, {missing[1]}" in caplog.text
    assert not (tmp_path / "out").exists()


def _forwards(monkeypatch) -> tp.List[str]:
    """The class of each model the separation runs, in order."""
    from demucs import runner
    seen: tp.List[str] = []
    real = runner.run_model

    def spy(model, *args, **kwargs):
        seen.append(type(model).__name__)
        return real(model, *args, **kwargs)
    monkeypatch.setattr(runner, "run_model", spy)
    return seen


@pytest.mark.parametrize("flags, written, models", [
    (["--two-stems", "vocals", "--other-method", "minus"], ["minus_vocals", "vocals"],
     {"HTDemucs"}),
    (["--two-stems", "vocals", "--other-method", "none"], ["vocals"], {"HTDemucs"}),
    (["--stems", "vocals"], ["vocals"], {"HTDemucs"}),
    (["--stems", "drums,vocals"], ["drums", "vocals"], {"HDemucs", "HTDemucs"}),
    (["--two-stems", "vocals"], ["no_vocals", "vocals"], {"HDemucs", "HTDemucs"})])
def test_only_the_models_weighing_the_stems_asked_for_run(
        repo, track, tmp_path, monkeypatch, flags, written, models):
    fixed = ["--float32", "--clip-mode", "none", "--shifts", "2", str(track)]
    _run(repo, tmp_path / "all", *fixed, name="specialists")
    seen = _forwards(monkeypatch)
    _run(repo, tmp_path / "some", *flags, *fixed, name="specialists")
    assert set(seen) == models
    folder, full = (tmp_path / name / "specialists" / "my song" for name in ["some", "all"])
    assert sorted(path.stem for path in folder.iterdir()) == written
    for stem in set(written) & set(SOURCES):  # bit-identical to the full separation
        assert np.array_equal(_read(folder / f"{stem}.wav"), _read(full / f"{stem}.wav"))


@pytest.mark.parametrize("flags,message", [
    (["--two-stems", "guitar"], 'stem "guitar" is not in selected model'),
    (["--stems", "vocals,guitar"], 'stem "guitar" is not in selected model'),
    (["--stems", "vocals", "--two-stems", "drums"], "--stems and --two-stems both choose"),
    (["-n", "transformer", "--segment", "2"], "Maximum segment is: 1"),
    (["-n", "unknown"], "unknown"),
    (["--filename", "{song}.{ext}"],
     "--filename '{song}.{ext}' has an unknown field or is malformed ({song})"),
])
def test_fatal_errors(repo, track, tmp_path, caplog, flags, message):
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_info:
        main(["-n", "tiny", "--repo", str(repo), "-o", str(tmp_path), "-d", "cpu", *flags,
              str(track)])
    assert exit_info.value.code == 1
    assert message in caplog.text
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_no_tracks_and_list_models(repo, capsys, caplog):
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_info:
        main(["--repo", str(repo)])
    assert exit_info.value.code == 1 and "no tracks" in caplog.text
    main(["--list-models", "--repo", str(repo)])
    out = capsys.readouterr().out
    assert "tiny" in out and "transformer" in out


def test_golden_unittest_package(golden_dir, tmp_path, track):
    repo = tmp_path / "release_models"
    repo.mkdir()
    shutil.copy(golden_dir / "demucs_unittest" / "model.th", repo / "unittest_official.th")
    _run(repo, tmp_path, "--shifts", "0", str(track), name="unittest_official")
    info = soundfile.info(str(tmp_path / "unittest_official" / "my song" / "other.wav"))
    assert (info.frames, info.channels) == (LENGTH, 2)


def test_rescale_uses_the_whole_stem_peak_like_save_audio(repo: Path, tmp_path: Path):
    """Streamed writing rescales with the peak of the whole stem, as save_audio does in one go."""
    from demucs.audio import save_audio
    loud = tmp_path / "loud.wav"
    time = np.arange(LENGTH) / SAMPLERATE
    wav = 20 * np.sin(2 * np.pi * 110 * time) * np.linspace(0, 1, LENGTH)
    soundfile.write(str(loud), np.stack([wav, -wav], 1).astype(np.float32), SAMPLERATE,
                    subtype="FLOAT")
    _run(repo, tmp_path, "--shifts", "0", str(loud))
    _, stems = Separator("tiny", repo=repo, device="cpu", shifts=0).separate_audio_file(loud)
    assert max(float(stem.abs().max()) for stem in stems.values()) > 1  # rescaling is active
    for name, stem in stems.items():
        reference = tmp_path / f"ref_{name}.wav"
        save_audio(stem, reference, SAMPLERATE)
        written, _ = soundfile.read(str(tmp_path / "tiny" / "loud" / f"{name}.wav"), dtype="int16")
        expected, _ = soundfile.read(str(reference), dtype="int16")
        assert np.abs(written.astype(int) - expected.astype(int)).max() <= 1


def test_amp_and_compile_flags_reach_the_separator(repo, track, tmp_path, monkeypatch):
    made = []
    real_init = Separator.__init__

    def spy(self, *args, **kwargs):
        made.append(kwargs)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(Separator, "__init__", spy)
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: None)
    _run(repo, tmp_path / "fp32", str(track))
    _run(repo, tmp_path / "bf16", "--amp", "bf16", "--compile", str(track))
    assert (made[0]["amp"], made[0]["compile_model"]) == (None, False)
    assert (made[1]["amp"], made[1]["compile_model"]) == ("bf16", True)
    reference = _read(tmp_path / "fp32" / "tiny" / "my song" / "vocals.wav")
    mixed = _read(tmp_path / "bf16" / "tiny" / "my song" / "vocals.wav")
    error = np.linalg.norm(mixed - reference) / np.linalg.norm(reference)
    assert 0 < error < 2e-2


def test_fp16_on_cpu_is_warned_about(repo, track, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        _run(repo, tmp_path, "--amp", "fp16", str(track))
    assert "--amp fp16 is usually slower than float32 on CPU" in caplog.text
    assert "--compile on CPU" not in caplog.text
    assert (tmp_path / "tiny" / "my song" / "bass.wav").exists()


def test_compile_on_cpu_is_warned_about(repo, track, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: None)
    with caplog.at_level(logging.WARNING):
        _run(repo, tmp_path, "--compile", str(track))
    assert "--compile on CPU compiles for many minutes" in caplog.text
    assert "--amp fp16" not in caplog.text
    assert (tmp_path / "tiny" / "my song" / "bass.wav").exists()
