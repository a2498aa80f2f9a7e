"""The training data of an XP: datasets (MusDB, `dset.wav` / `dset.wav2` folders, the toy MusDB),
their augmentations, the loaders of each worker, and the checks that find every data problem
before the first batch.

What a run can check without reading the data (types, ranges, batch splits, shift against
segment) is checked earlier, in `config_check`, before the XP folder exists. The problems here
need the tracks themselves; `train.main` removes the XP folder of a run they stop (nothing was
saved).
"""
import logging
from pathlib import Path
import shutil
import typing as tp

from omegaconf import DictConfig, OmegaConf
import torch
from torch.utils.data import ConcatDataset

from . import distrib
from .augment import AugmentedExamples, example_augmentations
from .repitch import RepitchedWrapper
from .utils import random_subset
from .wav import DatasetError, MIXTURE, check_tracks, get_musdb_wav_datasets, get_wav_datasets

logger = logging.getLogger(__name__)


def _is_toy_dataset(args: DictConfig) -> bool:
    """True for `dset=toy` (the generated toy MusDB), whose config has a `dset.toy` section."""
    return args.dset.get("toy") is not None


def _ensure_toy_dataset(args: DictConfig) -> None:
    """Generate the toy MusDB at `dset.musdb` with the `dset.toy` settings when it is missing
    (by worker 0, the others wait)."""
    from .toy_musdb import ensure_toy_musdb
    settings = OmegaConf.to_container(args.dset.toy, resolve=True)
    if not isinstance(settings, dict):
        raise ValueError(f"dset.toy must hold the toy generation settings, got {settings!r}")
    if distrib.rank == 0:
        ensure_toy_musdb(Path(args.dset.musdb), **settings)
    distrib.barrier()


def _check_soundstretch(args: DictConfig) -> None:
    if args.augment.repitch.proba and shutil.which("soundstretch") is None:
        raise RuntimeError(
            f"augment.repitch.proba={args.augment.repitch.proba} needs the `soundstretch` program "
            "(SoundTouch), which is not on PATH. Install it (e.g. `apt-get install soundstretch`) "
            "or disable pitch/tempo augmentation with augment.repitch.proba=0.")


def _wav2_datasets(args: DictConfig):
    """Train and valid sets of the `dset.wav2` folder (read like `dset.wav`)."""
    return get_wav_datasets(OmegaConf.merge(args.dset, {"wav": args.dset.wav2}))


def _collect(problems: tp.List[str], build: tp.Callable, *args) -> tp.Any:
    """`build(*args)`; on a `DatasetError`, None, its problems appended to `problems` (so that the
    problems of every dataset are reported together)."""
    try:
        return build(*args)
    except DatasetError as error:
        problems.extend(error.problems)
        return None


def missing_test_set(args: DictConfig) -> tp.Optional[str]:
    """Why the config has no test set (None when it has one): `dset.musdb`/test is missing or
    holds no song. A `test.nonhq` folder is always taken as given (it is checked apart)."""
    if args.test.nonhq is not None:
        return None
    root = Path(args.dset.musdb) / "test"
    if not root.is_dir():
        return f"{root} does not exist"
    if not any(path.is_dir() for path in root.iterdir()):
        return f"{root} holds no song folder"
    return None


def musdb_test_problems(args: DictConfig) -> tp.List[str]:
    """Problems of the test set that `evaluate` reads at the end of training (headers only, and
    their sample rate against `dset.musdb_samplerate`), so that a broken test track is reported
    before training rather than after it. [] when there is no test set (`missing_test_set`)."""
    if args.test.nonhq is not None:
        if not Path(args.test.nonhq).is_dir():
            return [f"test.nonhq={args.test.nonhq}: folder does not exist; set it to the MusDB "
                    "(non-HQ) folder, or leave test.nonhq empty to test on dset.musdb/test"]
        return []
    if missing_test_set(args) is not None:
        return []
    return check_tracks(Path(args.dset.musdb) / "test", [MIXTURE] + list(args.dset.sources),
                        samplerate=args.dset.musdb_samplerate)


def log_missing_test_set(args: DictConfig) -> bool:
    """Say, once before training, that there is no test set; True when there is one."""
    reason = missing_test_set(args)
    if reason is not None:
        logger.warning(
            "No test set: %s. Training goes on without the test scores; to get them, set "
            "dset.musdb to a folder whose test/ holds songs as test/<song>/<stem>.wav (or score "
            "the exported model with tools.test_pretrained).", reason)
    return reason is None


def _add_wav2(args: DictConfig, train_set, valid_set, extra_train, extra_valid):
    """Append the `dset.wav2` datasets; the main train set is repeated so that wav2 gets the
    fraction `wav2_weight` of the examples."""
    weight = args.dset.get("wav2_weight")
    repeats = 1
    if weight is not None:
        repeats = max(1, round(len(extra_train) / len(train_set) * (1 / weight - 1)))
    train_set = ConcatDataset([train_set] * repeats + [extra_train])
    if args.dset.get("wav2_valid"):
        if weight is not None:
            kept = int(round(weight * len(valid_set) / (1 - weight)))
            extra_valid = random_subset(extra_valid, kept)
        valid_set = ConcatDataset([valid_set, extra_valid])
    return train_set, valid_set


def get_datasets(args: DictConfig, check_test_set: bool = False):
    """Train and valid datasets: MusDB (if `dset.use_musdb`), plus `dset.wav`/`dset.wav2` folders,
    the train set wrapped for pitch/tempo augmentation when `augment.repitch.proba` > 0.

    Every track of every folder is checked first (and the MusDB test set when `check_test_set`):
    all problems are raised together in one `DatasetError`, before any training.
    """
    _check_soundstretch(args)
    if _is_toy_dataset(args):
        _ensure_toy_dataset(args)
    problems: tp.List[str] = []
    musdb = _collect(problems, get_musdb_wav_datasets, args.dset) if args.dset.use_musdb else None
    wav = _collect(problems, get_wav_datasets, args.dset) if args.dset.wav else None
    wav2 = _collect(problems, _wav2_datasets, args) if args.dset.get("wav2") else None
    if check_test_set:
        problems += musdb_test_problems(args)
    if problems:
        raise DatasetError(problems, context="the training data")
    train_set: tp.Any = []
    valid_set: tp.Any = []
    if musdb is not None:
        train_set, valid_set = musdb
    if wav is not None:
        extra_train, extra_valid = wav
        if len(args.dset.sources) <= 4:
            train_set = ConcatDataset([train_set, extra_train])
            valid_set = ConcatDataset([valid_set, extra_valid])
        else:
            train_set, valid_set = extra_train, extra_valid
    if wav2 is not None:
        train_set, valid_set = _add_wav2(args, train_set, valid_set, *wav2)
    if args.dset.valid_samples is not None:
        valid_set = random_subset(valid_set, args.dset.valid_samples)
    if len(train_set) == 0:
        raise ValueError(f"No training data: dset.use_musdb={args.dset.use_musdb} and "
                         f"dset.wav={args.dset.wav}: set dset.wav=FOLDER (with train/ and "
                         "valid/ subfolders) or dset.use_musdb=true with dset.musdb=FOLDER.")
    if args.augment.repitch.proba:
        sources = list(args.dset.sources)
        vocals = [sources.index("vocals")] if "vocals" in sources else []
        if not vocals:
            logger.warning("No vocals source, repitch will not use the speech mode for any source.")
        repitch = OmegaConf.to_container(args.augment.repitch, resolve=True)
        assert isinstance(repitch, dict)
        train_set = RepitchedWrapper(train_set, vocals=vocals, **repitch)
    transforms = example_augmentations(args)
    if transforms:
        train_set = AugmentedExamples(train_set, transforms)
    return train_set, valid_set


def _empty_valid_set_hint(args: DictConfig) -> str:
    if args.dset.use_musdb and not args.dset.wav:
        return (f"dset.musdb={args.dset.musdb} holds none of the 14 MusDB validation tracks "
                "(musdb's list, e.g. 'Actions - One Minute Smile', in its train/ folder). For "
                "your own songs, pick some for validation with dset.valid_tracks=N (or a list "
                "of song names), or train without validation with dset.valid_tracks=0, or put "
                "them in a folder with train/ and valid/ subfolders and train with "
                "dset.wav=FOLDER dset.use_musdb=false")
    return f"add songs to the valid/ subfolder of dset.wav={args.dset.wav}"


def _without_validation(args: DictConfig, valid_size: int) -> bool:
    """True when the run trains without validation: an empty valid set asked for with
    `dset.valid_tracks=0`."""
    return valid_size == 0 and args.dset.get("valid_tracks") == 0 \
        and isinstance(args.dset.get("valid_tracks"), int)


def loader_size_problems(args: DictConfig, train_size: int, valid_size: int) -> tp.List[str]:
    """Why the loaders would give no batch: fewer examples than one batch per worker (drop_last
    drops the rest), or an empty valid set (unless `_without_validation`). `args.batch_size` is
    already per worker here."""
    workers = distrib.world_size
    batch_size = args.batch_size * workers
    where = f" over {workers} workers" if workers > 1 else ""
    more = (" (dset=toy: more songs with dset.toy.tracks=N after deleting "
            f"{args.dset.musdb})") if _is_toy_dataset(args) else ""
    problems = []
    if train_size // workers < args.batch_size:
        problems.append(f"the train set has {train_size} examples{where}, fewer than "
                        f"batch_size={batch_size}: set a smaller batch_size or add songs{more}")
    if _without_validation(args, valid_size):
        pass
    elif valid_size == 0:
        problems.append(f"the valid set is empty: {_empty_valid_set_hint(args)}")
    elif valid_size // workers < (1 if args.dset.full_cv else args.batch_size):
        needed = workers if args.dset.full_cv else batch_size
        problems.append(f"the valid set has {valid_size} examples, fewer than {needed} (one "
                        f"batch for each of the {workers} workers)")
    return problems


def get_loaders(args: DictConfig) -> tp.Dict[str, tp.Optional[torch.utils.data.DataLoader]]:
    """The train loader (shuffled, full batches) and the valid loader (whole tracks one by one
    with `dset.full_cv`; None when training without validation, `dset.valid_tracks=0`), each
    worker reading its own shard."""
    train_set, valid_set = get_datasets(args, check_test_set=True)
    logger.info("train/valid set size: %d %d", len(train_set), len(valid_set))
    problems = loader_size_problems(args, len(train_set), len(valid_set))
    if problems:
        raise DatasetError(problems, context="the training data")
    num_workers = distrib.loader_workers(args.misc.num_workers)
    train_loader = distrib.loader(train_set, batch_size=args.batch_size, shuffle=True,
                                  num_workers=num_workers, drop_last=True)
    if _without_validation(args, len(valid_set)):
        logger.warning("No validation (dset.valid_tracks=0): every epoch's state is kept as the "
                       "best one, and the history has no valid metrics.")
        return {"train": train_loader, "valid": None}
    if args.dset.full_cv:
        valid_loader = distrib.loader(valid_set, batch_size=1, shuffle=False,
                                      num_workers=num_workers)
    else:
        valid_loader = distrib.loader(valid_set, batch_size=args.batch_size, shuffle=False,
                                      num_workers=num_workers, drop_last=True)
    return {"train": train_loader, "valid": valid_loader}
