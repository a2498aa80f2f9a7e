"""Build the "automix" fine-tuning set: new songs made of stems from different tracks.

For each track of a 4-stem set (MusDB HQ train minus its validation tracks by default), the tempo
and beats are estimated from the drums and the key from the bass chroma (librosa, cached per track).
Each output song keeps one random stem of a reference track and takes the other stems from tracks
whose tempo is within `MAX_TEMPO` (allowing half/double time) and whose key is within `MAX_PITCH`
semitones; those stems are repitched with soundstretch and aligned on the reference beats by
cross-correlating onset grids. Songs are written as `<out>/train/<copy>_<index>/<stem>.wav`
(32-bit float, mixture = sum of the stems); `<out>/valid/` stays empty.

Rejections (a track with silent drums or bass, a song for which no matching stem exists) are
expected and logged on one line each. Run with:

    NUMBA_NUM_THREADS=1 python3 -m tools.automix --musdb PATH --out PATH

then point `dset.wav` of `conf/dset/auto_mus.yaml` at the output folder. It needs librosa and
scipy (`pip install "demucs[automix]"`) and the `soundstretch` program.

Nothing a track does can take the command down. librosa runs code that numba compiles; a crash
in it (SIGSEGV) used to kill the command, with a BrokenProcessPool traceback, or at once with
`-j 1`. So:
- each track is analysed in a worker process, even with `-j 1`. When one dies (a signal, an
  exit), the unfinished tracks that may have killed it are rerun each in a process of its own,
  and the command stops with one line naming the track whose process died again (exit status
  1, no traceback). The analyses done so far stay in the per-track cache (`--cache`); the
  output folder is only prepared once every track is analysed, so none is left;
- if a render process dies, the partial output folder is removed, said on one line;
- with several workers, numba first compiles librosa's code in one process, on a synthetic
  track, and the workers only load it. When several processes compile the same gufunc at once
  numba can save its kernel from one and its wrapper from the other, and every later process
  that loads that pair dies of SIGSEGV in `librosa.beat.beat_track` (numba issue 10128, open in
  numba 0.68.1): here 2 processes analysing toy tracks on an empty cache corrupted it in 3
  trials out of 5, and the old `-j 2` run crashed so. This matches the report of a
  BrokenProcessPool with the default `-j` and then a segfault with `-j 1` on every run;
- numba's cache is automix's own, `<--cache>/numba` (NUMBA_CACHE_DIR, unless you set it),
  so that a cache corrupted earlier next to librosa's sources is not used, and a corrupted one
  is a folder that the error message names for you to delete;
- unless you set `NUMBA_CPU_NAME` or `NUMBA_CPU_FEATURES`, automix sets `NUMBA_CPU_NAME=generic`
  before any worker imports numba: numba then compiles for the baseline x86-64 CPU with no
  extra feature (numba's default feature list for `generic` is empty, so NUMBA_CPU_FEATURES
  need not be set), which runs on a VM that reports features it does not let programs use,
  and it moves away from cache entries made for the host CPU. It costs nothing measurable,
  because librosa spends its time in numpy and scipy: on this project's AMD EPYC VM (family
  25 model 17, AVX-512, 2 cores, `lscpu`), the 6 tracks of the default toy set take, host CPU
  against `generic` (medians of 3 runs, loaded machine): 28.6 s against 22.8 s with an empty
  numba cache (compiling), 5.3 s against 4.9 s with a warm one, 2.0 s against 2.0 s once
  loaded. `generic` does not prevent the cache race above: it happened with it.
"""
import argparse
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
import hashlib
import importlib.util
import json
import logging
import multiprocessing
from multiprocessing.connection import Connection
import os
from pathlib import Path
import random
import shutil
import signal
import sys
import tempfile
import typing as tp

import numpy as np
import soundfile
import torch

from demucs.audio import convert_audio, save_audio
from demucs.files import atomic_open
from demucs.pretrained import SOURCES
from demucs.repitch import check_soundstretch, repitch
from demucs.wav import MIXTURE, build_metadata, musdb_valid_tracks

logger = logging.getLogger("automix")

MUSDB_PATH = '/checkpoint/defossez/datasets/musdbhq'
EXTRA_WAV_PATH = "/checkpoint/defossez/datasets/allstems_44"
# WARNING: OUTPATH is erased on each run (only if it holds a previous automix output).
OUTPATH = Path.home() / 'tmp/demucs_mdx/automix_musdb/'
CACHE = Path.home() / 'tmp/automix_cache'  # per-track tempo, beats and key
CHANNELS = 2
SR = 44100
MAX_PITCH = 3  # largest pitch shift, in semitones
MAX_TEMPO = 0.15  # largest relative tempo change
COPIES = 6  # songs made with each track as reference
SEED = 4321

ANALYSIS_SR = 22050
ANALYSIS_VERSION = 1
BEAT_HOP = 256  # beat tracking frame step at ANALYSIS_SR (11.6 ms)
SILENCE_RMS = 1e-4  # below this peak frame RMS a stem counts as silent
CHROMA_RMS_RATIO = 0.05  # chroma frames used for the key: RMS >= 5% of the peak
ONSET_STEP = 0.005  # onset grid resolution, seconds
ONSET_WIDTH = 0.02  # standard deviation of the Gaussian bumps of the onset grid, seconds
MAX_LAG = 4.  # largest alignment shift, seconds
TEMPO_MULTIPLIERS = (0.25, 0.5, 1., 2., 4.)
REJECTED_COPIES = 2
MARKER = ".automix"
# The libraries the analysis imports, and the extra of requirements.txt that installs them.
ANALYSIS_MODULES = ("librosa", "scipy")
EXTRA = "automix"
# numba's compile target; automix only sets NUMBA_CPU_NAME when neither of them is set.
NUMBA_TARGET_VARIABLES = ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES")
PORTABLE_CPU = "generic"
NUMBA_CACHE = "numba"  # folder of --cache where numba keeps librosa's compiled code
WARM_UP_TRACK = "automix warm-up"  # the synthetic track compiled before the workers start
NUMBA_CACHE_RACE = "https://github.com/numba/numba/issues/10128"
# Signals by which code compiled for the wrong CPU (or otherwise broken) kills a process.
CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGILL, signal.SIGBUS, signal.SIGFPE}


@dataclass
class Spec:
    """Analysis of one track: tempo (BPM), beat times (s) and key profile (12 chroma weights)."""
    name: str
    tempo: float
    beats: tp.List[float]
    chroma: tp.List[float]


@dataclass
class Part:
    """One stem of an output song, taken from `track`, changed by `pitch` and `tempo` (%).

    `beats` are the stem's beat times once repitched, used to align it on the reference; they
    are empty for the stem kept from the reference track, which is used unchanged.
    """
    source: str
    track: str
    pitch: int = 0
    tempo: float = 0.
    beats: tp.List[float] = field(default_factory=list)


@dataclass
class Song:
    """An output song: its folder name, the reference beats its parts are aligned on."""
    name: str
    reference_beats: tp.List[float]
    parts: tp.List[Part]


class AutomixError(RuntimeError):
    """The automix set cannot be built (bad paths, nothing usable, a worker that died).

    `main` prints its message on one line and exits with status 1."""


class MissingDependencyError(AutomixError, ImportError):
    """A library of the analysis is not installed; the message says which extra to install.

    An ImportError (what callers of an import expect) and an AutomixError (one line from main)."""


def _missing_dependency(module: str) -> MissingDependencyError:
    return MissingDependencyError(
        f"tools.automix needs {module}, which is not installed: pip install \"demucs[{EXTRA}]\" "
        f"(or pip install -e \".[{EXTRA}]\" in a checkout)")


def check_dependencies(modules: tp.Sequence[str] = ANALYSIS_MODULES) -> None:
    """Raise MissingDependencyError unless `modules` are installed, without importing them: the
    parent process must not import numba (through librosa) before the workers are started."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise _missing_dependency(module)


def _import_librosa() -> tp.Any:
    try:
        import librosa
    except ImportError as error:
        raise _missing_dependency("librosa") from error
    return librosa


def use_portable_numba_target() -> None:
    """Make numba compile for the baseline CPU of the architecture (`NUMBA_CPU_NAME=generic`)
    in this process and the workers it starts, unless the user chose a target.

    numba compiles for the host CPU by default, as the CPU reports itself, which a VM may do
    wrongly; `generic` code runs on any CPU of the architecture, at no measurable cost here
    (module docstring). With `generic`, numba takes an empty feature list (its config, since
    0.46), so NUMBA_CPU_FEATURES need not be set; a NUMBA_CPU_FEATURES set alone is the user's
    own target and is left as it is. Must run before numba is imported: it reads them once.
    """
    if not any(name in os.environ for name in NUMBA_TARGET_VARIABLES):
        os.environ["NUMBA_CPU_NAME"] = PORTABLE_CPU


def use_private_numba_cache(cache: Path) -> None:
    """Keep the code numba compiles for librosa in `cache/numba` (NUMBA_CACHE_DIR), for this
    process and its workers, unless the user set NUMBA_CACHE_DIR.

    By default numba writes it next to librosa's sources, where any earlier program may have
    left it corrupt (see `_warm_up`): a crash there would keep coming back on every run. Here
    it is automix's own, and deleting the folder is the cure the error message can name.
    """
    os.environ.setdefault("NUMBA_CACHE_DIR", str((cache / NUMBA_CACHE).resolve()))


def load_stem(track: Path, source: str, samplerate: int = SR) -> torch.Tensor:
    """A whole stem as a `[CHANNELS, T]` tensor at `samplerate`."""
    data, rate = soundfile.read(str(track / f"{source}.wav"), dtype="float32", always_2d=True)
    return convert_audio(torch.from_numpy(data.T.copy()), rate, samplerate, CHANNELS)


def _analysis_key(track: Path) -> str:
    stats = [(track / f"{s}.wav").stat() for s in ["drums", "bass"]]
    signature: tp.List[tp.Any] = [str(track.resolve()), ANALYSIS_VERSION]
    signature += [[stat.st_size, stat.st_mtime_ns] for stat in stats]
    return hashlib.sha1(json.dumps(signature).encode()).hexdigest()


def beat_tempo(beats: tp.Sequence[float]) -> float:
    """Tempo (BPM) from the slope of the beat times, finer than librosa's quantized estimate."""
    period = np.polyfit(np.arange(len(beats)), np.asarray(beats), 1)[0]
    return float(60 / period)


def _frame_rms(mono: np.ndarray) -> np.ndarray:
    return _import_librosa().feature.rms(y=mono)[0]


def analyse_track(track: Path) -> tp.Dict[str, tp.Any]:
    """Tempo and beats from the drums, key profile from the bass; `{"rejected": why}` if unfit.

    Imports librosa, hence numba: `analyse_all` runs it in worker processes."""
    librosa = _import_librosa()
    drums = load_stem(track, "drums", ANALYSIS_SR).mean(0).numpy()
    if _frame_rms(drums).max() < SILENCE_RMS:
        return {"rejected": "silent drums"}
    _, beats = librosa.beat.beat_track(y=drums, sr=ANALYSIS_SR, hop_length=BEAT_HOP, units="time")
    if len(beats) < 4:
        return {"rejected": "no beat found in the drums"}
    tempo = beat_tempo(beats)
    bass = load_stem(track, "bass", ANALYSIS_SR).mean(0).numpy()
    rms = _frame_rms(bass)
    if rms.max() < SILENCE_RMS:
        return {"rejected": "silent bass"}
    chroma = librosa.feature.chroma_cqt(y=bass, sr=ANALYSIS_SR)
    frames = min(chroma.shape[1], len(rms))
    loud = rms[:frames] >= CHROMA_RMS_RATIO * rms.max()
    dominant = chroma[:, :frames][:, loud].argmax(0)
    profile = np.bincount(dominant, minlength=12) / max(len(dominant), 1)
    return {"tempo": tempo, "beats": [float(b) for b in beats], "chroma": profile.tolist()}


Analysis = tp.Callable[[Path], tp.Dict[str, tp.Any]]


def _read_cached(track: Path, cache: Path) -> tp.Optional[tp.Dict[str, tp.Any]]:
    path = cache / f"{_analysis_key(track)}.json"
    return json.loads(path.read_text()) if path.exists() else None


def cached_analysis(track: Path, cache: Path,
                    analyse: tp.Optional[Analysis] = None) -> tp.Dict[str, tp.Any]:
    """`analyse` (default `analyse_track`) through a JSON cache keyed by the track path and its
    files' size/mtime: each result is written as soon as it is known, so it survives a crash of
    a later track."""
    result = _read_cached(track, cache)
    if result is None:
        result = (analyse or analyse_track)(track)
        with atomic_open(cache / f"{_analysis_key(track)}.json") as file:
            file.write(json.dumps(result))
    return result


def tempo_match(reference: float, other: float) -> tp.Optional[float]:
    """Multiplier bringing `other` closest to `reference` (half/double time allowed), or None."""
    best = min(TEMPO_MULTIPLIERS, key=lambda m: abs(other * m / reference - 1))
    return best if abs(other * best / reference - 1) <= MAX_TEMPO else None


def pitch_match(reference: tp.Sequence[float], other: tp.Sequence[float]) -> tp.Optional[int]:
    """Semitone shift aligning the key profile `other` on `reference`, None if beyond MAX_PITCH."""
    shifts = list(range(-5, 7))
    scores = [float(np.dot(reference, np.roll(other, shift))) for shift in shifts]
    best = shifts[int(np.argmax(scores))]
    return best if abs(best) <= MAX_PITCH else None


def plan_part(reference: Spec, other: Spec, source: str) -> tp.Optional[Part]:
    """How to adapt `source` of `other` to `reference`, or None when they do not match."""
    multiplier = tempo_match(reference.tempo, other.tempo)
    pitch = pitch_match(reference.chroma, other.chroma)
    if multiplier is None or pitch is None:
        return None
    speed = reference.tempo / (other.tempo * multiplier)
    return Part(source, other.name, pitch, 100 * (speed - 1), [b / speed for b in other.beats])


def plan_song(name: str, reference: Spec, specs: tp.Sequence[Spec],
              rng: random.Random) -> tp.Union[Song, str]:
    """One song around `reference`, or the reason why none can be made."""
    kept = rng.choice(SOURCES)
    parts = [Part(kept, reference.name)]
    for source in SOURCES:
        if source == kept:
            continue
        candidates = [part for spec in specs if spec.name != reference.name
                      for part in [plan_part(reference, spec, source)] if part is not None]
        if not candidates:
            return (f"no track matches {reference.name!r} for {source} within "
                    f"{MAX_TEMPO:.0%} tempo and {MAX_PITCH} semitones")
        parts.append(rng.choice(candidates))
    return Song(name, list(reference.beats), parts)


def onset_grid(beats: tp.Sequence[float], duration: float) -> np.ndarray:
    """Sum of Gaussian bumps at the beat times, sampled every ONSET_STEP seconds."""
    times = np.arange(0, duration, ONSET_STEP)
    grid = np.zeros_like(times)
    for beat in beats:
        window = np.abs(times - beat) < 4 * ONSET_WIDTH
        grid[window] += np.exp(-0.5 * ((times[window] - beat) / ONSET_WIDTH) ** 2)
    return grid


def best_lag(reference: tp.Sequence[float], beats: tp.Sequence[float], duration: float) -> float:
    """Delay (s, within ±MAX_LAG) to apply to `beats` so that they best match `reference`."""
    try:
        from scipy.signal import correlate
    except ImportError as error:
        raise _missing_dependency("scipy") from error
    ref, other = onset_grid(reference, duration), onset_grid(beats, duration)
    scores = correlate(ref, other, mode="full", method="fft")
    lags = np.arange(-len(other) + 1, len(ref))
    allowed = np.abs(lags) <= MAX_LAG / ONSET_STEP
    return float(lags[allowed][np.argmax(scores[allowed])] * ONSET_STEP)


def delay(wav: torch.Tensor, seconds: float) -> torch.Tensor:
    """Delay (pad at the start) or advance (drop the start) `wav` by `seconds`."""
    samples = int(round(seconds * SR))
    if samples >= 0:
        return torch.nn.functional.pad(wav, (samples, 0))
    return wav[:, -samples:]


def render_part(root: Path, part: Part, reference_beats: tp.Sequence[float]) -> torch.Tensor:
    """The stem of `part`, repitched and time-stretched, then shifted onto `reference_beats`."""
    wav = load_stem(root / part.track, part.source)
    if part.pitch or abs(part.tempo) > 1e-3:
        wav = repitch(wav, part.pitch, part.tempo, voice=part.source == "vocals", samplerate=SR)
    if not part.beats:
        return wav
    duration = max(wav.shape[-1] / SR, max(reference_beats) + 1)
    return delay(wav, best_lag(reference_beats, part.beats, duration))


def write_track(folder: Path, stems: tp.Dict[str, torch.Tensor]) -> None:
    """Write the stems cropped to the shortest, scaled so their sum (the mixture, also written)
    peaks below 1/1.01."""
    length = min(stem.shape[-1] for stem in stems.values())
    stems = {source: stem[:, :length] for source, stem in stems.items()}
    peak = sum(stems.values()).abs().max().item()
    gain = min(1., 1 / (1.01 * peak)) if peak > 0 else 1.
    stems = {source: (gain * stem).clamp(-1, 1) for source, stem in stems.items()}
    folder.mkdir(parents=True)
    for source, stem in stems.items():
        save_audio(stem, folder / f"{source}.wav", SR, clip="none", as_float=True)
    save_audio(sum(stems.values()), folder / f"{MIXTURE}.wav", SR, clip="none", as_float=True)


def render_song(root: Path, out: Path, song: Song) -> str:
    """Render and write `song` under `out/train/`; returns its name (run in a worker)."""
    stems = {part.source: render_part(root, part, song.reference_beats) for part in song.parts}
    write_track(out / "train" / song.name, {source: stems[source] for source in SOURCES})
    return song.name


def copy_rejected(root: Path, out: Path, name: str, index: int) -> None:
    """Rejected tracks are still used: copied unchanged REJECTED_COPIES times."""
    stems = {source: load_stem(root / name, source) for source in SOURCES}
    for copy in range(REJECTED_COPIES):
        write_track(out / "train" / f"rej_{copy}_{index}", stems)


def prepare_output(out: Path) -> None:
    """Erase a previous automix output at `out` (refusing to erase anything else)."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise AutomixError(f"{out} is not empty and is not an automix output "
                               f"(no {MARKER} file): refusing to erase it, choose another --out")
        shutil.rmtree(out)
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "valid").mkdir(exist_ok=True)
    (out / MARKER).touch()


def source_tracks(musdb: Path) -> tp.List[str]:
    """Training tracks of the 4-stem set (MusDB validation tracks excluded), validated."""
    if not (musdb / "train").is_dir():
        raise AutomixError(f"{musdb}/train does not exist: set --musdb (or MUSDB_PATH) to a "
                           "MusDB HQ like folder with train/<track>/<stem>.wav")
    valid = set(musdb_valid_tracks())
    names = [name for name in build_metadata(musdb / "train", SOURCES, normalize=False)
             if name not in valid]
    if not names:
        raise AutomixError(f"no training track in {musdb}/train once the MusDB validation "
                           "tracks are removed")
    return names


def _mp_context() -> tp.Any:
    """Workers start as fresh interpreters ("spawn"), never as forks of this process.

    A fork inherits this process' state: torch's OpenMP thread pool, which deadlocks a forked
    child that runs a torch op if the parent ran one with several threads (a render worker hung
    so in the tests), and numba, whose compile target and cache folder are read once, when
    it is imported. Workers get the functions by reference and import them."""
    return multiprocessing.get_context("spawn")


def _pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max(1, workers), mp_context=_mp_context())


def _answer(sender: Connection, function: tp.Callable, args: tp.Tuple) -> None:
    """Body of the processes of `_run_each_alone`: sends ("ok", result) or ("error", exception)."""
    try:
        message: tp.Tuple[str, tp.Any] = ("ok", function(*args))
    except Exception as error:
        message = ("error", error)
    try:
        sender.send(message)
    except Exception as error:  # a result or an exception that cannot be pickled
        sender.send(("error", RuntimeError(f"{message[1]!r} (could not be sent back: {error})")))
    sender.close()


def _run_each_alone(function: tp.Callable, calls: tp.Sequence[tp.Tuple]
                    ) -> tp.List[tp.Tuple[bool, tp.Any]]:
    """`function(*args)` for each `args` of `calls`, each in a fresh process of its own, all at
    once. Returns, in order, (True, result), or (False, exit code: -N for signal N) for a
    process that died without answering; raises the first exception a call raised."""
    context = _mp_context()
    running = []
    try:
        for args in calls:
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(target=_answer, args=(sender, function, args), daemon=True)
            process.start()
            sender.close()
            running.append((process, receiver))
        outcomes = []
        for process, receiver in running:
            try:
                status, value = receiver.recv()
            except EOFError:
                status, value = "died", None
            process.join()
            if status == "error":
                raise value
            outcomes.append((True, value) if status == "ok" else (False, process.exitcode))
        return outcomes
    finally:
        for process, receiver in running:
            receiver.close()
            if process.is_alive():  # after an error: the others are not waited for
                process.terminate()
                process.join()


def _death_cause(exitcode: tp.Optional[int]) -> str:
    """How a process ended: "signal 11 / SIGSEGV", "exit status 3"."""
    if exitcode is None or exitcode >= 0:
        return f"exit status {exitcode}"
    try:
        return f"signal {-exitcode} / {signal.Signals(-exitcode).name}"
    except ValueError:
        return f"signal {-exitcode}"


def _death_hint(exitcode: tp.Optional[int]) -> str:
    """What to try after an analysis process died with `exitcode`."""
    number = -exitcode if exitcode is not None and exitcode < 0 else None
    if number == signal.SIGKILL:
        return "killed, for lack of memory? try fewer workers with -j"
    if number not in CRASH_SIGNALS:
        return "rerun with PYTHONFAULTHANDLER=1 to see where"
    target = ", ".join(f"{variable}={os.environ[variable]}"
                       for variable in NUMBA_TARGET_VARIABLES if variable in os.environ)
    if target != f"NUMBA_CPU_NAME={PORTABLE_CPU}":
        hint = (f"numba's JIT may not support this CPU ({target or 'compiling for the host CPU'})"
                f"; try NUMBA_CPU_NAME={PORTABLE_CPU}")
        return hint + (" with NUMBA_CPU_FEATURES unset" if "NUMBA_CPU_FEATURES" in os.environ
                       else "")
    cache = os.environ.get("NUMBA_CACHE_DIR", "librosa's __pycache__ folders")
    return (f"numba's cache may be corrupt ({NUMBA_CACHE_RACE}): delete {cache} and retry, "
            "else rerun with PYTHONFAULTHANDLER=1 to see where it crashes")


def _death_message(name: str, exitcode: tp.Optional[int], others: tp.Sequence[str] = ()) -> str:
    """One line saying that the analysis of `name` killed its process, how, and what to try;
    `others` are tracks whose analysis died too."""
    also = f" ({', '.join(map(repr, others))} too)" if others else ""
    return (f"Could not analyse track {name!r}{also}: its analysis process died "
            f"({_death_cause(exitcode)}); {_death_hint(exitcode)}")


def _write_warm_up_track(folder: Path) -> Path:
    """A 6 s synthetic track that `analyse_track` does not reject, so that it goes through
    every step as a real track does: noise bursts at 120 BPM (drums) and an A1 with its first 8
    harmonics decaying on each beat (bass; harmonics in librosa's tuning range, 150 Hz-4 kHz)."""
    track = folder / WARM_UP_TRACK
    track.mkdir()
    time = np.arange(6 * ANALYSIS_SR) / ANALYSIS_SR
    envelope = np.exp(-12 * (time % 0.5))
    noise = np.random.default_rng(0).standard_normal(len(time))
    note = sum(np.sin(2 * np.pi * 55 * rank * time) / rank for rank in range(1, 9))
    stems = {"drums": 0.5 * envelope * noise, "bass": 0.1 * envelope * note}
    for source, data in stems.items():
        soundfile.write(str(track / f"{source}.wav"), data.astype(np.float32), ANALYSIS_SR,
                        subtype="FLOAT")
    return track


def _warm_up(analyse: Analysis) -> None:
    """Run `analyse` on a synthetic track in a process of its own, before the workers start.

    numba saves the code it compiles for librosa in its cache as it goes. Two processes that
    compile the same gufunc at once can leave its kernel and its wrapper from different
    processes in the cache, and every process that loads them then dies of SIGSEGV (numba
    issue 10128, open in numba 0.68): a cold cache and `-j 2` were enough on the toy set.
    Compiling once, alone, leaves the workers only code to load.
    """
    with tempfile.TemporaryDirectory(prefix="automix_warm_up_") as folder:
        [(answered, value)] = _run_each_alone(analyse, [(_write_warm_up_track(Path(folder)),)])
    if not answered:
        raise AutomixError(f"Could not analyse a synthetic test track, before any real one: its "
                           f"analysis process died ({_death_cause(value)}); {_death_hint(value)}")


def _analyse_in_workers(root: Path, names: tp.List[str], cache: Path, workers: int,
                        analyse: Analysis) -> tp.Dict[str, tp.Dict[str, tp.Any]]:
    """`cached_analysis` of each track of `names` in a pool of worker processes.

    A worker that dies breaks the whole pool, without saying which track it ran. The pool hands
    out tracks in order, so that track is among the first `size` unfinished ones: they are
    rerun each in a fresh process of its own (all at once), a track whose process dies again is
    named in an AutomixError, and if none dies (the death was not the track's doing) the other
    tracks go back to a pool.
    """
    size = max(1, min(workers, len(names)))
    results, unfinished = {}, []
    with _pool(size) as pool:
        futures = [pool.submit(cached_analysis, root / name, cache, analyse) for name in names]
        try:
            for name, future in zip(names, futures):
                try:
                    results[name] = future.result()
                except BrokenProcessPool:
                    unfinished.append(name)
        except BaseException:  # an analysis that raised: do not start the others
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    if not unfinished:
        return results
    suspects, rest = unfinished[:size], unfinished[size:]
    outcomes = _run_each_alone(cached_analysis,
                               [(root / name, cache, analyse) for name in suspects])
    dead = [(name, value) for name, (answered, value) in zip(suspects, outcomes) if not answered]
    if dead:
        raise AutomixError(_death_message(*dead[0], others=[name for name, _ in dead[1:]]))
    results.update((name, value) for name, (_, value) in zip(suspects, outcomes))
    logger.warning("An analysis process died, yet %s analysed fine on their own (out of memory? "
                   "fewer workers with -j may help): going on", ", ".join(map(repr, suspects)))
    if rest:
        results.update(_analyse_in_workers(root, rest, cache, workers, analyse))
    return results


def analyse_all(root: Path, names: tp.List[str], cache: Path, workers: int
                ) -> tp.Tuple[tp.List[Spec], tp.List[str]]:
    """Specs of the usable tracks and the names of the rejected ones (logged, one line each).

    The tracks missing from the cache are analysed in worker processes, at least one even with
    `workers=1`: librosa's compiled code can crash a process, which must not be this one. A
    track that kills its worker stops the build with an AutomixError naming it; what was
    analysed until then stays in the cache. With several workers, numba first compiles
    librosa's code in a single process (`_warm_up`).
    """
    cache.mkdir(parents=True, exist_ok=True)
    results = {name: _read_cached(root / name, cache) for name in names}
    pending = [name for name, result in results.items() if result is None]
    if pending:
        use_portable_numba_target()
        use_private_numba_cache(cache)
        # The function travels to the workers by reference (module and name): they run the
        # one this process sees, whatever the start method.
        analyse = analyse_track
        if min(workers, len(pending)) > 1:
            _warm_up(analyse)
        results.update(_analyse_in_workers(root, pending, cache, workers, analyse))
    specs, rejected = [], []
    for name in names:
        result = results[name]
        assert result is not None
        if "rejected" in result:
            logger.info("Rejected track %r: %s (expected for a few tracks, kept unmixed)",
                        name, result["rejected"])
            rejected.append(name)
        else:
            specs.append(Spec(name, result["tempo"], result["beats"], result["chroma"]))
    return specs, rejected


def plan_songs(specs: tp.List[Spec], copies: int, seed: int) -> tp.List[Song]:
    """`copies` songs around each track of `specs`, drawn with `seed` (rejections logged)."""
    rng = random.Random(seed)
    songs = []
    for copy in range(copies):
        for index, reference in enumerate(specs):
            song = plan_song(f"{copy}_{index}", reference, specs, rng)
            if isinstance(song, str):
                logger.info("Rejected song %d_%d: %s (expected)", copy, index, song)
            else:
                songs.append(song)
    return songs


def _render_all(root: Path, out: Path, songs: tp.List[Song], rejected: tp.List[str],
                workers: int) -> tp.List[tp.Optional[str]]:
    """Write `songs` and the copies of the `rejected` tracks in worker processes (at least one,
    so that a crash cannot take the caller down)."""
    with _pool(workers) as pool:
        futures = [pool.submit(render_song, root, out, song) for song in songs]
        futures += [pool.submit(copy_rejected, root, out, name, index)
                    for index, name in enumerate(rejected)]
        try:
            return [future.result() for future in futures]
        except BaseException:  # do not write the rest of the set before saying so
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def automix(musdb: Path, out: Path, cache: Path = CACHE, copies: int = COPIES, seed: int = SEED,
            workers: int = 1) -> tp.List[str]:
    """Build the automix set from `musdb` into `out`; returns the names of the songs written.

    Sets NUMBA_CPU_NAME=generic in this process unless a numba target is set (see
    `use_portable_numba_target`). All the tracks are analysed before `out` is touched, and a
    failure while writing removes `out`: no partial set is ever left behind.
    """
    check_soundstretch()
    check_dependencies()
    root = musdb / "train"
    names = source_tracks(musdb)
    specs, rejected = analyse_all(root, names, cache, workers)
    prepare_output(out)
    songs = plan_songs(specs, copies, seed)
    try:
        written = _render_all(root, out, songs, rejected, workers)
    except BrokenProcessPool:
        shutil.rmtree(out, ignore_errors=True)
        raise AutomixError(f"A render process died while writing the songs (killed for lack of "
                           f"memory? try fewer workers with -j): removed the partial output {out}"
                           ) from None
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        logger.error("Removed the partial output %s", out)
        raise
    logger.info("Wrote %d songs (+%d rejected tracks copied) to %s", len(songs), len(rejected), out)
    if not songs:
        logger.warning("No song could be mixed: no two tracks have tempos within %.0f%% and keys "
                       "within %d semitones", 100 * MAX_TEMPO, MAX_PITCH)
    return [name for name in written if name]


def get_parser() -> argparse.ArgumentParser:
    """The command line of `python3 -m tools.automix`."""
    parser = argparse.ArgumentParser("tools.automix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--musdb", type=Path, default=Path(MUSDB_PATH),
                        help="4-stem dataset with train/<track>/<stem>.wav (default: MUSDB_PATH)")
    parser.add_argument("--out", type=Path, default=OUTPATH,
                        help="output folder, erased if it holds a previous automix output")
    parser.add_argument("--cache", type=Path, default=CACHE, help="per-track analysis cache")
    parser.add_argument("--copies", type=int, default=COPIES)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("-j", "--workers", type=int, default=os.cpu_count() or 1,
                        help="processes (default: all the cores)")
    return parser


def main(argv: tp.Optional[tp.List[str]] = None) -> None:
    """`python3 -m tools.automix`: an AutomixError is one logged line and exit status 1."""
    use_portable_numba_target()
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = get_parser().parse_args(argv)
    torch.set_num_threads(1)
    try:
        automix(args.musdb, args.out, args.cache, args.copies, args.seed, args.workers)
    except AutomixError as error:
        logger.error("%s", error)
        sys.exit(1)


if __name__ == "__main__":
    main()
