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

then point `dset.wav` of `conf/dset/auto_mus.yaml` at the output folder.
"""
import argparse
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
import hashlib
import json
import logging
import os
from pathlib import Path
import random
import shutil
import typing as tp

import numpy as np
import soundfile
import torch

from demucs.audio import convert_audio, save_audio
from demucs.files import atomic_open
from demucs.pretrained import SOURCES
from demucs.repitch import check_soundstretch, repitch
from demucs.utils import DummyPoolExecutor
from demucs.wav import MIXTURE, _get_musdb_valid, build_metadata

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
    name: str
    reference_beats: tp.List[float]
    parts: tp.List[Part]


class AutomixError(RuntimeError):
    """The automix set cannot be built (bad paths, nothing usable)."""


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
    import librosa
    return librosa.feature.rms(y=mono)[0]


def analyse_track(track: Path) -> tp.Dict[str, tp.Any]:
    """Tempo and beats from the drums, key profile from the bass; `{"rejected": why}` if unfit."""
    import librosa
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


def cached_analysis(track: Path, cache: Path) -> tp.Dict[str, tp.Any]:
    """`analyse_track` through a JSON cache keyed by the track path and its files' size/mtime."""
    path = cache / f"{_analysis_key(track)}.json"
    if path.exists():
        return json.loads(path.read_text())
    result = analyse_track(track)
    with atomic_open(path) as file:
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
    from scipy.signal import correlate
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
    valid = set(_get_musdb_valid())
    names = [name for name in build_metadata(musdb / "train", SOURCES, normalize=False)
             if name not in valid]
    if not names:
        raise AutomixError(f"no training track in {musdb}/train once the MusDB validation "
                           "tracks are removed")
    return names


def _pool(workers: int):
    return ProcessPoolExecutor(workers) if workers > 1 else DummyPoolExecutor()


def analyse_all(root: Path, names: tp.List[str], cache: Path, workers: int
                ) -> tp.Tuple[tp.List[Spec], tp.List[str]]:
    """Specs of the usable tracks and the names of the rejected ones (logged, one line each)."""
    cache.mkdir(parents=True, exist_ok=True)
    specs, rejected = [], []
    with _pool(workers) as pool:
        futures = [pool.submit(cached_analysis, root / name, cache) for name in names]
        for name, future in zip(names, futures):
            result = future.result()
            if "rejected" in result:
                logger.info("Rejected track %r: %s (expected for a few tracks, kept unmixed)",
                            name, result["rejected"])
                rejected.append(name)
            else:
                specs.append(Spec(name, result["tempo"], result["beats"], result["chroma"]))
    return specs, rejected


def plan_songs(specs: tp.List[Spec], copies: int, seed: int) -> tp.List[Song]:
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


def automix(musdb: Path, out: Path, cache: Path = CACHE, copies: int = COPIES, seed: int = SEED,
            workers: int = 1) -> tp.List[str]:
    """Build the automix set from `musdb` into `out`; returns the names of the songs written."""
    check_soundstretch()
    root = musdb / "train"
    names = source_tracks(musdb)
    specs, rejected = analyse_all(root, names, cache, workers)
    prepare_output(out)
    songs = plan_songs(specs, copies, seed)
    with _pool(workers) as pool:
        futures = [pool.submit(render_song, root, out, song) for song in songs]
        futures += [pool.submit(copy_rejected, root, out, name, index)
                    for index, name in enumerate(rejected)]
        written = [future.result() for future in futures]
    logger.info("Wrote %d songs (+%d rejected tracks copied) to %s", len(songs), len(rejected), out)
    if not songs:
        logger.warning("No song could be mixed: no two tracks have tempos within %.0f%% and keys "
                       "within %d semitones", 100 * MAX_TEMPO, MAX_PITCH)
    return [name for name in written if name]


def get_parser() -> argparse.ArgumentParser:
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
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = get_parser().parse_args(argv)
    torch.set_num_threads(1)
    automix(args.musdb, args.out, args.cache, args.copies, args.seed, args.workers)


if __name__ == "__main__":
    main()
