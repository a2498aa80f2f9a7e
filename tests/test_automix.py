"""Tests for tools.automix on small synthetic 4-stem sets with known tempo and key."""
import logging
import math
from pathlib import Path
import shutil

import numpy as np
import pytest
import soundfile
import torch

pytest.importorskip("librosa")
if shutil.which("soundstretch") is None:
    pytest.skip("soundstretch is not installed", allow_module_level=True)

from tools import automix  # noqa: E402

SR = 44100


def synth_track(folder: Path, bpm: float, key: int, seconds: float = 8., phase: float = 0.,
                silent_drums: bool = False):
    """Clicks at `bpm` starting at `phase` s, a bass note `key` semitones above A1 on the beats."""
    folder.mkdir(parents=True)
    t = np.arange(int(seconds * SR)) / SR
    beats = np.arange(phase, seconds, 60 / bpm)
    envelope = np.zeros_like(t)
    for beat in beats:
        after = t - beat
        envelope += np.where(after >= 0, np.exp(-np.clip(after, 0, None) * 30), 0)
    rng = np.random.default_rng(key)
    drums = (0 if silent_drums else 0.5) * envelope * rng.standard_normal(len(t))
    bass = 0.3 * np.sin(2 * math.pi * 55 * 2 ** (key / 12) * t) * np.minimum(envelope * 3, 1)
    other = 0.1 * np.sin(2 * math.pi * 440 * 2 ** (key / 12) * t)
    vocals = 0.1 * np.sin(2 * math.pi * 660 * 2 ** (key / 12) * t) * (np.sin(t) > 0)
    stems = {"drums": drums, "bass": bass, "other": other, "vocals": vocals}
    for name, data in stems.items():
        data = np.broadcast_to(np.asarray(data, np.float32)[:, None], (len(t), 2))
        soundfile.write(str(folder / f"{name}.wav"), data, SR, subtype="FLOAT")


TRACKS = {  # name: (bpm, key in semitones above A, first beat in seconds)
    "A - one": (120, 0, 0.),
    "B - two": (124, 1, 0.21),
    "C - three": (60, 0, 0.1),
    "E - far": (170, 6, 0.),
}


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("automix_in")
    for name, (bpm, key, phase) in TRACKS.items():
        synth_track(root / "train" / name, bpm, key, phase=phase)
    synth_track(root / "train" / "D - silent", 120, 0, silent_drums=True)
    return root


def true_analysis(track: Path):
    """A perfect analysis of the synthetic tracks (keeps librosa out of the fast tests)."""
    if track.name not in TRACKS:
        return {"rejected": "silent drums"}
    bpm, key, phase = TRACKS[track.name]
    return {"tempo": float(bpm), "beats": list(np.arange(phase, 8, 60 / bpm)),
            "chroma": np.eye(12)[(9 + key) % 12].tolist()}


def read(path: Path) -> np.ndarray:
    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    assert rate == SR
    return data


def test_matching_rules():
    assert automix.tempo_match(120, 126) == 1
    assert automix.tempo_match(120, 61) == 2
    assert automix.tempo_match(120, 150) is None
    profile = np.eye(12)[0]
    assert automix.pitch_match(profile, np.roll(profile, 2)) == -2
    assert automix.pitch_match(profile, np.roll(profile, 6)) is None
    assert automix.beat_tempo([0.1, 0.6, 1.1, 1.6]) == pytest.approx(120)


def test_best_lag_recovers_offset():
    beats = list(np.arange(0.3, 8, 0.5))
    shifted = [b - 0.115 for b in beats]
    assert automix.best_lag(beats, shifted, 9.) == pytest.approx(0.115, abs=0.006)


def check_song_folder(folder: Path):
    """Mixture = sum of the stems, equal lengths, no clipping."""
    stems = {s: read(folder / f"{s}.wav") for s in automix.SOURCES}
    mixture = read(folder / "mixture.wav")
    assert {len(stem) for stem in stems.values()} == {len(mixture)}
    np.testing.assert_allclose(mixture, sum(stems.values()), atol=1e-6)
    assert np.abs(mixture).max() <= 1 / 1.01 + 1e-6


def test_automix_end_to_end(tiny_set, tmp_path, caplog, monkeypatch):
    calls = []
    monkeypatch.setattr(automix, "analyse_track", lambda track: calls.append(track) or
                        true_analysis(track))
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="automix"):
        songs = automix.automix(tiny_set, out, cache=tmp_path / "cache", copies=1, workers=1)
    assert "Rejected track 'D - silent': silent drums" in caplog.text
    assert "Rejected song 0_3: no track matches 'E - far'" in caplog.text
    assert sorted(songs) == ["0_0", "0_1", "0_2"]
    folders = sorted(p.name for p in (out / "train").iterdir())
    assert folders == ["0_0", "0_1", "0_2", "rej_0_0", "rej_1_0"]
    assert (out / "valid").is_dir() and not any((out / "valid").iterdir())
    for folder in (out / "train").iterdir():
        check_song_folder(folder)
    assert len(calls) == 5
    again = automix.automix(tiny_set, out, cache=tmp_path / "cache", copies=1, workers=1)
    assert len(calls) == 5, "the analysis cache was not used"
    assert sorted(again) == sorted(songs)


def onset_envelope(wav: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.avg_pool1d(wav[:1].abs()[None], 441)[0, 0].numpy()


def test_repitched_stem_lands_on_reference_beats(tiny_set):
    """Drums of a track 4 bpm faster, a semitone higher and 0.21 s late come out aligned."""
    specs = {name: automix.Spec(name, **true_analysis(tiny_set / "train" / name))
             for name in ["A - one", "B - two"]}
    reference = specs["A - one"]
    part = automix.plan_part(reference, specs["B - two"], "drums")
    assert part is not None and part.pitch == -1
    assert part.tempo == pytest.approx(100 * (120 / 124 - 1))
    drums = automix.render_part(tiny_set / "train", part, reference.beats)
    reference_drums = automix.load_stem(tiny_set / "train" / "A - one", "drums")
    length = min(drums.shape[-1], reference_drums.shape[-1])
    ours, theirs = onset_envelope(drums[:, :length]), onset_envelope(reference_drums[:, :length])
    lags = range(-20, 21)  # 10 ms steps
    scores = [np.dot(np.roll(ours, lag), theirs) for lag in lags]
    assert abs(lags[int(np.argmax(scores))]) <= 1


@pytest.mark.slow
def test_librosa_analysis(tiny_set):
    for name, (bpm, key, phase) in TRACKS.items():
        result = automix.analyse_track(tiny_set / "train" / name)
        tempo_ratio = result["tempo"] / bpm
        assert min(abs(tempo_ratio - m) for m in [0.5, 1, 2]) < 0.01, name
        assert np.argmax(result["chroma"]) == (9 + key) % 12, name
    assert automix.analyse_track(tiny_set / "train" / "D - silent") == {"rejected": "silent drums"}


def test_refuses_to_erase_foreign_folder(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(automix.AutomixError, match="refusing to erase"):
        automix.prepare_output(tmp_path)
    assert (tmp_path / "precious.txt").exists()


def test_missing_dataset(tmp_path):
    with pytest.raises(automix.AutomixError, match="--musdb"):
        automix.source_tracks(tmp_path / "nowhere")


@pytest.mark.slow
def test_automix_on_toy_musdb(tmp_path):
    """The documented command on a default-sized toy set (6 usable train tracks)."""
    toy_musdb = pytest.importorskip("demucs.toy_musdb")
    toy = toy_musdb.generate(tmp_path / "toy", tracks=8, seconds=8.0, seed=42)
    out = tmp_path / "automix_toy"
    automix.main(["--musdb", str(toy), "--out", str(out), "--cache", str(tmp_path / "cache"),
                  "--copies", "2", "-j", "2"])
    songs = [p for p in (out / "train").iterdir() if not p.name.startswith("rej_")]
    assert songs, "no song mixed from the toy set"
    for folder in songs:
        check_song_folder(folder)
