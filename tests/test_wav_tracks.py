"""Track folders: the mixture made when missing, and the problems reported for stems that no song
holds or songs at another sample rate than the one asked."""
import pytest
import soundfile
import torch

from demucs import wav_tracks
from tests.wav_helpers import SOURCES, SR, write_track


def test_missing_mixture_is_created_as_stem_sum(tmp_path):
    stems = write_track(tmp_path / "t" / "song", mixture=False)
    wav_tracks.build_metadata(tmp_path / "t", SOURCES)
    mixture, _ = soundfile.read(str(tmp_path / "t" / "song" / "mixture.wav"), dtype="float32")
    torch.testing.assert_close(torch.from_numpy(mixture.T.copy()), sum(stems.values()))


def test_a_stem_no_song_has_is_one_problem(tmp_path):
    """A typo in dset.sources (`vocal`) gave one line per song; now one line for the folder,
    naming the stems its songs hold."""
    for index in range(3):
        write_track(tmp_path / "wav" / "train" / f"song{index}", seed=index)
    with pytest.raises(wav_tracks.DatasetError) as error:
        wav_tracks.build_metadata(tmp_path / "wav" / "train", ["drums", "bass", "other", "vocal"])
    assert error.value.problems == [
        f"{tmp_path / 'wav' / 'train'}: none of its 3 song folder(s) holds vocal.wav (its songs "
        "hold bass, drums, mixture, other, vocals): check the spelling in dset.sources, or use "
        "a folder made for these stems"]
    assert wav_tracks.check_tracks(tmp_path / "wav" / "train", ["mixture", "vocal", "piano"]) == [
        f"{tmp_path / 'wav' / 'train'}: none of its 3 song folder(s) holds vocal.wav, piano.wav "
        "(its songs hold bass, drums, mixture, other, vocals): check the spelling in "
        "dset.sources, or use a folder made for these stems"]


def test_test_songs_at_another_rate_than_musdb_samplerate_are_named(tmp_path):
    """A test set at 8 kHz read as dset.musdb_samplerate=44100 used to be scored on wrongly
    pitched audio, silently."""
    for index in range(2):
        write_track(tmp_path / "test" / f"song{index}", seed=index)
    assert wav_tracks.check_tracks(tmp_path / "test", ["mixture"] + SOURCES, samplerate=SR) == []
    (problem,) = wav_tracks.check_tracks(tmp_path / "test", ["mixture"] + SOURCES, samplerate=44100)
    assert problem.startswith(f"2 songs of {tmp_path / 'test'} (e.g. ")
    assert f"{SR} Hz, but the test set is read as dset.musdb_samplerate=44100 Hz" in problem
    assert f"set dset.musdb_samplerate={SR}" in problem
