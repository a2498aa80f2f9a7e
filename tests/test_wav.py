"""Tests for demucs.wav: track datasets, metadata cache and bad data reports."""
import logging
import math
import os
from pathlib import Path
import stat

from hypothesis import given, settings, strategies as st
import julius
import numpy as np
from omegaconf import OmegaConf
import pytest
import soundfile
import torch

from demucs import wav, wav_tracks
from demucs.utils import random_subset
from tests.wav_helpers import SOURCES, SR, write_track


def make_dset(tmp_path: Path, **overrides):
    config = {"musdb": str(tmp_path / "musdb"), "wav": str(tmp_path / "wav"), "wav2": None,
              "segment": 1, "shift": 1, "train_valid": False, "full_cv": True, "samplerate": SR,
              "channels": 2, "normalize": True, "metadata": str(tmp_path / "metadata"),
              "sources": SOURCES, "valid_samples": None, "backend": None, "use_musdb": True}
    config.update(overrides)
    return OmegaConf.create(config)


def wav_folder(tmp_path: Path, train=3, valid=1, **kwargs):
    for index in range(train):
        write_track(tmp_path / "wav" / "train" / f"track{index}", seed=index, **kwargs)
    for index in range(valid):
        write_track(tmp_path / "wav" / "valid" / f"valid{index}", seed=100 + index, **kwargs)


def test_examples_offsets_and_normalization(tmp_path):
    stems = write_track(tmp_path / "t" / "song", seconds=3.0)
    metadata = wav.build_metadata(tmp_path / "t", SOURCES)
    meta = metadata["song"]
    mono = stems[wav.MIXTURE].mean(0)
    assert meta["length"] == 3 * SR and meta["samplerate"] == SR
    assert meta["mean"] == pytest.approx(mono.mean().item(), abs=1e-6)
    assert meta["std"] == pytest.approx(mono.std().item(), rel=1e-5)
    dataset = wav.Wavset(tmp_path / "t", metadata, SOURCES, segment=1, shift=0.5, samplerate=SR)
    assert len(dataset) == math.ceil((3 - 1) / 0.5) + 1
    for index in range(len(dataset)):
        item = dataset[index]
        assert item.shape == (4, 2, SR)
        start = int(index * 0.5 * SR)
        raw = torch.stack([stems[s] for s in SOURCES])[..., start:start + SR]
        expected = torch.nn.functional.pad((raw - meta["mean"]) / meta["std"],
                                           (0, SR - raw.shape[-1]))
        torch.testing.assert_close(item, expected)
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_last_example_is_zero_padded(tmp_path):
    write_track(tmp_path / "t" / "song", seconds=1.7)
    metadata = wav.build_metadata(tmp_path / "t", SOURCES, normalize=False)
    dataset = wav.Wavset(tmp_path / "t", metadata, SOURCES, segment=1, samplerate=SR,
                         normalize=False)
    assert len(dataset) == 2
    last = dataset[1]
    assert last.shape[-1] == SR
    assert last[..., int(0.7 * SR):].abs().max() == 0
    assert last[..., :int(0.7 * SR)].abs().max() > 0


def test_short_track_gives_one_example(tmp_path):
    write_track(tmp_path / "t" / "song", seconds=0.5)
    metadata = wav.build_metadata(tmp_path / "t", SOURCES)
    dataset = wav.Wavset(tmp_path / "t", metadata, SOURCES, segment=1, samplerate=SR)
    assert len(dataset) == 1 and dataset[0].shape == (4, 2, SR)


@pytest.mark.parametrize("source_rate", [22050, 48000])
def test_resampling_to_44k(tmp_path, source_rate):
    stems = write_track(tmp_path / "t" / "song", samplerate=source_rate, seconds=0.6)
    metadata = wav.build_metadata(tmp_path / "t", SOURCES, normalize=False)
    dataset = wav.Wavset(tmp_path / "t", metadata, SOURCES, segment=0.5, samplerate=44100,
                         normalize=False)
    item = dataset[0]
    assert item.shape == (4, 2, int(0.5 * 44100))
    raw = torch.stack([stems[s] for s in SOURCES])[..., :math.ceil(0.5 * source_rate)]
    expected = julius.resample_frac(raw, source_rate, 44100)[..., :int(0.5 * 44100)]
    torch.testing.assert_close(item, expected)


def test_mono_sources_and_mono_output(tmp_path):
    stems = write_track(tmp_path / "t" / "song", channels=1)
    metadata = wav.build_metadata(tmp_path / "t", SOURCES, normalize=False)
    stereo = wav.Wavset(tmp_path / "t", metadata, SOURCES, samplerate=SR, normalize=False)[0]
    assert stereo.shape == (4, 2, 2 * SR)
    torch.testing.assert_close(stereo[:, 0], stereo[:, 1])
    torch.testing.assert_close(stereo[0, 0], stems["drums"][0])
    write_track(tmp_path / "u" / "song", channels=2)
    metadata = wav.build_metadata(tmp_path / "u", SOURCES, normalize=False)
    mono = wav.Wavset(tmp_path / "u", metadata, SOURCES, channels=1, samplerate=SR,
                      normalize=False)[0]
    assert mono.shape == (4, 1, 2 * SR)


def test_more_than_four_sources_end_to_end(tmp_path):
    sources = SOURCES + ["guitar", "piano"]
    wav_folder(tmp_path, train=2, valid=1, sources=sources)
    train, valid = wav.get_wav_datasets(make_dset(tmp_path, sources=sources))
    assert train[0].shape == (6, 2, SR)
    assert valid[0].shape == (7, 2, 2 * SR)


def test_wav_datasets_split_and_valid_subset(tmp_path):
    wav_folder(tmp_path, train=3, valid=3)
    train, valid = wav.get_wav_datasets(make_dset(tmp_path))
    assert len(train) == 3 * 2 and len(valid) == 3
    assert list(valid.metadata) == ["valid0", "valid1", "valid2"]
    first, second = random_subset(valid, 2), random_subset(valid, 2)
    assert first.indices == second.indices and len(first) == 2
    _, segmented = wav.get_wav_datasets(make_dset(tmp_path, full_cv=False))
    assert segmented[0].shape == (5, 2, SR)


def musdb_folder(root: Path):
    valid_name = wav.musdb_valid_tracks()[0]
    for index, name in enumerate(["Artist A - Song", "Artist B - Song", valid_name]):
        write_track(root / "train" / name, seed=index, seconds=1.5)
    write_track(root / "test" / "Artist C - Test", seed=9)
    return valid_name


def test_musdb_split(tmp_path):
    valid_name = musdb_folder(tmp_path / "musdb")
    assert len(wav.musdb_valid_tracks()) == 14
    assert wav._get_musdb_valid is wav.musdb_valid_tracks  # Demucs 4.1's name
    train, valid = wav.get_musdb_wav_datasets(make_dset(tmp_path))
    assert sorted(train.metadata) == ["Artist A - Song", "Artist B - Song"]
    assert list(valid.metadata) == [valid_name]
    assert valid[0].shape == (5, 2, int(1.5 * SR))
    train_all, _ = wav.get_musdb_wav_datasets(make_dset(tmp_path, train_valid=True))
    assert len(train_all.metadata) == 3


def test_toy_musdb(toy_musdb, tmp_path):
    dset = make_dset(tmp_path, musdb=str(toy_musdb), samplerate=44100)
    train, valid = wav.get_musdb_wav_datasets(dset)
    assert len(train) > 0
    assert train[0].shape == (4, 2, 44100)
    assert torch.isfinite(train[len(train) - 1]).all()


@settings(max_examples=50, deadline=None)
@given(length=st.integers(1, 10 ** 6), segment=st.floats(0.1, 10), shift=st.floats(0.1, 10))
def test_examples_cover_track(length, segment, shift):
    dataset = wav.Wavset("/nonexistent", {"x": {"length": length, "samplerate": 1000,
                                                "mean": 0, "std": 1}},
                         SOURCES, segment=segment, shift=shift)
    duration = length / 1000
    last_start = (len(dataset) - 1) * shift
    if duration >= segment:
        assert last_start + segment >= duration - 1e-9
        assert last_start < duration - segment + shift + 1e-9
    else:
        assert len(dataset) == 1


# Bad data

def test_bad_tracks_are_all_reported(tmp_path):
    root = tmp_path / "wav" / "train"
    write_track(root / "good")
    write_track(root / "missing")
    (root / "missing" / "bass.wav").unlink()
    stems = write_track(root / "length")
    soundfile.write(str(root / "length" / "vocals.wav"), stems["vocals"].t().numpy()[:100], SR)
    write_track(root / "rate")
    soundfile.write(str(root / "rate" / "other.wav"), stems["other"].t().numpy(), 16000)
    write_track(root / "garbage")
    (root / "garbage" / "drums.wav").write_bytes(b"this is not a wav file")
    write_track(root / "empty")
    soundfile.write(str(root / "empty" / "drums.wav"), np.zeros((0, 2), np.float32), SR)
    write_track(tmp_path / "wav" / "valid" / "song")
    with pytest.raises(wav.DatasetError) as info:
        wav.get_wav_datasets(make_dset(tmp_path))
    problems = info.value.problems
    assert len(problems) == 5
    message = str(info.value)
    assert "missing" in message and "bass.wav" in message
    assert "length" in message and str(root / "length" / "vocals.wav") in message
    assert "sample rate 16000" in message and str(root / "rate" / "other.wav") in message
    assert "unreadable" in message and str(root / "garbage" / "drums.wav") in message
    assert "empty" in message and str(root / "empty" / "drums.wav") in message
    assert not list((tmp_path / "metadata").glob("*.json"))


def test_missing_musdb_path(tmp_path):
    with pytest.raises(wav.DatasetError, match="dset.musdb") as info:
        wav.get_musdb_wav_datasets(make_dset(tmp_path, musdb=str(tmp_path / "nowhere")))
    assert str(tmp_path / "nowhere") in str(info.value)


def test_missing_valid_folder(tmp_path):
    write_track(tmp_path / "wav" / "train" / "song")
    with pytest.raises(wav.DatasetError, match="valid"):
        wav.get_wav_datasets(make_dset(tmp_path))


# Metadata cache

class Counter:
    """Wraps a function and counts its calls."""

    def __init__(self, function):
        self.function = function
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


def count_reads(monkeypatch):
    headers, reads = Counter(wav_tracks._audio_info), Counter(wav_tracks.read_frames)
    monkeypatch.setattr(wav_tracks, "_audio_info", headers)
    monkeypatch.setattr(wav_tracks, "read_frames", reads)
    return headers, reads


def test_unchanged_dataset_is_not_rescanned(tmp_path, monkeypatch):
    for index in range(100):
        write_track(tmp_path / "wav" / "train" / f"t{index:03d}", seconds=0.01, seed=index)
    write_track(tmp_path / "wav" / "valid" / "v", seconds=0.01)
    dset = make_dset(tmp_path, segment=None, shift=None)
    wav.get_wav_datasets(dset)
    headers, reads = count_reads(monkeypatch)
    train, _ = wav.get_wav_datasets(dset)
    assert headers.calls == 0 and reads.calls == 0
    assert len(train) == 100
    assert [p.name for p in (tmp_path / "metadata").iterdir()] == [
        f"wav_{wav._hash_path(dset.wav)}.json"]


def test_cache_rebuilds_changed_tracks_only(tmp_path, monkeypatch, caplog):
    wav_folder(tmp_path, train=3, valid=1)
    dset = make_dset(tmp_path)
    wav.get_wav_datasets(dset)
    headers, _ = count_reads(monkeypatch)
    train_root = tmp_path / "wav" / "train"
    write_track(train_root / "added", seed=50)
    with caplog.at_level(logging.INFO, logger="demucs.wav"):
        train, _ = wav.get_wav_datasets(dset)
    assert "train: 1 track(s) added (added)" in caplog.text
    assert headers.calls == 5 and "added" in train.metadata

    headers.calls = 0
    stems = write_track(train_root / "track1", seconds=3.0, seed=7)
    train, _ = wav.get_wav_datasets(dset)
    assert headers.calls == 5
    assert train.metadata["track1"]["length"] == 3 * SR
    assert train.metadata["track1"]["std"] == pytest.approx(
        stems[wav.MIXTURE].mean(0).std().item(), rel=1e-5)

    for path in (train_root / "track2").iterdir():
        path.unlink()
    (train_root / "track2").rmdir()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="demucs.wav"):
        train, _ = wav.get_wav_datasets(dset)
    assert "1 track(s) removed (track2)" in caplog.text
    assert "track2" not in train.metadata and headers.calls == 5


def test_cache_rebuilds_when_sources_change(tmp_path, caplog):
    wav_folder(tmp_path, train=1, valid=1, sources=SOURCES + ["piano"])
    wav.get_wav_datasets(make_dset(tmp_path))
    with caplog.at_level(logging.INFO, logger="demucs.wav"):
        train, _ = wav.get_wav_datasets(make_dset(tmp_path, sources=SOURCES + ["piano"]))
    assert "sources or normalize setting changed" in caplog.text
    assert train[0].shape[0] == 5


def test_corrupt_cache_is_rebuilt(tmp_path):
    wav_folder(tmp_path, train=1, valid=1)
    dset = make_dset(tmp_path)
    wav.get_wav_datasets(dset)
    cache = next((tmp_path / "metadata").glob("wav_*.json"))
    cache.write_text("{not json")
    train, _ = wav.get_wav_datasets(dset)
    assert len(train) == 2
    assert cache.read_text().startswith("{")


# Config groups

DSET_GROUPS = ["musdb44", "extra44", "extra_test", "extra_mmi_goodclean", "auto_mus", "auto_extra",
               "auto_extra_test", "aetl", "sdx23_bleeding", "sdx23_labelnoise"]


def test_dset_groups_compose():
    conf = Path(__file__).resolve().parent.parent / "conf"
    if not (conf / "config.yaml").exists():
        pytest.skip("conf/config.yaml (helper D1) not available yet")
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(conf), version_base="1.1"):
        base = compose(config_name="config")
        for group in DSET_GROUPS:
            cfg = compose(config_name="config", overrides=[f"dset={group}"])
            extra = set(cfg.dset) - set(base.dset)
            assert extra <= {"wav2_weight", "wav2_valid"}, group
            if group != "musdb44":
                assert cfg.dset.wav, group
    assert cfg.dset.use_musdb is False and cfg.dset.backend == "soundfile"


def test_only_rank_zero_builds_the_cache(tmp_path, monkeypatch):
    wav_folder(tmp_path, train=1, valid=1)
    dset = make_dset(tmp_path)
    waits = []
    monkeypatch.setattr(wav, "_distributed", lambda: (1, lambda: waits.append(1)))
    with pytest.raises(FileNotFoundError, match="shared by all workers"):
        wav.get_wav_datasets(dset)  # rank 1 waits then reads; nothing was built by rank 0
    assert waits == [1]
    monkeypatch.setattr(wav, "_distributed", lambda: (0, lambda: None))
    wav.get_wav_datasets(dset)
    monkeypatch.setattr(wav, "_distributed", lambda: (1, lambda: None))
    headers, _ = count_reads(monkeypatch)
    train, _ = wav.get_wav_datasets(dset)
    assert len(train) == 2 and headers.calls == 0


def test_metadata_cache_and_created_mixtures_get_a_plain_file_mode(tmp_path):
    """Files the dataset code writes are readable by other users, as a plain open() makes them."""
    write_track(tmp_path / "train" / "song", mixture=False)
    previous = os.umask(0o022)
    try:
        wav.cached_metadata(tmp_path / "meta.json", {"train": tmp_path / "train"}, SOURCES)
    finally:
        os.umask(previous)
    written = [tmp_path / "meta.json", tmp_path / "train" / "song" / (wav.MIXTURE + wav.EXT)]
    assert [stat.S_IMODE(path.stat().st_mode) for path in written] == [0o644, 0o644]
    assert not list(tmp_path.rglob("*.partial"))


def test_valid_tracks_of_a_musdb_layout_folder(tmp_path):
    from demucs.wav import DatasetError, choose_valid_tracks
    names = [f"Song {index}" for index in range(10)]
    assert choose_valid_tracks(names, None, tmp_path) == set()
    chosen = choose_valid_tracks(names, 3, tmp_path)
    assert len(chosen) == 3 and chosen <= set(names)
    assert choose_valid_tracks(list(reversed(names)), 3, tmp_path) == chosen  # order-free
    assert len(chosen & choose_valid_tracks(names + ["Song 10"], 3, tmp_path)) >= 2
    assert choose_valid_tracks(names, ["Song 4", "Song 7"], tmp_path) == {"Song 4", "Song 7"}
    assert choose_valid_tracks(names, 0, tmp_path) == set()  # no validation
    # with dset.train_valid=true every song may be validated on, as it is trained on too
    assert choose_valid_tracks(names, 10, tmp_path, train_valid=True) == set(names)
    for bad, message in [(10, "dset.valid_tracks=10 would keep every song of"),
                         (11, "asks for more songs than the 10 songs of .*use at most 9"),
                         (-1, "1 to 10 of the songs of .*or 0 for no validation"),
                         (names, "names every song of"),
                         (["Song 4", "Nope"], "'Nope', which is not a song folder"),
                         ("Song 4", "a number of songs or a list"), (True, "a number")]:
        with pytest.raises(DatasetError, match=message):
            choose_valid_tracks(names, bad, tmp_path)
    with pytest.raises(DatasetError, match="more songs than the 10 songs of .*at most 10"):
        choose_valid_tracks(names, 11, tmp_path, train_valid=True)


def test_one_song_with_one_valid_track_offers_the_ways_forward(tmp_path):
    """Issue 30: a folder of one song and dset.valid_tracks=1 used to say 'must be between 1 and
    0'; now it names the folder and the two ways to train on it."""
    from demucs.wav import DatasetError, choose_valid_tracks
    with pytest.raises(DatasetError) as error:
        choose_valid_tracks(["My Song"], 1, tmp_path / "train")
    (problem,) = error.value.problems
    assert problem.startswith(f"dset.valid_tracks=1 would keep every song of {tmp_path / 'train'}"
                              " (1 song) for validation and leave none to train on: ")
    assert "dset.train_valid=true" in problem and "dset.valid_tracks=0" in problem
    assert choose_valid_tracks(["My Song"], 1, tmp_path, train_valid=True) == {"My Song"}


def test_one_song_trained_and_validated_on_says_so(tmp_path, caplog):
    write_track(tmp_path / "musdb" / "train" / "My Song", seconds=1.5)
    dset = make_dset(tmp_path, valid_tracks=1, train_valid=True)
    with caplog.at_level(logging.WARNING, logger="demucs.wav"):
        train, valid = wav.get_musdb_wav_datasets(dset)
    assert list(train.metadata) == list(valid.metadata) == ["My Song"]
    assert "they are trained on too (dset.train_valid=true)" in caplog.text
    _, no_valid = wav.get_musdb_wav_datasets(make_dset(tmp_path, valid_tracks=0))
    assert len(no_valid) == 0


def test_wav_folder_without_valid_subfolder_says_what_the_layout_is(tmp_path):
    write_track(tmp_path / "wav" / "train" / "song")
    with pytest.raises(wav.DatasetError) as error:
        wav.get_wav_datasets(make_dset(tmp_path))
    assert error.value.problems == [
        f"dset.wav={tmp_path / 'wav'} has no valid/ subfolder: dset.wav must hold "
        "train/<song>/<stem>.wav and valid/<song>/<stem>.wav (e.g. move some songs of "
        f"{tmp_path / 'wav' / 'train'} into {tmp_path / 'wav' / 'valid'})"]
    (tmp_path / "musdb" / "train").mkdir(parents=True)
    with pytest.raises(wav.DatasetError, match="holds no song folder: put each song in a "):
        wav.get_musdb_wav_datasets(make_dset(tmp_path))
