"""Training entry point (`dora run`, `dora grid`): builds model, optimizer, datasets and the Solver.

The Hydra configuration lives in `conf/config.yaml`; every experiment (XP) is identified by the
signature Dora computes from its config delta. The model, dataset and solver modules are imported
inside the functions that need them, so that `import demucs.train` (done by every grid file just to
compute signatures) stays fast.
"""
import logging
import os
from pathlib import Path
import random
import shutil
import sys
import typing as tp

from dora import hydra_main
import hydra
from hydra.core.global_hydra import GlobalHydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
import torch
from torch import nn
from torch.utils.data import ConcatDataset

from . import distrib
from .states import capture_init
from .utils import random_subset

logger = logging.getLogger(__name__)

TORCHAUDIO_HINT = (
    "model=torch_hdemucs needs torchaudio, which is not installed. Install the torchaudio release "
    "matching your torch ({torch}), e.g. `pip install \"torch=={torch}\" torchaudio`, or pick "
    "model=hdemucs, which is the same architecture implemented in Demucs itself.")


class TorchHDemucsWrapper(nn.Module):
    """Hybrid Demucs as implemented in torchaudio (`torchaudio.models.HDemucs`), kept as child
    `torch_hdemucs` so that checkpoints use torchaudio's parameter names.

    Args:
        samplerate: sample rate the model is trained at (kept as an attribute, like other models).
        segment: training segment length in seconds (attribute only).
        **kwargs: forwarded to `torchaudio.models.HDemucs` (`sources`, `audio_channels`, `channels`,
            `growth`, `nfft`, `depth`, ...).
    """

    @capture_init
    def __init__(self, **kwargs):
        super().__init__()
        try:
            from torchaudio.models import HDemucs as TorchHDemucs
        except ImportError as error:
            version = torch.__version__.split("+")[0]
            raise ImportError(TORCHAUDIO_HINT.format(torch=version)) from error
        self.samplerate = kwargs.pop("samplerate")
        self.segment = kwargs.pop("segment")
        self.sources = kwargs["sources"]
        self.audio_channels = kwargs.get("audio_channels", 2)
        self.torch_hdemucs = TorchHDemucs(**kwargs)

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        """Separate `mix` [B, C, T] into [B, S, C, T]."""
        return self.torch_hdemucs(mix)


def _model_classes() -> tp.Dict[str, type]:
    from .demucs import Demucs
    from .hdemucs import HDemucs
    from .htdemucs import HTDemucs
    return {"demucs": Demucs, "hdemucs": HDemucs, "htdemucs": HTDemucs,
            "torch_hdemucs": TorchHDemucsWrapper}


def get_model(args: DictConfig) -> nn.Module:
    """Instantiate `args.model` with the kwargs of its config section plus the dataset settings.

    The model is built for `args.dset.sources`, `args.dset.channels` audio channels and
    `args.dset.samplerate`; its `segment` is `args.model_segment`, or 4 times the training segment.
    """
    classes = _model_classes()
    if args.model not in classes:
        raise ValueError(f"Unknown model={args.model!r}, expected one of {sorted(classes)}.")
    kwargs = OmegaConf.to_container(args[args.model], resolve=True)
    assert isinstance(kwargs, dict)
    extra = {
        "sources": list(args.dset.sources),
        "audio_channels": args.dset.channels,
        "samplerate": args.dset.samplerate,
        "segment": args.model_segment or 4 * args.dset.segment,
    }
    return classes[args.model](**extra, **kwargs)


def get_optimizer(model: nn.Module, args: DictConfig) -> torch.optim.Optimizer:
    """Adam or AdamW over the model, with one param group per submodule that defines
    `make_optim_group()` (e.g. the transformer's own weight decay / lr) and group 0 for the rest."""
    seen: tp.Set[nn.Parameter] = set()
    groups = []
    for name, module in model.named_modules():
        if hasattr(module, "make_optim_group"):
            group = module.make_optim_group()
            params = set(group["params"])
            if not params.isdisjoint(seen):
                raise RuntimeError(f"Parameters of {name} already belong to another optim group.")
            seen |= params
            groups.append(group)
    others = [param for param in model.parameters() if param not in seen]
    groups.insert(0, {"params": others})
    optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if args.optim.optim not in optimizers:
        raise ValueError(f"Unknown optim.optim={args.optim.optim!r}, expected adam or adamw.")
    return optimizers[args.optim.optim](
        groups, lr=args.optim.lr, betas=(args.optim.momentum, args.optim.beta2),
        weight_decay=args.optim.weight_decay)


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
    from .wav import get_wav_datasets
    return get_wav_datasets(OmegaConf.merge(args.dset, {"wav": args.dset.wav2}))


def _collect(problems: tp.List[str], build: tp.Callable, *args) -> tp.Any:
    """`build(*args)`; on a `DatasetError`, None, its problems appended to `problems` (so that the
    problems of every dataset are reported together)."""
    from .wav import DatasetError
    try:
        return build(*args)
    except DatasetError as error:
        problems.extend(error.problems)
        return None


def musdb_test_problems(args: DictConfig) -> tp.List[str]:
    """Problems of the MusDB test set that `evaluate` reads at the end of training (headers only),
    so that a broken test track is reported before training rather than after it."""
    from .wav import MIXTURE, check_tracks
    if args.test.nonhq is not None:
        return []
    return check_tracks(Path(args.dset.musdb) / "test", [MIXTURE] + list(args.dset.sources))


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
    from .repitch import RepitchedWrapper
    from .wav import DatasetError, get_musdb_wav_datasets, get_wav_datasets
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
        raise ValueError(f"No training data: check dset.musdb={args.dset.musdb} / "
                         f"dset.wav={args.dset.wav}.")
    if args.augment.repitch.proba:
        sources = list(args.dset.sources)
        vocals = [sources.index("vocals")] if "vocals" in sources else []
        if not vocals:
            logger.warning("No vocals source, repitch will not use the speech mode for any source.")
        repitch = OmegaConf.to_container(args.augment.repitch, resolve=True)
        assert isinstance(repitch, dict)
        train_set = RepitchedWrapper(train_set, vocals=vocals, **repitch)
    return train_set, valid_set


def _show_model(model: nn.Module, args: DictConfig) -> None:
    """Log the model, its size and receptive field (`misc.show`)."""
    logger.info("Model:\n%s", model)
    size_mb = sum(p.numel() for p in model.parameters()) * 4 / 2 ** 20
    logger.info("Size: %.1f MB", size_mb)
    if hasattr(model, "valid_length"):
        field = model.valid_length(1)
        logger.info("Field: %.1f ms", field / args.dset.samplerate * 1000)


def seed_everything(seed: int) -> None:
    """Seed torch, Python's `random` (random shifts of `apply_model` in validation and tests) and
    NumPy (transformer position augmentation), so that two runs of one XP give the same history."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def get_solver(args: DictConfig, model_only: bool = False):
    """Build the Solver of the current XP: model, optimizer and (unless `model_only`) loaders."""
    from .solver import Solver
    distrib.init()
    seed_everything(args.seed)
    model = get_model(args)
    if args.misc.show:
        _show_model(model, args)
        sys.exit(0)
    if torch.cuda.is_available():
        model.cuda()
    optimizer = get_optimizer(model, args)
    if args.batch_size % distrib.world_size:
        raise ValueError(f"batch_size={args.batch_size} must be divisible by the number of "
                         f"workers ({distrib.world_size}).")
    args.batch_size //= distrib.world_size
    if model_only:
        return Solver(None, model, optimizer, args)
    train_set, valid_set = get_datasets(args, check_test_set=True)
    logger.info("train/valid set size: %d %d", len(train_set), len(valid_set))
    num_workers = distrib.loader_workers(args.misc.num_workers)
    train_loader = distrib.loader(train_set, batch_size=args.batch_size, shuffle=True,
                                  num_workers=num_workers, drop_last=True)
    if args.dset.full_cv:
        valid_loader = distrib.loader(valid_set, batch_size=1, shuffle=False,
                                      num_workers=num_workers)
    else:
        valid_loader = distrib.loader(valid_set, batch_size=args.batch_size, shuffle=False,
                                      num_workers=num_workers, drop_last=True)
    return Solver({"train": train_loader, "valid": valid_loader}, model, optimizer, args)


def get_solver_from_sig(sig: str, model_only: bool = False):
    """The Solver of the XP with signature `sig` (e.g. for export or evaluation)."""
    instance = GlobalHydra.instance()
    previous = instance.hydra if instance.is_initialized() else None
    instance.clear()
    xp = main.get_xp_from_sig(sig)
    if previous is not None:
        instance.clear()
        instance.initialize(previous)
    with xp.enter():
        return get_solver(xp.cfg, model_only)


def _absolutize_paths(args: DictConfig) -> None:
    for key in ["musdb", "wav", "wav2", "metadata"]:
        value = args.dset.get(key)
        if value is not None:
            args.dset[key] = hydra.utils.to_absolute_path(value)


def _lock_xp():
    """Take the XP folder's lock on worker 0 (`XPLock`); every worker exits with the holder's PID
    and host when another run has it."""
    from dora import get_xp
    from .solver import XPLock, XPLockedError
    distrib.init()
    lock, refusal = None, None
    if distrib.rank == 0:
        lock = XPLock(Path(get_xp().folder))
        try:
            lock.acquire()
        except XPLockedError as error:
            refusal = str(error)
    refusal = distrib.share(refusal)
    if refusal is not None:
        raise SystemExit(f"demucs.train: {refusal}")
    return lock


@hydra_main(config_path="../conf", config_name="config", version_base="1.1")
def main(args: DictConfig) -> None:
    """Train the XP described by `args` (resuming from its checkpoint when there is one)."""
    _absolutize_paths(args)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    if args.misc.verbose:
        logger.setLevel(logging.DEBUG)
    logger.info("For logs, checkpoints and samples check %s", os.getcwd())
    logger.debug(args)
    lock = _lock_xp()
    try:
        get_solver(args).train()
        distrib.close()
    finally:
        if lock is not None:
            lock.release()


if "_DORA_TEST_PATH" in os.environ:
    main.dora.dir = Path(os.environ["_DORA_TEST_PATH"])


if __name__ == "__main__":
    main()
