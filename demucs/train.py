"""Training entry point (`dora run`, `dora grid`): turns the config into the objects of a training
run (model, optimizer, loaders, quantizer, augmentation, EMAs) and the Solver's settings.

This is the only module that reads the training config to build things: the Solver gets the
objects (`TrainingParts`) and the scalar settings (`TrainingSettings`) it needs.

The Hydra configuration lives in `conf/config.yaml`; every experiment (XP) is identified by the
signature Dora computes from its config delta. The solver (and through it the evaluation, musdb and
museval) is imported inside the functions that need it, so that `import demucs.train` (done by
every grid file just to compute signatures) stays fast.
"""
import dataclasses
import logging
import os
from pathlib import Path
import random
import shutil
import signal
import sys
import threading
import typing as tp

import hydra
from hydra.core.global_hydra import GlobalHydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
import torch
from torch import nn
from torch.utils.data import ConcatDataset

from . import distrib
from .allocator import tune_malloc
from .augment import AugmentedExamples, augmentation_from_config, example_augmentations
from .checkpoint import CheckpointError
from .config_check import checked_hydra_main
from .demucs import Demucs
from .ema import ModelEMA
from .hdemucs import HDemucs
from .htdemucs import HTDemucs
from .precision import warn_if_bf16_is_emulated
from .repitch import RepitchedWrapper, RepitchError, SoundstretchMissingError
from .states import capture_init, get_quantizer
from .utils import INTERRUPT_STATUS, Terminated, check_amp, random_subset
from .wav import DatasetError, MIXTURE, check_tracks, get_musdb_wav_datasets, get_wav_datasets

if tp.TYPE_CHECKING:
    from .solver import Solver, TrainingParts, TrainingSettings

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


def _log_missing_test_set(args: DictConfig) -> bool:
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


def training_device() -> torch.device:
    """The device the model trains on: the current CUDA GPU when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def training_amp(optim: DictConfig, device: tp.Union[str, torch.device]) -> tp.Optional[str]:
    """The `optim.amp` setting for training on `device`: None (float32), bf16 anywhere, or fp16
    on CUDA only, where the solver scales the loss with `torch.amp.GradScaler`."""
    amp = optim.get("amp")
    check_amp(amp)
    if amp == "fp16" and torch.device(device).type != "cuda":
        raise ValueError("optim.amp=fp16 trains only on CUDA GPUs (it needs loss scaling with "
                         "torch.amp.GradScaler); use optim.amp=bf16 on CPU, or leave optim.amp "
                         "empty")
    warn_if_bf16_is_emulated(device, amp, "optim.amp=bf16")
    return amp


def make_grad_scaler(amp: tp.Optional[str],
                     device: tp.Union[str, torch.device]) -> tp.Optional[torch.amp.GradScaler]:
    """The loss scaler of float16 training (`amp` "fp16") on `device`, None for float32 / bf16,
    which train without one. `training_amp` decides which devices may train in fp16."""
    check_amp(amp)
    if amp != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def _batch_caps(args: DictConfig) -> tp.Tuple[tp.Optional[int], tp.Optional[int]]:
    """Most train and valid batches per epoch (None: all): `max_batches`, or a single batch with
    `debug` (training only) or `flag=debug` (both)."""
    cap = args.max_batches or None
    one_valid = args.flag == "debug"
    one_train = one_valid or bool(args.debug)
    return (1 if one_train else cap), (1 if one_valid else cap)


def training_settings(args: DictConfig,
                      device: tp.Optional[torch.device] = None) -> "TrainingSettings":
    """The scalar settings of the training loop on `device` (default: `training_device()`),
    checked once (see `TrainingSettings`)."""
    from .solver import TrainingSettings
    device = training_device() if device is None else device
    if args.optim.loss not in ("l1", "mse"):
        raise ValueError(f"Unknown optim.loss={args.optim.loss!r}, expected l1 or mse.")
    svd = OmegaConf.to_container(args.svd, resolve=True)
    assert isinstance(svd, dict)
    svd.pop("penalty")
    max_train_batches, max_valid_batches = _batch_caps(args)
    return TrainingSettings(
        epochs=args.epochs, batch_size=args.batch_size, max_train_batches=max_train_batches,
        max_valid_batches=max_valid_batches, loss=args.optim.loss, weights=tuple(args.weights),
        clip_grad=args.optim.clip_grad, skip_nonfinite=bool(args.optim.skip_nonfinite),
        amp=training_amp(args.optim, device), diffq=args.quant.diffq or 0.,
        svd_penalty=args.svd.penalty, svd=svd, valid_apply=bool(args.valid_apply),
        valid_split=args.test.split, test_every=args.test.every, test_sdr=bool(args.test.sdr),
        test_best=bool(args.test.best), metric=args.test.metric,
        train_valid=bool(args.dset.train_valid), save_every=args.save_every,
        continue_from=args.continue_from, continue_best=bool(args.continue_best),
        continue_opt=bool(args.continue_opt), continue_pretrained=args.continue_pretrained,
        pretrained_repo=args.pretrained_repo, log_params_without_grad=args.flag == "uns",
        tensorboard=bool(args.misc.get("tensorboard", False)),
        wandb_project=args.misc.get("wandb_project") if args.misc.get("wandb") else None)


def _check_shift_fits_segment(args: DictConfig) -> None:
    if args.dset.segment is not None and args.dset.shift >= args.dset.segment:
        raise ValueError(
            f"dset.shift={args.dset.shift} must be smaller than dset.segment="
            f"{args.dset.segment}: the random shift augmentation cuts training examples to "
            "segment - shift seconds, which would leave nothing to train on.")


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


def _loader_size_problems(args: DictConfig, train_size: int, valid_size: int) -> tp.List[str]:
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
    problems = _loader_size_problems(args, len(train_set), len(valid_set))
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


def get_training_parts(model: nn.Module, optimizer: torch.optim.Optimizer,
                       args: DictConfig) -> "TrainingParts":
    """The quantizer (`quant.*`), the compiled (`misc.compile`) and DDP-wrapped model, the EMAs
    (`ema.batch` on the model's device, `ema.epoch` on CPU), the augmentation (`augment.*`) and,
    for `optim.amp=fp16`, the loss scaler (refused off CUDA, see `training_amp`)."""
    from .solver import TrainingParts
    quantizer = get_quantizer(model, args.quant, optimizer)
    if args.misc.get("compile"):
        model.compile()
    parallel_model = distrib.wrap(model)
    device = next(iter(model.parameters())).device
    scaler = make_grad_scaler(training_amp(args.optim, device), device)
    emas = {kind: [ModelEMA(model, decay, device=device if kind == "batch" else "cpu")
                   for decay in args.ema[kind] or []]
            for kind in ["batch", "epoch"]}
    return TrainingParts(model=model, optimizer=optimizer, augment=augmentation_from_config(args),
                         quantizer=quantizer, emas=emas, parallel_model=parallel_model,
                         scaler=scaler)


def get_solver(args: DictConfig, model_only: bool = False) -> "Solver":
    """Build the Solver of the current XP from its config: model, optimizer, training parts,
    settings and (unless `model_only`, e.g. for export) the data loaders."""
    from .solver import Solver
    distrib.init()
    seed_everything(args.seed)
    model = get_model(args)
    if args.misc.show:
        _show_model(model, args)
        sys.exit(0)
    device = training_device()
    if device.type == "cuda":
        model.cuda()
    optimizer = get_optimizer(model, args)
    if args.batch_size % distrib.world_size:
        raise ValueError(f"batch_size={args.batch_size} must be divisible by the number of "
                         f"workers ({distrib.world_size}).")
    args.batch_size //= distrib.world_size
    settings = training_settings(args, device)
    loaders = None
    if model_only:  # export, evaluation: no events (they would make an empty TensorBoard run)
        settings = dataclasses.replace(settings, tensorboard=False, wandb_project=None)
    else:
        _check_shift_fits_segment(args)
        loaders = get_loaders(args)
        settings = dataclasses.replace(settings, test_set=_log_missing_test_set(args))
    return Solver(loaders, get_training_parts(model, optimizer, args), settings, args)


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
    from .checkpoint import XPLock, XPLockedError
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


# Files of an XP folder that a run writes before its first checkpoint: a run that fails before
# writing anything else leaves no folder behind.
_BOOKKEEPING_FILES = frozenset({"train.lock", "train.log", ".argv.json", ".hydra"})


def _reported_errors() -> tp.Tuple[tp.Type[BaseException], ...]:
    """Errors whose message says what went wrong and what to do: `main` shows them as one line
    (set HYDRA_FULL_ERROR=1 for the traceback)."""
    from .solver import NonFiniteLossError
    return (DatasetError, CheckpointError, OSError, NonFiniteLossError, RepitchError,
            SoundstretchMissingError, ValueError)


def _remove_if_untouched(folder: Path) -> None:
    """Delete the XP folder of a run that failed before it saved anything."""
    if folder.is_dir() and {path.name for path in folder.iterdir()} <= _BOOKKEEPING_FILES:
        shutil.rmtree(folder, ignore_errors=True)


def _stop(message: str, status: int, folder: tp.Optional[Path]) -> tp.NoReturn:
    if folder is not None and distrib.rank == 0:
        _remove_if_untouched(folder)
    print(f"demucs.train: {message}", file=sys.stderr)
    raise SystemExit(status)


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM during a training run.

    The first one stops the run: `KeyboardInterrupt` or `Terminated` is raised where the main
    thread is, so that the cleanups run (lock, DataLoader workers, temporary files). Every later
    one is ignored (SIG_IGN, which also holds while Python exits): a second Ctrl-C, or the
    SIGINT that `timeout` or a scheduler sends after its SIGTERM, used to interrupt those
    cleanups and end the run with a traceback (torch's DataLoader shutting its workers down).

    What the stop brings along is not reported as an error: forked DataLoader workers inherit
    the handler and exit at once, quietly (torch gives them their own SIGTERM handler); torch's
    SIGCHLD handler, which would call the workers' end an error, is removed; what Python prints
    as "Exception ignored" is not printed; `_train_xp` reports any error after the signal as the
    stop. A signal that lands in a destructor (torch shuts workers down in `__del__`, where Python
    drops exceptions) is not lost: `raise_if_stopped`, which the Solver calls before each batch,
    raises it again.

    A handler is installed only where the default one is: under submitit (Slurm jobs), SIGTERM
    and SIGUSR2 are its own, for requeueing.
    """

    def __init__(self) -> None:
        self.received: tp.Optional[int] = None
        self._pid = os.getpid()
        self._previous: tp.Dict[int, tp.Any] = {}

    def _handle(self, signum: int, frame: tp.Any) -> None:
        if self.received is not None:
            return
        self.received = signum
        for other in self._previous:  # ignored by the system from now on, also while Python
            signal.signal(other, signal.SIG_IGN)  # exits (it restores handlers, not SIG_IGN)
        if os.getpid() != self._pid:  # a forked DataLoader worker: the main process stops it,
            os._exit(0)  # and a KeyboardInterrupt in its start-up would print a traceback
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sys.unraisablehook = _quiet_unraisable
        self.raise_if_stopped()

    def raise_if_stopped(self) -> None:
        """Raise the interruption of the signal received, if any."""
        if self.received is not None:
            raise Terminated() if self.received == signal.SIGTERM else KeyboardInterrupt()

    def install(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum, default in [(signal.SIGINT, signal.default_int_handler),
                                (signal.SIGTERM, signal.SIG_DFL)]:
            if signal.getsignal(signum) is default:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        """Put the previous handlers back (after a run that no signal stopped: a stopped run
        keeps ignoring signals until it has exited)."""
        if self.received is None:
            for signum, previous in self._previous.items():
                signal.signal(signum, previous)
            self._previous.clear()


def _quiet_unraisable(unraisable: tp.Any) -> None:
    """`sys.unraisablehook` of a run being stopped by a signal (see `StopSignals`)."""


def _interrupted(error: tp.Optional[BaseException],
                 signum: tp.Optional[int] = None) -> tp.Tuple[str, int, bool]:
    """The failure of a run stopped by the signal `signum` (else by the interruption `error`)."""
    terminated = signum == signal.SIGTERM if signum is not None else \
        isinstance(error, Terminated)
    name = "terminated (SIGTERM)" if terminated else "interrupted"
    return (f"{name}; the last saved checkpoint is kept: run the same command to resume.",
            INTERRUPT_STATUS[Terminated if terminated else KeyboardInterrupt], False)


def _train_xp(args: DictConfig, stops: StopSignals) -> tp.Optional[tp.Tuple[str, int, bool]]:
    """Train the XP under its lock; (message, exit status, remove the XP folder if untouched)
    of a failure, None on success. After a stop signal, any error is reported as the stop."""
    lock = _lock_xp()
    try:
        solver = get_solver(args)
        solver.stop_check = stops.raise_if_stopped
        solver.train()
        stops.raise_if_stopped()
        distrib.close()
    except SystemExit:
        raise
    except BaseException as error:
        if stops.received is not None or isinstance(error, (KeyboardInterrupt, Terminated)):
            return _interrupted(error, stops.received)
        if not isinstance(error, _reported_errors()) or \
                os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        return (str(error), 1, True)
    finally:
        if lock is not None:
            lock.release()
    return None


@checked_hydra_main(config_path="../conf", config_name="config", version_base="1.1",
                    model_names=list(_model_classes()))
def main(args: DictConfig) -> None:
    """Train the XP described by `args` (resuming from its checkpoint when there is one).

    A failure with a known cause (data, config values, checkpoint, disk) ends with one line on
    stderr and status 1; Ctrl-C with status 130 and SIGTERM with 143, keeping the last
    checkpoint, however many signals follow (`StopSignals`). A run that failed before saving
    anything leaves no XP folder behind.
    """
    from dora import get_xp
    tune_malloc()
    _absolutize_paths(args)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    if args.misc.verbose:
        logger.setLevel(logging.DEBUG)
    logger.info("For logs, checkpoints and samples check %s", os.getcwd())
    logger.debug(args)
    stops = StopSignals().install()
    try:
        try:
            failure = _train_xp(args, stops)
        except (KeyboardInterrupt, Terminated) as error:  # outside training (taking the lock)
            failure = _interrupted(error, stops.received)
        if failure is not None:
            message, status, clean_up = failure
            _stop(message, status, Path(get_xp().folder) if clean_up else None)
    finally:
        stops.restore()  # unless a signal stopped the run: later ones stay ignored


if "_DORA_TEST_PATH" in os.environ:
    main.dora.dir = Path(os.environ["_DORA_TEST_PATH"])


if __name__ == "__main__":
    main()
