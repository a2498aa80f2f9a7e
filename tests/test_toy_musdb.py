"""Toy MusDB generator: layout, formats, mixture consistency, content, determinism, CLI."""
import inspect
import json
from pathlib import Path

from hypothesis import given, settings, strategies as st
import numpy as np
from omegaconf import OmegaConf
import pytest
import soundfile

from tests.conftest import TOY_MUSDB
from demucs import toy_musdb
from demucs.toy_musdb import (MUSDB_VALID_TRACKS, SOURCES, ensure_toy_musdb, generate,
                              make_track)

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted(["mixture.wav"] + [f"{source}.wav" for source in SOURCES])
SR = 44100


def tracks_of(root: Path, split: str):
    return sorted(p for p in (root / split).iterdir() if p.is_dir())


def read_pcm(path: Path) -> np.ndarray:
    data, samplerate = soundfile.read(str(path), dtype="int16", always_2d=True)
    assert samplerate == SR
    return data.astype(np.int32)


def test_layout_and_names(toy_musdb):
    train, test = tracks_of(toy_musdb, "train"), tracks_of(toy_musdb, "test")
    assert len(train) == TOY_MUSDB["tracks"] and len(test) == TOY_MUSDB["test_tracks"]
    for folder in train + test:
        assert sorted(p.name for p in folder.iterdir()) == FILES
        artist, title = folder.name.split(" - ")
        assert artist and title
    valid = [folder.name for folder in train if folder.name in MUSDB_VALID_TRACKS]
    assert len(valid) == TOY_MUSDB["valid_tracks"]
    assert not {folder.name for folder in test} & set(MUSDB_VALID_TRACKS)
    assert len({folder.name for folder in train + test}) == len(train + test)


def test_files_are_16_bit_stereo_of_equal_length(toy_musdb):
    for folder in tracks_of(toy_musdb, "train") + tracks_of(toy_musdb, "test"):
        infos = [soundfile.info(str(folder / name)) for name in FILES]
        assert {(i.samplerate, i.channels, i.subtype) for i in infos} == {(SR, 2, "PCM_16")}
        assert {i.frames for i in infos} == {int(TOY_MUSDB["seconds"] * SR)}


def test_mixture_is_the_sum_of_stems_and_does_not_clip(toy_musdb):
    for folder in tracks_of(toy_musdb, "train") + tracks_of(toy_musdb, "test"):
        mixture = read_pcm(folder / "mixture.wav")
        stems = sum(read_pcm(folder / f"{source}.wav") for source in SOURCES)
        assert np.abs(mixture - stems).max() <= 2
        assert np.abs(mixture).max() < 2 ** 15 - 1


def rms_db(x: np.ndarray) -> float:
    return 10 * np.log10(np.mean(x.astype(float) ** 2) + 1e-12)


def spectral_centroid(x: np.ndarray) -> float:
    """Power-weighted mean frequency of the mono signal, in Hz."""
    spectrum = np.abs(np.fft.rfft(x.mean(1))) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / SR)
    return float((spectrum * freqs).sum() / spectrum.sum())


def test_stems_are_audible_and_distinct(toy_musdb):
    for folder in tracks_of(toy_musdb, "train"):
        stems = {source: read_pcm(folder / f"{source}.wav") / 2 ** 15 for source in SOURCES}
        for source, wav in stems.items():
            assert rms_db(wav) > -45, f"{source} of {folder.name} is nearly silent"
            frames = wav.mean(1)[:len(wav) // 2205 * 2205].reshape(-1, 2205)
            active = (frames ** 2).mean(1) > 1e-6
            assert active.mean() > 0.3, f"{source} of {folder.name} is mostly silent"
        centroids = {source: spectral_centroid(wav) for source, wav in stems.items()}
        assert centroids["bass"] < 250
        assert centroids["bass"] < min(centroids["other"], centroids["vocals"])
        assert not np.array_equal(stems["other"][:, 0], stems["other"][:, 1])


def test_same_seed_same_audio_other_seed_other_audio():
    first = make_track(seed=3, number=0, seconds=1.0, samplerate=SR)
    again = make_track(seed=3, number=0, seconds=1.0, samplerate=SR)
    other = make_track(seed=4, number=0, seconds=1.0, samplerate=SR)
    assert sorted(first) == sorted(SOURCES + ("mixture",))
    for name in first:
        assert first[name].dtype == np.int16 and first[name].shape == (2, SR)
        np.testing.assert_array_equal(first[name], again[name])
    assert not np.array_equal(first["mixture"], other["mixture"])


@settings(max_examples=8, deadline=None)
@given(seconds=st.floats(0.01, 1.5), seed=st.integers(0, 2 ** 31), samplerate=st.sampled_from(
    [22050, 44100, 48000]))
def test_any_duration_gives_consistent_stems(seconds, seed, samplerate):
    track = make_track(seed, number=0, seconds=seconds, samplerate=samplerate)
    length = int(round(seconds * samplerate))
    assert {wav.shape for wav in track.values()} == {(2, length)}
    total = sum(track[source].astype(np.int32) for source in SOURCES)
    np.testing.assert_array_equal(track["mixture"], total)


def test_generate_is_deterministic_on_disk(tmp_path):
    kwargs = dict(tracks=2, test_tracks=1, seconds=0.5, seed=7)
    one, two = generate(tmp_path / "one", **kwargs), generate(tmp_path / "two", **kwargs)
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    for name in files:
        assert (one / name).read_bytes() == (two / name).read_bytes()


def test_existing_folders_are_protected(tmp_path):
    small = dict(tracks=1, test_tracks=1, seconds=0.3)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine already holds files: add --overwrite"):
        generate(foreign, **small)
    with pytest.raises(FileExistsError, match="not generated by tools.toy_musdb"):
        generate(foreign, overwrite=True, **small)
    assert (foreign / "notes.txt").read_text() == "keep me"
    toy = generate(tmp_path / "toy", seed=1, **small)
    before = (toy / "test").iterdir().__next__().name
    with pytest.raises(FileExistsError, match="toy MusDB made with other settings .*'seed': 1"):
        generate(toy, seed=2, **small)
    generate(toy, seed=2, overwrite=True, **small)
    assert (toy / "test").iterdir().__next__().name != before


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(toy_musdb, "write_track", broken)
    with pytest.raises(OSError, match="disk full"):
        generate(tmp_path / "toy", tracks=1, test_tracks=1, seconds=0.2)
    assert list(tmp_path.iterdir()) == []


def test_invalid_counts_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="valid_tracks"):
        generate(tmp_path / "toy", tracks=2, valid_tracks=3)
    assert not (tmp_path / "toy").exists()


def test_ensure_generates_only_when_missing(tmp_path, monkeypatch):
    path = ensure_toy_musdb(tmp_path / "data" / "toy", tracks=1, test_tracks=1, seconds=0.2)
    assert (path / "train").is_dir() and (path / "test").is_dir()

    def must_not_run(*args, **kwargs):
        raise AssertionError("regenerated an existing set")

    monkeypatch.setattr(toy_musdb, "generate", must_not_run)
    assert ensure_toy_musdb(path, tracks=5) == path


def test_cli_writes_and_reports(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = [str(out), "--tracks", "2", "--test-tracks", "1", "--seconds", "0.3", "--seed", "5"]
    assert toy_musdb.main(argv) == 0
    report = capsys.readouterr().out
    assert "train/: 2 tracks" in report and "test/: 1 tracks" in report
    assert "1 with MusDB validation names" in report
    assert toy_musdb.main(argv) == 0  # the same set is already there: nothing to do
    assert toy_musdb.main(argv[:-1] + ["6"]) == 1  # another seed
    assert toy_musdb.main(argv[:-1] + ["6", "--overwrite"]) == 0


def test_toy_dset_config_matches_the_generator():
    conf = OmegaConf.load(ROOT / "conf" / "dset" / "toy.yaml")
    assert conf.dset.musdb == "data/toy_musdb" and conf.dset.use_musdb
    assert (conf.dset.samplerate, conf.dset.channels) == (SR, 2)
    assert conf.dset.segment < conf.dset.toy.seconds
    inspect.signature(generate).bind("out", **conf.dset.toy)


def test_six_stem_set(tmp_path):
    six = ["drums", "bass", "guitar", "piano", "other", "vocals"]
    out = generate(tmp_path / "six", tracks=2, test_tracks=1, seconds=3, sources=six)
    heard = set()
    for song in (out / "train").iterdir():
        stems = {name: soundfile.read(str(song / f"{name}.wav"), dtype="int16")[0]
                 for name in six + ["mixture"]}
        heard |= {name for name in six if np.abs(stems[name]).max() > 0}
        total = sum(stems[name].astype(np.int32) for name in six)
        assert np.array_equal(total, stems["mixture"])  # the mixture is the exact sum
    assert heard == set(six)  # every new voice sounds somewhere
    # the default set is unchanged by the new voices, and its manifest has no sources key
    four = generate(tmp_path / "four", tracks=2, test_tracks=1, seconds=0.5)
    assert "sources" not in json.loads((four / "toy_musdb.json").read_text())
    assert generate(tmp_path / "six", tracks=2, test_tracks=1, seconds=3, sources=six) == out
    with pytest.raises(ValueError, match="distinct stems among drums, bass"):
        generate(tmp_path / "bad", sources=["drums", "flute"])
