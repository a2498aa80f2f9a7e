"""Training entry point (`dora run`, `dora grid`): turns the config into the objects of a training
run (model, optimizer, loaders, quantizer, augmentation, EMAs) and the Solver's settings.

This module and `training_data` (datasets and loaders) are the only ones that read the training
config to build things: the Solver gets the objects (`TrainingParts`) and the scalar settings
(`TrainingSettings`) it needs. The config has been checked by then (`config_check`, run by Dora's
entry point before the XP folder exists; `model_problems` is its check of what only the model
shows, such as a released model that contradicts the config).

The model of an XP (`build_model`) comes from the config, or, with `continue_pretrained`, from
the released model's own class, arguments and weights (`warm_start`, `finetune`), then gets its
low-rank adapters (`lora.*`) and its frozen parameters (`optim.freeze`).

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

from . import distrib
from .allocator import tune_malloc
from .augment import augmentation_from_config
from .checkpoint import CheckpointError, holds_saved_state, XPLockedError
from .config_check import checked_hydra_main, continued_signature
from .demucs import Demucs
from .ema import ModelEMA
from .finetune import architecture_conflicts, freeze_parameters, TRAINING_KEYS
from .hdemucs import HDemucs
from .htdemucs import HTDemucs
from .lora import add_adapters
from .precision import warn_if_bf16_is_emulated
from .repitch import RepitchError, SoundstretchMissingError
from .repo import ModelLoadingError
from .states import get_quantizer
from .training_data import get_loaders, log_missing_test_set
from .utils import INTERRUPT_STATUS, Terminated, check_amp
from .warm_start import pretrained_base, start_from_pretrained
from .wav import DatasetError
from .torch_hdemucs import TorchHDemucsWrapper
# importable from here, as in Demucs 4.1
from .states import capture_init  # noqa: F401
from .repitch import RepitchedWrapper  # noqa: F401
from .training_data import get_datasets  # noqa: F401
from .utils import random_subset  # noqa: F401
from .wav import get_musdb_wav_datasets, get_wav_datasets  # noqa: F401

if tp.TYPE_CHECKING:
    from .solver import Solver, TrainingParts, TrainingSettings

logger = logging.getLogger(__name__)


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


def _model_section(klass: type) -> str:
    """The name of `klass` among the `model=` choices, which is also its config section."""
    for name, model_class in _model_classes().items():
        if model_class is klass:
            return name
    raise ValueError(f"a {klass.__name__} cannot be trained: the models are "
                     f"{', '.join(_model_classes())}")


def pretrained_repo(args: DictConfig) -> tp.Optional[Path]:
    """The folder `pretrained_repo` names, a relative one taken from where `dora run` was
    started (Hydra's original working directory; the current one outside Hydra), not from the
    XP folder the run works in."""
    if not args.pretrained_repo:
        return None
    return Path(hydra.utils.to_absolute_path(str(args.pretrained_repo)))


def _plain(value: tp.Any) -> tp.Any:
    """A config value as Python values (lists, dicts), as a constructor receives it."""
    return OmegaConf.to_object(value) if OmegaConf.is_config(value) else value


def _training_changes(args: DictConfig, base: nn.Module) -> tp.Dict[str, tp.Any]:
    """The constructor arguments of a model fine-tuned from `base` that follow the config
    (`finetune.TRAINING_KEYS`): its segment, as `get_model` sets it, and the training-only
    settings of the checkpoint's config section."""
    section = args[_model_section(type(base))]
    changes = {"segment": args.model_segment or 4 * args.dset.segment}
    for key in sorted(TRAINING_KEYS - {"segment"}):
        if key in section:
            changes[key] = _plain(section[key])
    return changes


def _sources_init(args: DictConfig) -> tp.Dict[str, str]:
    value = args.continue_sources_init
    return {} if value is None else {str(new): str(old) for new, old in value.items()}


def build_model(args: DictConfig, pretrained: tp.Optional[nn.Module] = None) -> nn.Module:
    """The model an XP trains, on CPU.

    With `continue_pretrained`, the released model (`pretrained`, when the caller loaded it)
    gives the class, the constructor arguments and the weights, remapped by name to
    `dset.sources` (new sources start from `continue_sources_init`, else `other`); otherwise
    `get_model(args)`. Then `lora.rank > 0` adds low-rank adapters (everything else frozen) and
    `optim.freeze` freezes the parameters its patterns match; the log gives the trainable count.
    Built the same way to start, resume and export an XP, so its checkpoints always fit.
    """
    if args.continue_pretrained:
        name = str(args.continue_pretrained)
        base = pretrained if pretrained is not None else \
            pretrained_base(name, pretrained_repo(args))
        model = start_from_pretrained(base, name, list(args.dset.sources), _sources_init(args),
                                      _training_changes(args, base))
    else:
        model = get_model(args)
    if args.lora.rank:
        adapted = add_adapters(model, args.lora.rank, args.lora.alpha, list(args.lora.targets))
        logger.info("Low-rank adapters of rank %d on %d weights (%s)", args.lora.rank,
                    len(adapted), ", ".join(args.lora.targets))
    if args.optim.freeze or args.lora.rank:
        report = freeze_parameters(model, list(args.optim.freeze))
        logger.info(report.describe())
        if not report.trainable:
            raise ValueError(f"optim.freeze={list(args.optim.freeze)} leaves no parameter to "
                             "train: freeze fewer parts")
    return model


def _architecture_conflicts(cfg: DictConfig, base_cfg: DictConfig,
                            pretrained: nn.Module) -> tp.List[str]:
    """What the config sets against the released model's architecture: a `model=` of another
    class, keys of its config section set away from their defaults to another value than the
    checkpoint's, and a sample rate or channel count of the data other than the model's."""
    name, klass = cfg.continue_pretrained, type(pretrained)
    section = _model_section(klass)
    problems = []
    if cfg.model != base_cfg.model and cfg.model != section:
        problems.append(f"model={cfg.model}: continue_pretrained={name} is a {klass.__name__} "
                        f"(model={section}); leave model out or set model={section}")
    requested = {key: _plain(value) for key, value in cfg[section].items()
                 if base_cfg[section].get(key) != value}
    requested.update(samplerate=cfg.dset.samplerate, audio_channels=cfg.dset.channels)
    keys = {"samplerate": "dset.samplerate", "audio_channels": "dset.channels"}
    for conflict in architecture_conflicts(klass, pretrained._init_args_kwargs[1], requested):
        key = keys.get(conflict.key, f"{section}.{conflict.key}")
        problems.append(f"{key}={conflict.config!r} contradicts continue_pretrained={name}, "
                        f"whose {conflict.key} is {conflict.checkpoint!r}: leave {key} out "
                        "(the model keeps the checkpoint's architecture)")
    return problems


# Errors of building the model that come from the config (a model that cannot be found or
# loaded, sources, adapters or freeze patterns that do not fit it).
_MODEL_ERRORS = (ValueError, OSError, ModelLoadingError, ImportError)


def model_problems(cfg: DictConfig, base_cfg: DictConfig) -> tp.List[str]:
    """The config problems that only the model shows, for `config_check` (before the XP folder
    exists): a `continue_pretrained` model that cannot be loaded, is a bag or contradicts the
    config (`_architecture_conflicts`), sources it cannot be remapped to, adapters or freeze
    patterns that do not fit it. Builds the model (`build_model`) only when
    `continue_pretrained`, `optim.freeze` or `lora.rank` is set."""
    if not (cfg.continue_pretrained or cfg.optim.freeze or cfg.lora.rank):
        return []
    pretrained = None
    try:
        if cfg.continue_pretrained:
            pretrained = pretrained_base(str(cfg.continue_pretrained), pretrained_repo(cfg))
            conflicts = _architecture_conflicts(cfg, base_cfg, pretrained)
            if conflicts:
                return conflicts
        with torch.random.fork_rng(devices=[]):
            build_model(cfg, pretrained)
    except _MODEL_ERRORS as error:
        message = str(error).splitlines()[0]
        if cfg.continue_pretrained and not message.startswith("continue_pretrained"):
            message = f"continue_pretrained={cfg.continue_pretrained}: {message}"
        return [message]
    return []


def get_optimizer(model: nn.Module, args: DictConfig) -> torch.optim.Optimizer:
    """Adam or AdamW over the trainable parameters of the model (`requires_grad`: frozen ones
    and the weights under low-rank adapters are left out), with one param group per submodule
    that defines `make_optim_group()` (e.g. the transformer's own weight decay / lr) and group 0
    for the rest. A submodule's group left without trainable parameters is dropped."""
    seen: tp.Set[nn.Parameter] = set()
    groups = []
    for name, module in model.named_modules():
        if hasattr(module, "make_optim_group"):
            group = module.make_optim_group()
            params = set(group["params"])
            if not params.isdisjoint(seen):
                raise RuntimeError(f"Parameters of {name} already belong to another optim group.")
            seen |= params
            group["params"] = [param for param in group["params"] if param.requires_grad]
            if group["params"]:
                groups.append(group)
    others = [param for param in model.parameters() if param not in seen and param.requires_grad]
    groups.insert(0, {"params": others})
    optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if args.optim.optim not in optimizers:
        raise ValueError(f"Unknown optim.optim={args.optim.optim!r}, expected adam or adamw.")
    return optimizers[args.optim.optim](
        groups, lr=args.optim.lr, betas=(args.optim.momentum, args.optim.beta2),
        weight_decay=args.optim.weight_decay)


def show_model(args: DictConfig) -> None:
    """Log the model of `args`, its size and receptive field (`misc.show`)."""
    model = build_model(args)
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
    from .evaluate import EvaluationSettings
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
        continue_from=_continue_from(args), continue_best=bool(args.continue_best),
        continue_opt=bool(args.continue_opt), continue_pretrained=args.continue_pretrained,
        pretrained_repo=args.pretrained_repo, log_params_without_grad=args.flag == "uns",
        evaluation=EvaluationSettings.from_config(args),
        tensorboard=bool(args.misc.get("tensorboard", False)),
        wandb_project=args.misc.get("wandb_project") if args.misc.get("wandb") else None)


def _continue_from(args: DictConfig) -> tp.Optional[str]:
    """The signature `continue_from` names. Hydra reads one such as 955717e8 as a number, which
    is matched against the XP folders next to the current XP's (`config_check` refused the
    config before its folder was made when nothing matches)."""
    value = args.continue_from
    if value is None or isinstance(value, str):
        return value or None
    from dora import get_xp
    return continued_signature(value, Path(get_xp().folder))


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
    model = build_model(args)
    device = training_device()
    if device.type == "cuda":
        model.cuda()
    optimizer = get_optimizer(model, args)
    args.batch_size //= distrib.world_size  # divisible: checked with the config (config_check)
    settings = training_settings(args, device)
    loaders = None
    if model_only:  # export, evaluation: no events (they would make an empty TensorBoard run)
        settings = dataclasses.replace(settings, tensorboard=False, wandb_project=None)
    else:
        loaders = get_loaders(args)
        settings = dataclasses.replace(settings, test_set=log_missing_test_set(args))
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
    """Take the XP folder's lock on worker 0 (`XPLock`); every worker raises `XPLockedError`,
    naming the holder's PID and host, when another run has it."""
    from dora import get_xp
    from .checkpoint import XPLock
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
        raise XPLockedError(refusal)
    return lock


def _reported_errors() -> tp.Tuple[tp.Type[BaseException], ...]:
    """Errors whose message says what went wrong and what to do: `main` shows them as one line
    (set HYDRA_FULL_ERROR=1 for the traceback)."""
    from .solver import NonFiniteLossError
    return (DatasetError, CheckpointError, OSError, NonFiniteLossError, RepitchError,
            SoundstretchMissingError, ValueError)


def remove_if_nothing_saved(xp: tp.Any) -> bool:
    """Delete the folder of the Dora XP `xp` after a failed run that saved no state
    (`checkpoint.holds_saved_state`), whatever else it wrote there: logs, TensorBoard or W&B
    events, a history without checkpoint. Kept when it holds the job logs of a scheduler
    (Dora's submitit folder, the only record of a Slurm job's failure) or Dora's code copy
    (`--git_save`). True when removed."""
    folder = Path(xp.folder)
    keep = holds_saved_state(folder) or Path(xp.submitit).exists() or \
        (xp.dora.git_save and Path(xp.code_folder).exists())
    if keep or not folder.is_dir():
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


def _stop(message: str, status: int) -> tp.NoReturn:
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
                 signum: tp.Optional[int] = None) -> tp.Tuple[str, int]:
    """The failure of a run stopped by the signal `signum` (else by the interruption `error`)."""
    terminated = signum == signal.SIGTERM if signum is not None else \
        isinstance(error, Terminated)
    name = "terminated (SIGTERM)" if terminated else "interrupted"
    return (f"{name}; the last saved checkpoint is kept: run the same command to resume.",
            INTERRUPT_STATUS[Terminated if terminated else KeyboardInterrupt])


def _train_xp(args: DictConfig, stops: StopSignals) -> tp.Optional[tp.Tuple[str, int]]:
    """Train the XP under its lock; (message, exit status) of a failure, None on success. After
    a stop signal, any error is reported as the stop. A failure that saved nothing removes the
    XP folder while the lock is still held (`remove_if_nothing_saved`)."""
    from dora import get_xp
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
        if distrib.rank == 0:
            remove_if_nothing_saved(get_xp())
        return (str(error), 1)
    finally:
        if lock is not None:
            lock.release()
    return None


@checked_hydra_main(config_path="../conf", config_name="config", version_base="1.1",
                    model_names=list(_model_classes()), model_check=model_problems)
def main(args: DictConfig) -> None:
    """Train the XP described by `args` (resuming from its checkpoint when there is one).

    A config that cannot work never gets here: `config_check` refused it with status 2 before
    Dora made the XP folder. A failure with a known cause (data, checkpoint, disk) ends with one
    line on stderr and status 1; Ctrl-C with status 130 and SIGTERM with 143, keeping the last
    checkpoint, however many signals follow (`StopSignals`). A run that failed before saving
    any state leaves no XP folder behind (`remove_if_nothing_saved`). `misc.show=true` logs
    the model (`show_model`) and trains nothing.
    """
    tune_malloc()
    _absolutize_paths(args)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    if args.misc.verbose:
        logger.setLevel(logging.DEBUG)
    logger.info("For logs, checkpoints and samples check %s", os.getcwd())
    logger.debug(args)
    if args.misc.show:
        show_model(args)
        return
    stops = StopSignals().install()
    try:
        try:
            failure = _train_xp(args, stops)
        except (KeyboardInterrupt, Terminated) as error:  # outside training (taking the lock)
            failure = _interrupted(error, stops.received)
        except XPLockedError as error:  # another run trains this XP: its folder is left alone
            failure = (str(error), 1)
        if failure is not None:
            _stop(*failure)
    finally:
        stops.restore()  # unless a signal stopped the run: later ones stay ignored


if "_DORA_TEST_PATH" in os.environ:
    main.dora.dir = Path(os.environ["_DORA_TEST_PATH"])


if __name__ == "__main__":
    main()
