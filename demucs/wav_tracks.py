"""The track folders of a multi-stem wav dataset: finding them, checking their stems, and the
metadata of each track.

A *track* is a leaf folder holding one `{source}.wav` per stem and a `mixture.wav` (created as the
sum of the stems when missing). Checks read the headers only; every bad track is reported, all
problems at once, in a single `DatasetError`. The datasets and the metadata cache that keeps
`build_metadata`'s result between runs are in `demucs.wav`.
"""
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
import logging
import math
import os
from pathlib import Path
import typing as tp

import soundfile
import torch

from .audio import convert_audio_channels
from .files import atomic_write

logger = logging.getLogger(__name__)

MIXTURE = "mixture"
EXT = ".wav"
METADATA_THREADS = 8
TrackMeta = tp.Dict[str, tp.Any]
Metadata = tp.Dict[str, TrackMeta]


class DatasetError(ValueError):
    """One or more tracks of a dataset cannot be used; `problems` lists each as a sentence."""

    def __init__(self, problems: tp.Sequence[str], context: str = "dataset"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(
            f"{len(self.problems)} problem(s) found in {context}, "
            f"fix them and start again:\n{lines}")


class TrackError(Exception):
    """A single track is unusable; the message names the file and the problem."""


@dataclass
class _StemInfo:
    path: Path
    frames: int
    samplerate: int
    channels: int


def _audio_info(path: Path) -> _StemInfo:
    """Read the header of one audio file (no samples), raising `TrackError` when it is unusable."""
    try:
        info = soundfile.info(str(path))
    except (RuntimeError, OSError) as error:
        raise TrackError(f"{path}: unreadable audio file ({error})") from error
    if info.frames == 0:
        raise TrackError(f"{path}: empty audio file (0 frames)")
    return _StemInfo(path, info.frames, info.samplerate, info.channels)


def read_frames(path: Path, offset: int = 0, frames: int = -1) -> torch.Tensor:
    """Read `frames` frames (all when -1) of `path` from `offset`, as a float `[C, T]` tensor."""
    data, _ = soundfile.read(str(path), start=offset, frames=frames, dtype="float32",
                             always_2d=True)
    return torch.from_numpy(data).t()


def _write_audio_atomic(path: Path, wav: torch.Tensor, samplerate: int) -> None:
    """Write a float `[C, T]` tensor as a 32-bit float wav through a temporary file and a rename."""
    with atomic_write(path) as temporary:
        soundfile.write(str(temporary), wav.t().numpy(), samplerate, subtype="FLOAT",
                        format="WAV")


def find_tracks(root: Path) -> tp.List[str]:
    """Names (paths relative to `root`) of the leaf, non hidden folders under `root`, sorted."""
    names = []
    for folder, subfolders, _ in os.walk(root, followlinks=True):
        folder_path = Path(folder)
        hidden = any(part.startswith(".") for part in folder_path.relative_to(root).parts)
        if subfolders or hidden or folder_path == root:
            continue
        names.append(str(folder_path.relative_to(root)))
    return sorted(names)


def _fingerprint(track: Path, ext: str) -> tp.Dict[str, tp.List[int]]:
    """`{file name: [size, mtime_ns]}` of each audio file of a track folder (stat, no reading)."""
    prints = {}
    for entry in os.scandir(track):
        if entry.name.endswith(ext) and not entry.name.startswith("."):
            stat = entry.stat()
            prints[entry.name] = [stat.st_size, stat.st_mtime_ns]
    return prints


def _check_stems(track: Path, stems: tp.Sequence[str], ext: str) -> tp.List[_StemInfo]:
    """Headers of the stems of `track`; `TrackError` listing missing or mismatched stems."""
    missing = [stem + ext for stem in stems if not (track / (stem + ext)).is_file()]
    if missing:
        raise TrackError(f"{track}: missing stem file(s) {', '.join(missing)}")
    infos = [_audio_info(track / (stem + ext)) for stem in stems]
    reference = infos[0]
    for info in infos[1:]:
        if info.samplerate != reference.samplerate:
            raise TrackError(
                f"{info.path}: sample rate {info.samplerate} Hz differs from "
                f"{reference.path.name} ({reference.samplerate} Hz); "
                "resample the stems to one rate")
        if info.frames != reference.frames:
            raise TrackError(
                f"{info.path}: length {info.frames} frames differs from {reference.path.name} "
                f"({reference.frames} frames); all stems of a track must have the same length")
    return infos


def _stems_in_no_track(root: Path, names: tp.Sequence[str], stems: tp.Sequence[str],
                       ext: str) -> tp.List[str]:
    """The stems of `stems` that not one of the track folders `names` of `root` holds (a typo in
    `dset.sources`, or a set made for other stems), to report once rather than once per track."""
    if not names:
        return []
    present = {entry for name in names for entry in os.listdir(root / name)}
    return [stem for stem in stems if stem + ext not in present]


SOURCES_ADVICE = "check the spelling in dset.sources, or use a folder made for these stems"


def missing_everywhere_problem(root: Path, names: tp.Sequence[str], missing: tp.Sequence[str],
                               ext: str = EXT, advice: str = SOURCES_ADVICE) -> str:
    """One sentence for stems that no track folder of `root` holds, naming the stems it holds
    and ending with `advice`."""
    held = sorted({Path(entry).stem for name in names for entry in os.listdir(root / name)
                   if entry.endswith(ext) and not entry.startswith(".")})
    files = ", ".join(stem + ext for stem in missing)
    return (f"{root}: none of its {len(names)} song folder(s) holds {files} (its songs hold "
            f"{', '.join(held) or 'no wav file'}): {advice}")


def check_tracks(root: tp.Union[str, Path], stems: tp.Sequence[str], ext: str = EXT,
                 samplerate: tp.Optional[int] = None,
                 advice: str = SOURCES_ADVICE) -> tp.List[str]:
    """Problems of the track folders under `root`, one sentence each naming the file; [] when every
    track has all of `stems`, readable, with one length and sample rate (`samplerate`, the rate
    `dset.musdb_samplerate` reads the MusDB test set at, when given). A stem that no track holds
    is one problem (ending with `advice`), not one per track. Reads headers only and writes
    nothing (for sets that are only read later, like the MusDB test set)."""
    root = Path(root)
    if not root.is_dir():
        return [f"{root}: folder does not exist"]
    names = find_tracks(root)
    nowhere = _stems_in_no_track(root, names, stems, ext)
    problems = [missing_everywhere_problem(root, names, nowhere, ext, advice)] if nowhere else []
    stems = [stem for stem in stems if stem not in nowhere]
    other_rates: tp.Dict[int, tp.List[Path]] = {}
    for name in names if stems else []:
        try:
            infos = _check_stems(root / name, stems, ext)
        except TrackError as error:
            problems.append(str(error))
            continue
        if samplerate is not None and infos[0].samplerate != samplerate:
            other_rates.setdefault(infos[0].samplerate, []).append(infos[0].path)
    for rate, paths in other_rates.items():
        where = str(paths[0]) if len(paths) == 1 else f"{len(paths)} songs of {root} " \
            f"(e.g. {paths[0]})"
        problems.append(
            f"{where}: {rate} Hz, but the test set is read as dset.musdb_samplerate="
            f"{samplerate} Hz (the scores would be computed on wrongly pitched audio): set "
            f"dset.musdb_samplerate={rate}, or resample the test songs to {samplerate} Hz")
    return problems


def _create_mixture(track: Path, sources: tp.Sequence[str], ext: str) -> None:
    """Write `mixture.wav` as the sum of the stems, as upstream does for folders without one."""
    infos = _check_stems(track, sources, ext)
    channels = max(info.channels for info in infos)
    total = sum(convert_audio_channels(read_frames(info.path), channels) for info in infos)
    logger.info("%s: no %s%s, writing the sum of the stems", track, MIXTURE, ext)
    _write_audio_atomic(track / (MIXTURE + ext), total, infos[0].samplerate)


def track_metadata(track: Path, sources: tp.Sequence[str], normalize: bool = True,
                   ext: str = EXT) -> TrackMeta:
    """Validate one track folder and return its metadata.

    Keys: `length` and `samplerate` of the stems, `mean` and `std` of the mono mixture (0 and 1
    when not `normalize`), and `files`, the fingerprint used to detect later changes.
    Raises `TrackError` naming the file and the problem.
    """
    if not (track / (MIXTURE + ext)).exists():
        _create_mixture(track, sources, ext)
    infos = _check_stems(track, [MIXTURE] + list(sources), ext)
    mean, std = 0., 1.
    if normalize:
        mono = read_frames(infos[0].path).mean(dim=0)
        mean, std = mono.mean().item(), mono.std().item()
        if not std > 0 or not math.isfinite(std):
            raise TrackError(f"{infos[0].path}: the mixture is silent or not finite (std={std}), "
                             "it cannot be normalized; remove the track")
    return {"length": infos[0].frames, "mean": mean, "std": std,
            "samplerate": infos[0].samplerate, "files": _fingerprint(track, ext)}


def _is_number(value: tp.Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _is_valid_track_meta(meta: tp.Any) -> bool:
    """True when a cached track entry holds every field `Wavset` needs, with usable values."""
    if not isinstance(meta, dict):
        return False
    counts = [meta.get("length"), meta.get("samplerate")]
    return (all(isinstance(count, int) and not isinstance(count, bool) and count > 0
                for count in counts)
            and _is_number(meta.get("mean")) and _is_number(meta.get("std"))
            and meta["std"] > 0 and isinstance(meta.get("files"), dict))


def is_fresh(meta: tp.Optional[TrackMeta], track: Path, ext: str) -> bool:
    """A cached entry is reused only when well formed and its files did not change."""
    return _is_valid_track_meta(meta) and meta["files"] == _fingerprint(track, ext)


def build_metadata(path: tp.Union[str, Path], sources: tp.Sequence[str], normalize: bool = True,
                   ext: str = EXT, previous: tp.Optional[Metadata] = None) -> Metadata:
    """Metadata of every track under `path`, built with a pool of threads.

    Entries of `previous` whose file fingerprints still match are reused without reading any audio.
    Every bad track is collected and reported in one `DatasetError`.
    """
    root = Path(path)
    if not root.is_dir():
        raise DatasetError([f"{root}: folder does not exist"], context=str(root))
    previous = previous or {}
    names = find_tracks(root)
    nowhere = _stems_in_no_track(root, names, sources, ext)
    if nowhere:
        raise DatasetError([missing_everywhere_problem(root, names, nowhere, ext)],
                           context=str(root))
    problems: tp.List[str] = []
    metadata: Metadata = {}

    def process(name: str) -> tp.Tuple[str, tp.Optional[TrackMeta], tp.Optional[str]]:
        track = root / name
        if is_fresh(previous.get(name), track, ext):
            return name, previous[name], None
        try:
            return name, track_metadata(track, sources, normalize, ext), None
        except TrackError as error:
            return name, None, str(error)

    with ThreadPoolExecutor(METADATA_THREADS) as pool:
        for name, meta, problem in pool.map(process, names):
            if problem is not None:
                problems.append(problem)
            else:
                metadata[name] = meta
    if problems:
        raise DatasetError(problems, context=str(root))
    return metadata
