"""Datasets of multi-stem wav tracks (MusDB HQ and custom folders) with a validated metadata cache.

The track folders, their checks and their metadata are `demucs.wav_tracks`' job (its public names
are importable from here too). Per-track metadata (`length`, `mean`, `std`, `samplerate`) is cached
as JSON in `dset.metadata`. Unlike upstream Demucs, the cache also records the size and
modification time of every audio file so that it is refreshed automatically, and only for the
tracks that changed, when a track is added, removed or modified. Bad data is reported before
training starts, all problems at once, in a single `DatasetError`.
"""
from collections import OrderedDict
import bisect
import hashlib
import json
import logging
import math
from pathlib import Path
import typing as tp

import numpy as np
import torch
from torch.nn import functional as F
import yaml

from .audio import convert_audio_channels, resample
from .files import atomic_open
from .wav_tracks import (EXT, MIXTURE, DatasetError, Metadata, TrackMeta, build_metadata,
                         find_tracks, is_fresh, read_frames)
from .wav_tracks import check_tracks  # noqa: F401  (importable from here, as before the split)

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2


def _stale_reason(cached: tp.Optional[dict], roots: tp.Dict[str, Path], sources: tp.Sequence[str],
                  normalize: bool, ext: str) -> tp.Optional[str]:
    """Why the cached metadata cannot be used as is (None when it is up to date)."""
    if cached is None:
        return "no cache yet"
    if not isinstance(cached, dict) or cached.get("format") != CACHE_FORMAT:
        return "written in an older format"
    if cached.get("sources") != list(sources) or cached.get("normalize") != normalize:
        return "sources or normalize setting changed"
    reasons = []
    for split, root in roots.items():
        known = cached["splits"].get(split, {})
        present = set(find_tracks(root)) if root.is_dir() else set()
        added = sorted(present - set(known))
        removed = sorted(set(known) - present)
        changed = sorted(name for name in present & set(known)
                         if not is_fresh(known[name], root / name, ext))
        for label, names in [("added", added), ("removed", removed), ("changed", changed)]:
            if names:
                reasons.append(f"{split}: {len(names)} track(s) {label} ({', '.join(names[:3])}"
                               f"{', ...' if len(names) > 3 else ''})")
    return "; ".join(reasons) or None


def _load_json(path: Path) -> tp.Optional[dict]:
    if not path.exists():
        return None
    try:
        with open(path) as file:
            content = json.load(file)
    except (OSError, ValueError) as error:
        logger.warning("Metadata cache %s is unreadable (%s), rebuilding it", path, error)
        return None
    splits = content.get("splits") if isinstance(content, dict) else None
    if not (isinstance(splits, dict) and all(isinstance(split, dict)
                                             for split in splits.values())):
        logger.warning("Metadata cache %s does not have the expected structure, rebuilding it",
                       path)
        return None
    return content


def _write_json_atomic(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as file:
        json.dump(content, file)


def _distributed() -> tp.Tuple[int, tp.Callable[[], None]]:
    """This process's rank and a barrier; rank 0 and no-op barrier outside distributed runs."""
    try:
        from . import distrib
    except ImportError:
        return 0, lambda: None
    return distrib.rank, distrib.barrier


def cached_metadata(cache_file: tp.Union[str, Path], roots: tp.Dict[str, Path],
                    sources: tp.Sequence[str], normalize: bool = True,
                    ext: str = EXT) -> tp.Dict[str, Metadata]:
    """Metadata of each split folder in `roots`, through the JSON cache file `cache_file`.

    Rank 0 checks the cache against the files on disk (stat only) and rebuilds the tracks that were
    added or changed, logging why; other ranks wait at a barrier and read the result.
    """
    cache_file = Path(cache_file)
    rank, barrier = _distributed()
    if rank == 0:
        cached = _load_json(cache_file)
        reason = _stale_reason(cached, roots, sources, normalize, ext)
        if reason is not None:
            logger.info("Building metadata cache %s: %s", cache_file, reason)
            cached = _rebuild(cached, roots, sources, normalize, ext)
            _write_json_atomic(cache_file, cached)
    barrier()
    if rank != 0:
        cached = _load_json(cache_file)
    if cached is None:
        raise FileNotFoundError(f"metadata cache {cache_file} was not written by rank 0: "
                                "dset.metadata must be on a file system shared by all workers")
    return cached["splits"]


def _reusable_splits(cached: tp.Optional[dict], sources: tp.Sequence[str],
                     normalize: bool) -> tp.Dict[str, Metadata]:
    """Entries of an old cache that may be reused (only when built with the same settings)."""
    if (isinstance(cached, dict) and cached.get("format") == CACHE_FORMAT
            and cached.get("sources") == list(sources) and cached.get("normalize") == normalize):
        return cached["splits"]
    return {}


def _rebuild(cached: tp.Optional[dict], roots: tp.Dict[str, Path], sources: tp.Sequence[str],
             normalize: bool, ext: str) -> dict:
    """New cache content; problems of all splits are gathered into one `DatasetError`."""
    reuse = _reusable_splits(cached, sources, normalize)
    splits, problems = {}, []
    for split, root in roots.items():
        try:
            splits[split] = build_metadata(root, sources, normalize, ext, previous=reuse.get(split))
        except DatasetError as error:
            problems += error.problems
    if problems:
        raise DatasetError(problems, context=", ".join(str(root) for root in roots.values()))
    return {"format": CACHE_FORMAT, "sources": list(sources), "normalize": normalize,
            "splits": splits}


class Wavset:
    """Examples cut from multi-stem tracks, each a `[sources, channels, time]` tensor.

    A track of duration `d` seconds gives `ceil((d - segment) / shift) + 1` examples (one when no
    `segment` or when shorter than it). Example `k` starts `k * shift` seconds in; only the needed
    frames are read. Stems are converted to `channels`, resampled to `samplerate`, normalized by the
    track's mixture statistics when `normalize`, and cropped or zero padded to
    `int(segment * samplerate)`.
    """

    def __init__(self, root: tp.Union[str, Path], metadata: Metadata, sources: tp.Sequence[str],
                 segment: tp.Optional[float] = None, shift: tp.Optional[float] = None,
                 normalize: bool = True, samplerate: int = 44100, channels: int = 2,
                 ext: str = EXT):
        self.root = Path(root)
        self.metadata = OrderedDict(metadata)
        self.segment = segment
        self.shift = shift or segment
        self.normalize = normalize
        self.sources = list(sources)
        self.channels = channels
        self.samplerate = samplerate
        self.ext = ext
        self._names = list(self.metadata)
        self.num_examples = [self._examples_in(meta) for meta in self.metadata.values()]
        self._ends = list(np.cumsum(self.num_examples))

    def _examples_in(self, meta: TrackMeta) -> int:
        duration = meta["length"] / meta["samplerate"]
        if self.segment is None or duration < self.segment:
            return 1
        return int(math.ceil((duration - self.segment) / self.shift) + 1)

    def __len__(self) -> int:
        return sum(self.num_examples)

    def get_file(self, name: str, source: str) -> Path:
        """Path of the `source` stem of track `name`."""
        return self.root / name / (source + self.ext)

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a Wavset of {len(self)} examples")
        track_index = bisect.bisect_right(self._ends, index)
        name = self._names[track_index]
        start = self._ends[track_index - 1] if track_index else 0
        return self._example(name, index - start)

    def _example(self, name: str, index: int) -> torch.Tensor:
        meta = self.metadata[name]
        offset, frames = 0, -1
        if self.segment is not None:
            offset = int(meta["samplerate"] * self.shift * index)
            frames = int(math.ceil(meta["samplerate"] * self.segment))
        wavs = [convert_audio_channels(
                    read_frames(self.get_file(name, source), offset, frames), self.channels)
                for source in self.sources]
        example = torch.stack(wavs)
        if meta["samplerate"] != self.samplerate:
            example = resample(example, meta["samplerate"], self.samplerate)
        if self.normalize:
            example.sub_(meta["mean"]).div_(meta["std"])
        if self.segment is not None:
            length = int(self.segment * self.samplerate)
            example = example[..., :length]
            if example.shape[-1] < length:
                example = F.pad(example, (0, length - example.shape[-1]))
        return example


def _hash_path(path: tp.Union[str, Path]) -> str:
    return hashlib.sha1(str(path).encode()).hexdigest()[:8]


def _check_folder(path: Path, key: str) -> None:
    if not path.is_dir():
        raise DatasetError([f"{path}: folder does not exist; set `{key}` to the right path "
                            f"(e.g. `{key}=/path/to/data`)"], context=key)


def _check_subfolders(root: Path, key: str, splits: tp.Sequence[str]) -> None:
    """`root` (the value of `key`) must hold the folders `splits`; one problem per missing one,
    saying what the layout is (the path itself is right when only a subfolder is missing)."""
    _check_folder(root, key)
    layout = " and ".join(f"{split}/<song>/<stem>.wav" for split in splits)
    problems = []
    for split in splits:
        if not (root / split).is_dir():
            hint = (f" (e.g. move some songs of {root / splits[0]} into {root / split})"
                    if split != splits[0] and (root / splits[0]).is_dir() else "")
            problems.append(f"{key}={root} has no {split}/ subfolder: {key} must hold "
                            f"{layout}{hint}")
    if problems:
        raise DatasetError(problems, context=key)


def _valid_kwargs(dset) -> dict:
    """Validation examples are whole tracks when `full_cv`, training-sized segments otherwise."""
    return {} if dset.full_cv else {"segment": dset.segment, "shift": dset.shift}


def get_wav_datasets(dset) -> tp.Tuple[Wavset, Wavset]:
    """Train and valid `Wavset`s for the folders `<dset.wav>/train` and `<dset.wav>/valid`.

    Validation items start with the mixture: `[mixture] + sources`.
    """
    wav_root = Path(dset.wav)
    _check_subfolders(wav_root, "dset.wav", ["train", "valid"])
    roots = {"train": wav_root / "train", "valid": wav_root / "valid"}
    cache_file = Path(dset.metadata) / f"wav_{_hash_path(dset.wav)}.json"
    metadata = cached_metadata(cache_file, roots, list(dset.sources), dset.normalize)
    if not metadata["train"]:
        raise DatasetError([f"{roots['train']}: no track folder found"], context="dset.wav")
    if not metadata["valid"]:
        logger.warning("%s holds no track: this dataset adds nothing to validation", roots["valid"])
    common = {"samplerate": dset.samplerate, "channels": dset.channels,
              "normalize": dset.normalize}
    train_set = Wavset(roots["train"], metadata["train"], list(dset.sources),
                       segment=dset.segment, shift=dset.shift, **common)
    valid_set = Wavset(roots["valid"], metadata["valid"], [MIXTURE] + list(dset.sources),
                       **common, **_valid_kwargs(dset))
    return train_set, valid_set


def musdb_valid_tracks() -> tp.List[str]:
    """Names of the 14 MusDB training tracks that the musdb package reserves for validation."""
    import musdb
    config = Path(musdb.__file__).parent / "configs" / "mus.yaml"
    with open(config) as file:
        return list(yaml.safe_load(file)["validation_tracks"])


_get_musdb_valid = musdb_valid_tracks  # Demucs 4.1's name


def _count_hints(root: Path, count: int) -> str:
    """The ways forward when `dset.valid_tracks` asks for as many songs as `root` holds."""
    songs = "the song" if count == 1 else "these songs"
    return (f"add songs to {root}, or validate on {songs} while also training on "
            f"{'it' if count == 1 else 'them'} with dset.train_valid=true (the valid scores then "
            "measure how well the model fits its own training data), or train without "
            "validation with dset.valid_tracks=0 (the last epoch's state is kept as the best)")


def choose_valid_tracks(names: tp.Sequence[str], choice: tp.Any, root: Path,
                        train_valid: bool = False) -> tp.Set[str]:
    """The songs of the MusDB-layout folder `root` (named `names`) kept for validation.

    `choice` is `dset.valid_tracks`: None keeps MusDB's 14 validation songs (those present);
    a number N picks N songs, the same ones on every machine and run (ranked by a hash of their
    names, so adding songs rarely changes the choice); 0 keeps none (no validation from this
    folder); a list names them. Every song may be picked only when `train_valid`
    (`dset.train_valid`: the valid songs are trained on too). Raises `DatasetError` for a count
    that leaves no training song or a name that is not in `root`.
    """
    if choice is None:
        return set(musdb_valid_tracks()) & set(names)
    if isinstance(choice, bool) or not isinstance(choice, (int, tp.Sequence)) \
            or isinstance(choice, str):
        raise DatasetError([f"dset.valid_tracks={choice!r} must be a number of songs or a list "
                            "of song names"], context=str(root))
    if isinstance(choice, int):
        most = len(names) if train_valid else len(names) - 1
        if choice < 0:
            raise DatasetError([f"dset.valid_tracks={choice} must be a number of songs: 1 to "
                                f"{len(names)} of the songs of {root}, or 0 for no "
                                "validation"], context=str(root))
        if choice > most:
            plural = "song" if len(names) == 1 else "songs"
            if train_valid:
                problem = (f"dset.valid_tracks={choice} asks for more songs than the "
                           f"{len(names)} {plural} of {root}: use at most {len(names)}")
            elif choice == len(names):
                problem = (f"dset.valid_tracks={choice} would keep every song of {root} "
                           f"({len(names)} {plural}) for validation and leave none to train "
                           f"on: {_count_hints(root, len(names))}")
            else:
                problem = (f"dset.valid_tracks={choice} asks for more songs than the "
                           f"{len(names)} {plural} of {root}: use at most {most}, or "
                           f"{_count_hints(root, len(names))}")
            raise DatasetError([problem], context=str(root))
        ranked = sorted(names, key=lambda name: hashlib.sha256(name.encode()).hexdigest())
        return set(ranked[:choice])
    missing = [str(name) for name in choice if name not in names]
    if missing:
        raise DatasetError([f"dset.valid_tracks names {name!r}, which is not a song folder of "
                            f"{root}" for name in missing], context=str(root))
    chosen = set(map(str, choice))
    if len(chosen) == len(names) and not train_valid:
        raise DatasetError([f"dset.valid_tracks names every song of {root}, leaving none to "
                            f"train on: {_count_hints(root, len(names))}"], context=str(root))
    return chosen


def get_musdb_wav_datasets(dset) -> tp.Tuple[Wavset, Wavset]:
    """Train and valid `Wavset`s from MusDB HQ at `dset.musdb`.

    Training uses `train/` minus the musdb validation tracks (all of them if `dset.train_valid`);
    validation uses those tracks, as `[mixture] + sources`.
    """
    root = Path(dset.musdb) / "train"
    _check_subfolders(Path(dset.musdb), "dset.musdb", ["train"])
    cache_file = Path(dset.metadata) / f"musdb_{_hash_path(dset.musdb)}.json"
    metadata = cached_metadata(cache_file, {"train": root}, list(dset.sources),
                               dset.normalize)["train"]
    if not metadata:
        raise DatasetError([f"{root} holds no song folder: put each song in a folder of its "
                            f"own, as {root}/<song>/<stem>.wav"], context="dset.musdb")
    choice = dset.get("valid_tracks")
    valid_tracks = choose_valid_tracks(sorted(metadata), choice, root, bool(dset.train_valid))
    train_meta = {name: meta for name, meta in metadata.items()
                  if dset.train_valid or name not in valid_tracks}
    valid_meta = {name: meta for name, meta in metadata.items() if name in valid_tracks}
    if valid_meta and dset.train_valid and choice is not None:
        logger.warning("Validation tracks of %s: %s; they are trained on too "
                       "(dset.train_valid=true): the valid scores measure how well the model "
                       "fits its training songs, not how it does on new ones", root,
                       ", ".join(sorted(valid_meta)))
    elif valid_meta:
        logger.info("Validation tracks of %s: %s", root, ", ".join(sorted(valid_meta)))
    elif choice == 0:
        logger.info("dset.valid_tracks=0: no song of %s is kept for validation", root)
    else:
        logger.warning("%s holds none of the MusDB validation tracks: the MusDB valid set is "
                       "empty (dset.valid_tracks=N picks N of its songs)", root)
    common = {"samplerate": dset.samplerate, "channels": dset.channels,
              "normalize": dset.normalize}
    train_set = Wavset(root, train_meta, list(dset.sources), segment=dset.segment,
                       shift=dset.shift, **common)
    valid_set = Wavset(root, valid_meta, [MIXTURE] + list(dset.sources),
                       **common, **_valid_kwargs(dset))
    return train_set, valid_set
