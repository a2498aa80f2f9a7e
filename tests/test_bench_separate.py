"""tools.bench_separate: the long generated track, the child's failure report, the output check."""
from pathlib import Path
import stat

import numpy as np
import pytest
import soundfile

from tools.bench_separate import SAMPLERATE, check_outputs, generate_track, measure


def _fake_python(path: Path, script: str) -> str:
    """An executable standing in for a Python interpreter: it runs `script` (sh)."""
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_generated_track_has_the_asked_length_and_is_deterministic(tmp_path: Path):
    generate_track(tmp_path / "a.wav", minutes=0.02)
    generate_track(tmp_path / "b.wav", minutes=0.02)
    audio, samplerate = soundfile.read(str(tmp_path / "a.wav"))
    assert samplerate == SAMPLERATE and audio.shape == (int(0.02 * 60 * SAMPLERATE), 2)
    assert 0.01 < np.abs(audio).mean() < 1
    np.testing.assert_array_equal(audio, soundfile.read(str(tmp_path / "b.wav"))[0])


def test_a_failing_separation_reports_the_end_of_its_stderr(tmp_path: Path):
    python = _fake_python(tmp_path / "python", "seq 1 3000 >&2\necho 'boom: out of memory' >&2\n"
                                               "exit 3\n")
    with pytest.raises(RuntimeError) as error:
        measure(tmp_path / "track.wav", tmp_path / "out", "model", [], python)
    message = str(error.value)
    assert "failed with status 3" in message and message.endswith("boom: out of memory")
    assert "\n1\n" not in message  # only the tail is kept


def test_measure_passes_the_threads_and_reports_peak_memory(tmp_path: Path):
    python = _fake_python(tmp_path / "python", 'test "$OMP_NUM_THREADS" = 2 || exit 9\n')
    result = measure(tmp_path / "track.wav", tmp_path / "out", "model", [], python, threads=2)
    assert result["peak_rss_mib"] > 0 and result["wall_s"] >= 0
    with pytest.raises(RuntimeError, match="status 9"):
        measure(tmp_path / "track.wav", tmp_path / "out", "model", [], python, threads=1)


def test_the_separation_runs_in_the_track_folder(tmp_path: Path):
    # from a checkout, `python -m demucs` of another interpreter would import this project
    tracks = tmp_path / "tracks"
    tracks.mkdir()
    python = _fake_python(tmp_path / "python", f'test "$PWD" = "{tracks}" || exit 9\n')
    measure(tracks / "track.wav", tmp_path / "out", "model", [], python)


def test_outputs_of_the_wrong_length_are_reported(tmp_path: Path):
    track = tmp_path / "track.wav"
    soundfile.write(str(track), np.zeros((1000, 2)), SAMPLERATE)
    stems = tmp_path / "stems"
    stems.mkdir()
    soundfile.write(str(stems / "vocals.wav"), np.zeros((1000, 2)), SAMPLERATE)
    check_outputs(track, stems)
    assert not list(stems.iterdir())  # checked stems are removed
    with pytest.raises(RuntimeError, match="no stems written"):
        check_outputs(track, stems)
    soundfile.write(str(stems / "bass.wav"), np.zeros((999, 2)), SAMPLERATE)
    with pytest.raises(RuntimeError, match="bass.wav has 999 frames x 2 channels, expected 1000"):
        check_outputs(track, stems)
