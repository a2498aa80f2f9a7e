"""Tests for tools.automix on small synthetic 4-stem sets with known tempo and key.

The analysis and the rendering run in worker processes: the stand-ins for `analyse_track` and
`render_song` are module-level functions (the workers get them by reference, whatever the start
method) and read what they must do from environment variables, which the workers inherit.
"""
import logging
import math
import os
from pathlib import Path
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile
import torch

pytest.importorskip("librosa")
if shutil.which("soundstretch") is None:
    pytest.skip("soundstretch is not installed", allow_module_level=True)

from tools import automix  # noqa: E402

SR = 44100
ROOT = Path(__file__).resolve().parent.parent
CRASH_TRACK = "AUTOMIX_TEST_CRASH_TRACK"  # the track whose analysis process dies (SIGSEGV)
DIE_ONCE = "AUTOMIX_TEST_DIE_ONCE"  # a file: the analysis of 'B - two' that creates it dies
DEAD_SONG = "AUTOMIX_TEST_DEAD_SONG"  # the song whose render process dies (SIGKILL)
CALLS = "AUTOMIX_TEST_CALLS"  # a file where `logged_analysis` appends "<pid> <track>" lines
HOOKS = (CRASH_TRACK, DIE_ONCE, DEAD_SONG, CALLS)
real_render_song = automix.render_song


@pytest.fixture(autouse=True)
def numba_environment(monkeypatch):
    """No numba target or cache and no test hook set; automix() sets NUMBA_CPU_NAME and
    NUMBA_CACHE_DIR in this process: whatever the test does to them is undone after it."""
    for name in automix.NUMBA_TARGET_VARIABLES + ("NUMBA_CACHE_DIR",) + HOOKS:
        monkeypatch.setenv(name, "")  # remembers the value (or absence) to restore
        monkeypatch.delenv(name)


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


def die(signum: int) -> None:
    """Kill this process with `signum`, without a core file."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.kill(os.getpid(), signum)


def crashing_analysis(track: Path):
    """`true_analysis`, but the process analysing the track named by $AUTOMIX_TEST_CRASH_TRACK
    dies of SIGSEGV (as librosa's compiled code on a CPU numba got wrong). The others take a
    while, so that with 2 workers the one beside the crash is still running when it happens."""
    if track.name == os.environ.get(CRASH_TRACK):
        die(signal.SIGSEGV)
    time.sleep(0.3)
    return true_analysis(track)


def dies_once_analysis(track: Path):
    """`true_analysis`, but the first analysis of 'B - two' (which creates the file
    $AUTOMIX_TEST_DIE_ONCE) dies: a worker killed by something else than its track."""
    if track.name == "B - two":
        try:
            Path(os.environ[DIE_ONCE]).touch(exist_ok=False)
        except FileExistsError:
            pass
        else:
            die(signal.SIGKILL)
    return true_analysis(track)


def logged_analysis(track: Path):
    """`true_analysis`, logging "<pid> <track name>" to the file $AUTOMIX_TEST_CALLS."""
    with open(os.environ[CALLS], "a") as log:
        log.write(f"{os.getpid()} {track.name}\n")
    return true_analysis(track)


def forbidden_analysis(track: Path):
    raise AssertionError(f"{track.name} analysed again instead of read from the cache")


def numba_target_analysis(track: Path):
    """Rejects the track with, as reason, numba's compile target and cache folder as the worker
    sees them."""
    import numba
    return {"rejected": f"{os.environ.get('NUMBA_CPU_NAME')}/{numba.config.CPU_NAME}/"
                        f"{numba.config.CPU_FEATURES!r} in {numba.config.CACHE_DIR}"}


def dying_render_song(root: Path, out: Path, song):
    """`render_song`, but the process rendering the song $AUTOMIX_TEST_DEAD_SONG dies."""
    if song.name == os.environ.get(DEAD_SONG):
        die(signal.SIGKILL)
    return real_render_song(root, out, song)


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
    monkeypatch.setattr(automix, "analyse_track", true_analysis)
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
    assert len(list((tmp_path / "cache").glob("*.json"))) == 5
    monkeypatch.setattr(automix, "analyse_track", forbidden_analysis)
    again = automix.automix(tiny_set, out, cache=tmp_path / "cache", copies=1, workers=1)
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


def cache_file(tiny_set: Path, cache: Path, name: str) -> Path:
    return cache / f"{automix._analysis_key(tiny_set / 'train' / name)}.json"


# Runs the command as a user does, with `crashing_analysis` as the analysis.
CRASHING_COMMAND = f"""
import sys
sys.path.insert(0, {str(ROOT / 'tests')!r})
import test_automix
from tools import automix
automix.analyse_track = test_automix.crashing_analysis
automix.main(sys.argv[1:])
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_dead_analysis_worker_is_one_line_naming_the_track(tiny_set, tmp_path, workers):
    """A track whose analysis process dies of SIGSEGV stops the command with exit status 1 and
    one line naming that track (with 2 workers too, where the track beside it is running when
    the pool breaks), no traceback and no output folder; the tracks analysed stay cached."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    env = {name: value for name, value in os.environ.items()
           if name not in automix.NUMBA_TARGET_VARIABLES + ("PYTHONFAULTHANDLER",)}
    env[CRASH_TRACK] = "B - two"
    proc = subprocess.run(
        [sys.executable, "-c", CRASHING_COMMAND, "--musdb", str(tiny_set), "--out", str(out),
         "--cache", str(cache), "--copies", "1", "-j", str(workers)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenProcessPool" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "died" in line]
    assert len(lines) == 1, proc.stderr
    assert ("Could not analyse track 'B - two': its analysis process died "
            "(signal 11 / SIGSEGV)") in lines[0]
    assert f"delete {cache / 'numba'}" in lines[0] and "PYTHONFAULTHANDLER=1" in lines[0]
    assert not out.exists()
    assert cache_file(tiny_set, cache, "A - one").exists()
    assert not cache_file(tiny_set, cache, "B - two").exists()


def test_death_message_suggests_generic_target(monkeypatch):
    """Without NUMBA_CPU_NAME=generic, a crash suggests it; a SIGKILL suggests fewer workers."""
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/somewhere/numba")
    monkeypatch.setenv("NUMBA_CPU_NAME", "generic")
    assert "delete /somewhere/numba and retry" in automix._death_message("X", -signal.SIGSEGV)
    monkeypatch.delenv("NUMBA_CPU_NAME")
    message = automix._death_message("X", -signal.SIGSEGV)
    assert message.startswith("Could not analyse track 'X': its analysis process died (signal 11")
    assert "compiling for the host CPU); try NUMBA_CPU_NAME=generic" in message
    monkeypatch.setenv("NUMBA_CPU_NAME", "znver4")
    assert "(NUMBA_CPU_NAME=znver4); try NUMBA_CPU_NAME=generic" in automix._death_message(
        "X", -signal.SIGILL)
    assert "fewer workers" in automix._death_message("X", -signal.SIGKILL)
    assert "(exit status 3)" in automix._death_message("X", 3)
    assert automix._death_message("X", 3, ["Y", "Z"]).startswith(
        "Could not analyse track 'X' ('Y', 'Z' too): ")


@pytest.mark.slow
def test_one_off_worker_death_is_survived(tiny_set, tmp_path, caplog, monkeypatch):
    """A worker killed once (not by its track: it analyses fine on its own) costs a warning."""
    monkeypatch.setattr(automix, "analyse_track", dies_once_analysis)
    monkeypatch.setattr(automix, "_warm_up", lambda analyse: None)  # tested on its own
    monkeypatch.setenv(DIE_ONCE, str(tmp_path / "died"))
    names = sorted(TRACKS)
    with caplog.at_level(logging.INFO, logger="automix"):
        specs, rejected = automix.analyse_all(tiny_set / "train", names, tmp_path / "cache", 2)
    assert [spec.name for spec in specs] == names and rejected == []
    assert "An analysis process died, yet " in caplog.text and "'B - two'" in caplog.text


@pytest.mark.slow
def test_several_workers_compile_once_first(tiny_set, tmp_path, monkeypatch):
    """With several workers, a synthetic track is analysed first, in a process of its own (numba
    compiles librosa's code there, so that the workers never compile it at the same time)."""
    monkeypatch.setattr(automix, "analyse_track", logged_analysis)
    monkeypatch.setenv(CALLS, str(tmp_path / "calls"))
    automix.analyse_all(tiny_set / "train", sorted(TRACKS), tmp_path / "cache", 2)
    calls = [line.split(" ", 1) for line in (tmp_path / "calls").read_text().splitlines()]
    assert calls[0][1] == automix.WARM_UP_TRACK
    assert sorted(name for _, name in calls[1:]) == sorted(TRACKS)
    assert calls[0][0] not in {pid for pid, _ in calls[1:]}
    (tmp_path / "calls").unlink()
    automix.analyse_all(tiny_set / "train", ["D - silent"], tmp_path / "cache", 2)
    assert (tmp_path / "calls").read_text().split()[1:] == ["D", "-", "silent"], \
        "no warm-up for a single track"


def test_warm_up_track_goes_through_the_whole_analysis(tmp_path):
    """The synthetic track is not rejected by `analyse_track` (its beats are found, its bass is
    heard), so the warm-up compiles everything the analysis runs (checked without librosa)."""
    track = automix._write_warm_up_track(tmp_path)
    drums = automix.load_stem(track, "drums", automix.ANALYSIS_SR)[0].numpy()
    bass = automix.load_stem(track, "bass", automix.ANALYSIS_SR)[0].numpy()
    assert len(drums) == len(bass) == 6 * automix.ANALYSIS_SR
    for stem in [drums, bass]:
        frames = stem[:len(stem) // 512 * 512].reshape(-1, 512)
        assert np.sqrt((frames ** 2).mean(1)).max() > 100 * automix.SILENCE_RMS


def test_dead_render_worker_removes_the_output(tiny_set, tmp_path, monkeypatch):
    monkeypatch.setattr(automix, "analyse_track", true_analysis)
    monkeypatch.setattr(automix, "render_song", dying_render_song)
    monkeypatch.setenv(DEAD_SONG, "0_1")
    out = tmp_path / "out"
    with pytest.raises(automix.AutomixError, match="A render process died .* removed the partial "
                       f"output {out}"):
        automix.automix(tiny_set, out, cache=tmp_path / "cache", copies=1, workers=1)
    assert not out.exists()


def test_numba_target_is_generic_unless_set(monkeypatch):
    automix.use_portable_numba_target()
    assert os.environ["NUMBA_CPU_NAME"] == "generic"
    assert "NUMBA_CPU_FEATURES" not in os.environ  # numba takes no feature with `generic`
    monkeypatch.setenv("NUMBA_CPU_NAME", "skylake")
    automix.use_portable_numba_target()
    assert os.environ["NUMBA_CPU_NAME"] == "skylake"
    monkeypatch.delenv("NUMBA_CPU_NAME")
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+sse2")
    automix.use_portable_numba_target()
    assert "NUMBA_CPU_NAME" not in os.environ


@pytest.mark.parametrize("user_set", [False, True])
def test_analysis_workers_compile_for_the_chosen_target(tiny_set, tmp_path, caplog, monkeypatch,
                                                        user_set):
    """What numba in an analysis worker reads: a generic CPU and automix's cache folder by
    default, the user's CPU and folder if set."""
    cache = tmp_path / "cache"
    seen = f"generic/generic/'' in {cache.resolve() / 'numba'}"
    if user_set:
        monkeypatch.setenv("NUMBA_CPU_NAME", "x86-64")
        monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "mine"))
        seen = f"x86-64/x86-64/None in {tmp_path / 'mine'}"
    monkeypatch.setattr(automix, "analyse_track", numba_target_analysis)
    with caplog.at_level(logging.INFO, logger="automix"):
        automix.analyse_all(tiny_set / "train", ["A - one"], cache, 1)
    assert f"Rejected track 'A - one': {seen} " in caplog.text


def test_missing_library_says_which_extra(tmp_path):
    with pytest.raises(ImportError, match=r'pip install "demucs\[automix\]"'):
        automix.check_dependencies(["no_such_module_for_automix"])
    with pytest.raises(automix.AutomixError):
        automix.check_dependencies(["no_such_module_for_automix"])
    automix.check_dependencies()


def test_automix_extra_lists_the_analysis_libraries():
    """requirements.txt's `# extra: automix` section (read by setup.py) installs them."""
    extra, lines = None, []
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.startswith("# extra:"):
            extra = line.split(":", 1)[1].strip()
        elif extra == automix.EXTRA and line.split("#")[0].strip():
            lines.append(line.split("#")[0].strip())
    assert set(automix.ANALYSIS_MODULES) <= set(lines)
