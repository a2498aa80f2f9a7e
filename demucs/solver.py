"""The training loop of one XP: epochs of training, validation (raw model and EMAs), periodic tests,
metrics pushed to Dora's history and checkpoints that allow an exact resume.

Reliability (see docs/reliability.md): checkpoints are written to a temporary file, fsynced and
renamed, so a crash or a full disk never loses the previous one; the random generators are saved
with them, so a resumed run continues exactly as if it had not stopped; a non-finite loss or
gradient stops the run before it reaches the weights (or skips the batch with
`optim.skip_nonfinite`); `XPLock` keeps a second run away from an XP folder in use.
"""
from contextlib import contextmanager
import errno
import itertools
import json
import logging
import math
import os
from pathlib import Path
import random
import shutil
import socket
import typing as tp

from dora import get_xp
import numpy as np
from omegaconf import DictConfig, OmegaConf
import torch
from torch.nn import functional as F
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from . import augment, distrib, states, svd
from .apply import apply_model
from .ema import ModelEMA
from .evaluate import evaluate, new_sdr
from .svd import svd_penalty
from .utils import autocast, check_amp, EMA, pull_metric

try:
    import fcntl
except ImportError:  # Windows: the lock falls back to checking the PID
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

CHECKPOINT_KEYS = ("state", "optimizer", "history", "best_state")
TMP_SUFFIX = ".tmp"
LOCK_NAME = "train.lock"


class CheckpointError(RuntimeError):
    """A training checkpoint exists but cannot be used to resume."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. disk full); the previous one is left untouched."""


class NonFiniteLossError(FloatingPointError):
    """A training batch gave a NaN/inf loss or gradient; raised before it changes any weight."""


class XPLockedError(RuntimeError):
    """Another live training run holds the XP folder."""


def _temp_path(path: Path) -> Path:
    return path.parent / f".{path.name}{TMP_SUFFIX}"


def _os_error_in(error: BaseException) -> tp.Optional[OSError]:
    """The first OSError in the chain of `error` (torch wraps write errors in RuntimeError)."""
    seen: tp.Optional[BaseException] = error
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _write_failure(path: Path, error: Exception) -> CheckpointWriteError:
    os_error = _os_error_in(error)
    reason = os_error.strerror if os_error is not None and os_error.strerror else str(error)
    try:
        space = f" ({shutil.disk_usage(path.parent).free / 2 ** 20:.0f} MiB free on that disk)"
    except OSError:
        space = ""
    return CheckpointWriteError(
        os_error.errno if os_error is not None else None,
        f"Could not write {path}: {reason}{space}. The previous "
        f"{path.name} was left untouched and no partial file remains. Free some space, then run "
        "the same command again: training resumes from the last checkpoint.")


@contextmanager
def write_and_rename(path: Path) -> tp.Iterator[Path]:
    """Yield a temporary path next to `path`; once written, it is flushed to disk and renamed over
    `path`, so a crash never leaves a half-written file under the final name.

    A failed write (full disk, I/O error) raises `CheckpointWriteError` and removes the temporary
    file; `path` itself is never touched before the rename.
    """
    tmp = _temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except CheckpointWriteError:
        raise
    except OSError as error:
        raise _write_failure(path, error) from error
    finally:
        if tmp.exists():
            tmp.unlink()


def save_atomic(obj: tp.Any, path: Path) -> None:
    """`torch.save(obj)` to `path` through `write_and_rename`; a failed write (full disk, I/O
    error, which torch's zip writer reports as a RuntimeError) raises `CheckpointWriteError`."""
    with write_and_rename(path) as tmp:
        try:
            with open(tmp, "wb") as handle:
                torch.save(obj, handle)
        except RuntimeError as error:
            raise _write_failure(path, error) from error


def remove_unfinished_writes(folder: Path) -> tp.List[Path]:
    """Delete the temporary files left by a checkpoint write that was killed; returns them."""
    leftovers = sorted(folder.glob(f".*.th{TMP_SUFFIX}"))
    for leftover in leftovers:
        logger.warning("Removing %s, left by a checkpoint write that did not finish", leftover)
        leftover.unlink()
    return leftovers


def get_rng_state() -> dict:
    """States of every random generator training uses (torch, CUDA, Python, NumPy, SVD penalty),
    in types that `torch.load(weights_only=True)` accepts."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
             "svd": svd.penalty_rng.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the generators saved by `get_rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    svd.penalty_rng.setstate(state["svd"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class XPLock:
    """Exclusive hold of an XP folder by one training run, through the file `train.lock` in it.

    The holder keeps an `flock` on the file for its whole life (the kernel drops it when the
    process dies, even on SIGKILL) and writes its PID and host in it. A second run gets
    `XPLockedError` naming them. A lock left by a dead run is taken over with a warning. On file
    systems without `flock`, the PID is checked instead (same host only: a lock from another host
    is then refused, delete the file when that run is known to be over).
    """

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self._handle: tp.Optional[tp.IO[str]] = None

    def acquire(self) -> None:
        """Take the lock, or raise `XPLockedError` when another live run holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            flocked = self._flock(handle)
            owner = self._owner(handle)
            if owner and not flocked and not self._is_stale(owner):
                raise self._locked(owner, "")
        except BaseException:
            handle.close()
            raise
        if owner:
            logger.warning("Taking over %s, left by PID %s on %s, which is no longer running",
                           self.path, owner.get("pid"), owner.get("host"))
        handle.seek(0)
        handle.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname()}, handle)
        handle.flush()
        os.fsync(handle.fileno())
        self._handle = handle

    def release(self) -> None:
        """Empty the lock file and drop the lock (the file stays, so no run can race on it)."""
        if self._handle is None:
            return
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.flush()
        self._handle.close()
        self._handle = None

    def __enter__(self) -> "XPLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def _flock(self, handle: tp.IO[str]) -> bool:
        """True once the flock is held, False when the file system (or OS) has no flock."""
        if fcntl is None:
            return False
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._locked(self._owner(handle), " (it holds the lock right now)") from None
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            logger.info("No flock on the file system of %s, checking the PID instead", self.path)
            return False
        return True

    def _owner(self, handle: tp.IO[str]) -> dict:
        handle.seek(0)
        text = handle.read().strip()
        if not text:
            return {}
        try:
            owner = json.loads(text)
        except ValueError:
            return {"pid": "?", "host": f"? (unreadable lock content {text[:40]!r})"}
        return owner if isinstance(owner, dict) else {}

    @staticmethod
    def _is_stale(owner: dict) -> bool:
        pid = owner.get("pid")
        return (owner.get("host") == socket.gethostname() and isinstance(pid, int)
                and pid != os.getpid() and not _process_alive(pid))

    def _locked(self, owner: dict, detail: str) -> XPLockedError:
        return XPLockedError(
            f"Another training run uses this XP: PID {owner.get('pid', '?')} on host "
            f"{owner.get('host', '?')}{detail}, see {self.path}. Two runs on one XP would "
            "overwrite each other's checkpoint. Wait for it to end or stop it; if you are sure no "
            "such run is alive, delete the lock file and run again.")


def load_checkpoint(path: Path) -> dict:
    """Read a training checkpoint, raising `CheckpointError` with a remedy when it is unusable."""
    try:
        package = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for truncated or corrupt pickles
        raise CheckpointError(
            f"Cannot read the training checkpoint {path} ({type(error).__name__}: {error}). "
            "It is corrupted or truncated. Training was NOT restarted, to keep the XP history. "
            f"Restore it from a copy or a `checkpoint_<epoch>.th` in {path.parent} (rename it to "
            "checkpoint.th), or delete it to train this XP again from scratch.") from error
    if not isinstance(package, dict):
        package = {}
    missing = [key for key in CHECKPOINT_KEYS if key not in package]
    if missing:
        raise CheckpointError(f"Training checkpoint {path} lacks the entries {missing}; it was not "
                              "written by the Demucs solver. Move it away to start from scratch.")
    return package


def _summary(metrics: tp.Dict[str, tp.Any]) -> str:
    return " | ".join(f"{key.capitalize()}={value}" for key, value in metrics.items())


def _format(metrics: tp.Dict[str, tp.Any], formats: tp.Dict[str, str]) -> tp.Dict[str, str]:
    """Keep the metrics named in `formats` (plus `nsdr*`), formatted for the logs."""
    out = {}
    for key, value in metrics.items():
        fmt = formats.get(key, ".3f" if key.startswith("nsdr") else None)
        if fmt is not None and isinstance(value, (int, float)):
            out[key] = format(value, fmt)
    return out


TRAIN_FORMATS = {"loss": ".4f", "reco": ".4f", "grad": ".4f", "ms": ".2f", "penalty": ".4f"}
VALID_FORMATS = {"loss": ".4f", "reco": ".4f", "ms": ".2f", "penalty": ".4f", "best": ".4f",
                 "nsdr": ".3f"}
TEST_FORMATS = {"sdr": ".3f", "sdr_med": ".3f", "nsdr": ".3f"}


def _training_amp(args: DictConfig) -> tp.Optional[str]:
    """The `optim.amp` setting, refused unless None or bf16: float16 training needs loss scaling,
    which this solver does not do."""
    amp = args.optim.get("amp")
    check_amp(amp)
    if amp == "fp16":
        raise ValueError("optim.amp=fp16 is not supported for training (it needs loss scaling); "
                         "use optim.amp=bf16, or leave optim.amp empty for float32")
    return amp


class Solver:
    """Trains `model` with `optimizer` on `loaders['train']`, validates on `loaders['valid']`.

    All state lives in the XP folder given by Dora (`checkpoint.th`, `best.th`, `history.json`);
    creating a Solver on a folder with a checkpoint resumes training exactly where it stopped.
    """

    def __init__(self, loaders: tp.Optional[dict], model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, args: DictConfig):
        self.args = args
        self.loaders = loaders
        self.model = model
        self.optimizer = optimizer
        self.quantizer = states.get_quantizer(self.model, args.quant, self.optimizer)
        self.amp = _training_amp(args)
        if args.misc.get("compile"):
            model.compile()
        self.dmodel = distrib.wrap(model)
        self.device = next(iter(self.model.parameters())).device
        self.emas: tp.Dict[str, tp.List[ModelEMA]] = {"batch": [], "epoch": []}
        for kind in self.emas:
            device = self.device if kind == "batch" else "cpu"
            for decay in args.ema[kind] or []:
                self.emas[kind].append(ModelEMA(self.model, decay, device=device))
        self.augment = self._make_augment()
        xp = get_xp()
        self.folder = Path(xp.folder)
        self.checkpoint_file = self.folder / "checkpoint.th"
        self.best_file = self.folder / "best.th"
        self.link = xp.link
        self.history = self.link.history
        self.best_state: tp.Optional[dict] = None
        self.best_changed = False
        self._reset()

    def _make_augment(self) -> torch.nn.Module:
        args = self.args
        training = self.loaders is not None
        if training and args.dset.segment is not None and args.dset.shift >= args.dset.segment:
            raise ValueError(
                f"dset.shift={args.dset.shift} must be smaller than dset.segment="
                f"{args.dset.segment}: the random shift augmentation cuts training examples to "
                "segment - shift seconds, which would leave nothing to train on.")
        return augment.augmentation_from_config(args)

    # ---------------------------------------------------------------- state
    def _serialize(self, epoch: int) -> None:
        """Write checkpoint.th (every epoch), checkpoint_<N>.th (`save_every`) and best.th."""
        package = {
            "state": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "history": self.history,
            "best_state": self.best_state,
            "args": OmegaConf.to_container(self.args, resolve=True),
            "rng": get_rng_state(),
        }
        for kind, emas in self.emas.items():
            for k, ema in enumerate(emas):
                package[f"ema_{kind}_{k}"] = ema.state_dict()
        if self.best_changed:
            # best.th first: a crash before checkpoint.th is written replays the epoch, which
            # rewrites best.th if needed.
            best = states.serialize_model(self.model, self.args)
            best["state"] = self.best_state
            save_atomic(best, self.best_file)
            self.best_changed = False
        save_atomic(package, self.checkpoint_file)
        every = self.args.save_every
        if every and (epoch + 1) % every == 0 and epoch + 1 != self.args.epochs:
            save_atomic(package, self.folder / f"checkpoint_{epoch + 1}.th")

    def _reset(self) -> None:
        """Resume from this XP's checkpoint, or start from a pretrained model / another XP."""
        args = self.args
        if distrib.rank == 0:
            remove_unfinished_writes(self.folder)
        if self.checkpoint_file.exists():
            logger.info("Loading checkpoint %s", self.checkpoint_file)
            self._resume(load_checkpoint(self.checkpoint_file))
            return
        if args.continue_pretrained:
            self._load_pretrained(args.continue_pretrained, args.pretrained_repo)
        elif args.continue_from:
            self._continue_from(str(args.continue_from))

    def _resume(self, package: dict) -> None:
        self.model.load_state_dict(package["state"])
        self.optimizer.load_state_dict(package["optimizer"])
        self.link.update_history(package["history"])
        self.best_state = package["best_state"]
        for kind, emas in self.emas.items():
            for k, ema in enumerate(emas):
                key = f"ema_{kind}_{k}"
                if key not in package:
                    raise CheckpointError(f"{self.checkpoint_file} has no {key}: it was written "
                                          "with another ema.* configuration.")
                ema.load_state_dict(package[key])
        if "rng" in package:  # absent from checkpoints of upstream Demucs
            set_rng_state(package["rng"])

    def _load_pretrained(self, name: str, repo: tp.Optional[str]) -> None:
        from . import pretrained
        logger.info("Starting from the pretrained model %s", name)
        model = pretrained.get_model(name=name, repo=Path(repo) if repo else None)
        models = getattr(model, "models", [model])
        if len(models) != 1:
            raise ValueError(f"continue_pretrained={name} is a bag of {len(models)} models; "
                             "fine-tuning needs a single model.")
        self.model.load_state_dict(models[0].state_dict())

    def _continue_from(self, sig: str) -> None:
        path = self.folder.parent / sig / "checkpoint.th"
        if not path.exists():
            raise FileNotFoundError(f"continue_from={sig}: no checkpoint at {path}. Train that XP "
                                    "first (or check the signature with `dora info -f SIG`).")
        logger.info("Starting from XP %s (%s state)", sig,
                    "best" if self.args.continue_best else "last")
        package = load_checkpoint(path)
        self.best_state = package["best_state"]
        state = package["best_state"] if self.args.continue_best else package["state"]
        self.model.load_state_dict(state, strict=False)
        if self.args.continue_opt:
            self.optimizer.load_state_dict(package["optimizer"])

    # ---------------------------------------------------------------- loop
    def _replay_history(self) -> None:
        for epoch, metrics in enumerate(self.history):
            logger.info("Train Summary | Epoch %d | %s", epoch + 1,
                        _summary(_format(metrics["train"], TRAIN_FORMATS)))
            logger.info("Valid Summary | Epoch %d | %s", epoch + 1,
                        _summary(_format(metrics["valid"], VALID_FORMATS)))
            if "test" in metrics:
                logger.info("Test Summary | Epoch %d | %s", epoch + 1,
                            _summary(_format(metrics["test"], TEST_FORMATS)))

    def train(self) -> None:
        """Run the remaining epochs (all of them on a fresh XP)."""
        if self.history:
            logger.info("Replaying metrics from the previous run")
            self._replay_history()
        for epoch in range(len(self.history), self.args.epochs):
            metrics = {"train": self._train_epoch(epoch)}
            logger.info("Train Summary | Epoch %d | %s", epoch + 1,
                        _summary(_format(metrics["train"], TRAIN_FORMATS)))
            metrics["valid"], best_candidate = self._validate(epoch)
            logger.info("Valid Summary | Epoch %d | %s", epoch + 1,
                        _summary(_format(metrics["valid"], VALID_FORMATS)))
            key = self.args.test.metric
            if metrics["valid"][key] == metrics["valid"]["best"] or self.args.dset.train_valid:
                logger.info("New best valid %s %.4f", key, metrics["valid"][key])
                self.best_state = best_candidate
                self.best_changed = True
            is_last = epoch == self.args.epochs - 1
            if (epoch + 1) % self.args.test.every == 0 or is_last:
                metrics["test"] = self._test(compute_sdr=bool(self.args.test.sdr) and is_last)
                logger.info("Test Summary | Epoch %d | %s", epoch + 1,
                            _summary(_format(metrics["test"], TEST_FORMATS)))
            self.link.push_metrics(metrics)
            if distrib.rank == 0:
                self._serialize(epoch)
                logger.debug("Checkpoint saved to %s", self.checkpoint_file)

    def _train_epoch(self, epoch: int) -> dict:
        self.model.train()
        return self._run_one_epoch(epoch, train=True)

    def _is_better(self, candidate: float, reference: float) -> bool:
        if self.args.test.metric.startswith("nsdr"):
            return candidate > reference
        return candidate < reference

    def _validate(self, epoch: int) -> tp.Tuple[dict, dict]:
        """Validate the raw model and every EMA; returns the metrics and the best model state."""
        key = self.args.test.metric
        self.model.eval()
        with torch.no_grad():
            main = self._run_one_epoch(epoch, train=False)
            valid: tp.Dict[str, tp.Any] = {"main": main}
            best, best_name = main, "main"
            best_state = states.copy_state(self.model.state_dict())
            for kind, emas in self.emas.items():
                for k, ema in enumerate(emas):
                    name = f"ema_{kind}_{k}"
                    with ema.swap():
                        valid[name] = self._run_one_epoch(epoch, train=False)
                        if self._is_better(valid[name][key], best[key]):
                            best, best_name = valid[name], name
                            best_state = states.copy_state(self.model.state_dict())
        valid.update(best)
        valid["bname"] = best_name
        previous = pull_metric(self.history, f"valid.{key}")
        pick = max if key.startswith("nsdr") else min
        valid["best"] = pick(previous + [valid[key]])
        if self.args.svd.penalty > 0:
            with torch.no_grad():
                valid["penalty"] = float(svd_penalty(self.model, exact=True, **self._svd_kwargs()))
        return valid, best_state

    def _test(self, compute_sdr: bool) -> dict:
        """Evaluate on the test set, with the best state when `test.best`."""
        if self.args.test.best and self.best_state is not None:
            state = self.best_state
        else:
            state = states.copy_state(self.model.state_dict())
        self.model.eval()
        with states.swap_state(self.model, state), torch.no_grad():
            return evaluate(self, compute_sdr=compute_sdr)

    def _svd_kwargs(self) -> dict:
        kwargs = OmegaConf.to_container(self.args.svd, resolve=True)
        assert isinstance(kwargs, dict)
        kwargs.pop("penalty")
        return kwargs

    def _loss(self, estimate: torch.Tensor, sources: torch.Tensor,
              weights: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        """Weighted reconstruction loss and per-source `reco` (l1, or rms error for mse)."""
        dims = tuple(range(2, sources.dim()))
        if self.args.optim.loss == "l1":
            loss = F.l1_loss(estimate, sources, reduction="none").mean(dims).mean(0)
            reco = loss
        elif self.args.optim.loss == "mse":
            loss = F.mse_loss(estimate, sources, reduction="none").mean(dims)
            reco = loss.sqrt().mean(0)
            loss = loss.sum(0)
        else:
            raise ValueError(f"Unknown optim.loss={self.args.optim.loss!r}, expected l1 or mse.")
        return (loss * weights).sum() / weights.sum(), reco

    def _batches(self, epoch: int, train: bool) -> tp.Tuple[tp.Iterable, int]:
        assert self.loaders is not None, "this Solver was built with model_only=True"
        loader = self.loaders["train" if train else "valid"]
        if train and isinstance(getattr(loader, "sampler", None), DistributedSampler):
            loader.sampler.set_epoch(epoch)
        total = len(loader)
        if self.args.max_batches:
            total = min(total, self.args.max_batches)
        if self.args.debug and train or self.args.flag == "debug":
            total = min(total, 1)
        return itertools.islice(loader, total), total

    def _run_one_epoch(self, epoch: int, train: bool = True) -> dict:
        """One pass over the train or valid loader; returns the epoch's mean metrics over all
        workers."""
        args = self.args
        batches, total = self._batches(epoch, train)
        label = "Train" if train else "Valid"
        weights = torch.tensor(list(args.weights), dtype=torch.float32, device=self.device)
        averager = EMA()
        averages: tp.Dict[str, float] = {}
        count = skipped = 0
        progress = tqdm(batches, total=total, desc=f"{label} | Epoch {epoch + 1}", unit="batch",
                        disable=distrib.rank != 0, leave=False, dynamic_ncols=True)
        for batch, sources in enumerate(progress):
            sources = sources.to(self.device)
            if train:
                sources = self.augment(sources)
                mix = sources.sum(dim=1)
            else:
                mix, sources = sources[:, 0], sources[:, 1:]
            if not train and args.valid_apply:
                estimate = apply_model(self.model, mix, split=args.test.split, overlap=0)
            else:
                with autocast(self.device, self.amp if train else None):
                    estimate = self.dmodel(mix)
                estimate = estimate.float()
            if train and hasattr(self.model, "transform_target"):
                sources = self.model.transform_target(mix, sources)
            if estimate.shape != sources.shape:
                raise RuntimeError(f"Model output {tuple(estimate.shape)} does not match the "
                                   f"targets {tuple(sources.shape)}.")
            losses = self._batch_losses(estimate, sources, weights, train, (epoch, batch))
            if losses is None:
                skipped += 1
                continue
            averages = averager({key: float(value) for key, value in losses.items()})
            count += 1
            progress.set_postfix(loss=f"{averages['loss']:.4f}")
        if count == 0 and skipped:
            raise NonFiniteLossError(
                f"Epoch {epoch + 1}: all {skipped} training batches had a non-finite loss or "
                "gradient and were skipped; nothing was learnt. Lower optim.lr or check the data.")
        if count == 0:
            raise RuntimeError(f"The {label.lower()} loader gave no batch: the dataset is smaller "
                               f"than batch_size={args.batch_size} (drop_last) or empty.")
        if train:
            for ema in self.emas["epoch"]:
                ema.update()
        metrics = distrib.average(averages, count)
        if train and args.optim.skip_nonfinite:
            metrics["skipped"] = skipped  # the same on every worker: skipping is decided jointly
        return metrics

    def _batch_losses(self, estimate: torch.Tensor, sources: torch.Tensor, weights: torch.Tensor,
                      train: bool, where: tp.Tuple[int, int]
                      ) -> tp.Optional[tp.Dict[str, tp.Any]]:
        """Losses of one batch; in training, also backpropagate and take an optimizer step.

        `where` is (epoch, batch index), for error messages. Returns None for a training batch
        skipped because of a non-finite loss (`optim.skip_nonfinite`).
        """
        args = self.args
        loss, reco = self._loss(estimate, sources, weights)
        model_size = self.quantizer.model_size() if self.quantizer is not None else 0.
        if args.quant.diffq:
            loss = loss + args.quant.diffq * model_size
        losses: tp.Dict[str, tp.Any] = {"reco": (reco * weights).sum() / weights.sum(),
                                        "ms": model_size}
        for source, value in zip(self.model.sources, reco):
            losses[f"reco_{source}"] = value
        if not train:
            nsdrs = new_sdr(sources, estimate.detach()).mean(0)
            for source, value in zip(self.model.sources, nsdrs):
                losses[f"nsdr_{source}"] = value
            losses["nsdr"] = (nsdrs * weights).sum() / weights.sum()
        if train and args.svd.penalty > 0:
            penalty = svd_penalty(self.model, **self._svd_kwargs())
            losses["penalty"] = penalty
            loss = loss + args.svd.penalty * penalty
        losses["loss"] = loss
        if train:
            grad = self._step(loss, where)
            if grad is None:
                return None
            losses["grad"] = grad
        return {key: value.detach() if torch.is_tensor(value) else value
                for key, value in losses.items()}

    def _step(self, loss: torch.Tensor, where: tp.Tuple[int, int]) -> tp.Optional[float]:
        """Backward, gradient norm (and clipping), optimizer step and batch EMAs.

        A non-finite loss or gradient norm stops here, before the step and the EMA updates:
        `NonFiniteLossError`, or None (batch skipped) with `optim.skip_nonfinite`.
        """
        value = float(loss.detach())
        if not self._finite_everywhere(value):
            return self._non_finite(f"the loss is {value}", where)
        loss.backward()
        grads = [p.grad.detach() for p in self.model.parameters() if p.grad is not None]
        grad_norm = float(torch.stack([g.norm() for g in grads]).norm()) if grads else 0.
        if not self._finite_everywhere(grad_norm):
            return self._non_finite(f"the gradient norm is {grad_norm}", where)
        if self.args.optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.optim.clip_grad)
        if self.args.flag == "uns":
            for name, param in self.model.named_parameters():
                if param.grad is None:
                    logger.info("No gradient for %s", name)
        self.optimizer.step()
        self.optimizer.zero_grad()
        for ema in self.emas["batch"]:
            ema.update()
        return grad_norm

    @staticmethod
    def _finite_everywhere(value: float) -> bool:
        """True when `value` is finite on every worker (all of them must skip or stop together,
        or the next gradient all-reduce would wait forever)."""
        return distrib.average([float(math.isfinite(value))])[0] == 1.

    def _non_finite(self, what: str, where: tp.Tuple[int, int]) -> None:
        """Drop this batch's gradients; stop, or skip the batch with `optim.skip_nonfinite`."""
        epoch, batch = where
        self.optimizer.zero_grad()
        if self.args.optim.skip_nonfinite:
            logger.warning("Epoch %d, batch %d: %s, batch skipped (optim.skip_nonfinite)",
                           epoch + 1, batch + 1, what)
            return None
        raise NonFiniteLossError(
            f"Epoch {epoch + 1}, batch {batch + 1}: {what}. Training stopped before the optimizer "
            f"step: the weights, the EMAs and the last checkpoint ({self.checkpoint_file}) are "
            "untouched. Lower optim.lr, set optim.clip_grad, check the dataset for bad audio, or "
            "set optim.skip_nonfinite=true to skip such batches.")
