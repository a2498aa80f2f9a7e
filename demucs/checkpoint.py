"""Everything a training run keeps on disk besides its history: the checkpoint files and the lock
of the XP folder.

- `XPLock` keeps a second run away from an XP folder in use (`train.lock`).
- `save_atomic` writes a checkpoint through `demucs.files.atomic_write` and fsyncs it, so a
  crash or a full disk never loses the previous one; `remove_unfinished_writes` cleans up after
  a run killed in the middle of a write.
- `load_checkpoint` reads one back, with an error that says what to do when it is unusable.
- `checkpoint_package` / `restore_checkpoint` define what a checkpoint holds, including the
  states of the random generators (`get_rng_state`) and, for fp16 training, the loss scaler
  (`grad_scaler`), so that a resumed run continues exactly as if it had not stopped.
"""
import errno
import json
import logging
import os
from pathlib import Path
import random
import shutil
import socket
import typing as tp

import numpy as np
from omegaconf import DictConfig, OmegaConf
import torch

from . import svd
from .ema import ModelEMA
from .files import atomic_write, remove_stale_partials_in

try:
    import fcntl
except ImportError:  # Windows: the lock falls back to checking the PID
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

CHECKPOINT_KEYS = ("state", "optimizer", "history", "best_state")
LOCK_NAME = "train.lock"
CHECKPOINT_NAME = "checkpoint.th"  # the state a run resumes from, rewritten every epoch
BEST_NAME = "best.th"  # the best state, the one `tools.export` packages
GRAD_SCALER_KEY = "grad_scaler"  # the loss scaler of `optim.amp=fp16` training
EMAs = tp.Dict[str, tp.List[ModelEMA]]


class CheckpointError(RuntimeError):
    """A training checkpoint exists but cannot be used to resume."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. disk full); the previous one is left untouched."""


class XPLockedError(RuntimeError):
    """Another live training run holds the XP folder."""


# ---------------------------------------------------------------- writing
def _os_error_in(error: BaseException) -> tp.Optional[OSError]:
    """The first OSError in the chain of `error` (torch wraps write errors in RuntimeError)."""
    seen: tp.Optional[BaseException] = error
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _write_failure(path: Path, error: Exception) -> CheckpointWriteError:
    """The error telling that `path` could not be written, why, and that nothing was lost."""
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


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries to disk, so that a rename in it survives a power loss."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_atomic(obj: tp.Any, path: tp.Union[str, Path]) -> None:
    """`torch.save(obj)` to `path` through `atomic_write`, flushed to disk before the rename.

    A failed write (full disk, I/O error, which torch's zip writer reports as a RuntimeError)
    raises `CheckpointWriteError`; the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    try:
        with atomic_write(path) as temporary:
            with open(temporary, "wb") as handle:
                torch.save(obj, handle)
                handle.flush()
                os.fsync(handle.fileno())
        _fsync_folder(path.parent)
    except (OSError, RuntimeError) as error:
        raise _write_failure(path, error) from error


def remove_unfinished_writes(folder: tp.Union[str, Path]) -> tp.List[Path]:
    """Delete the temporary files left by a checkpoint write that was killed; returns them."""
    leftovers = remove_stale_partials_in(folder, "*.th")
    for leftover in leftovers:
        logger.warning("Removed %s, left by a checkpoint write that did not finish", leftover)
    return leftovers


def holds_saved_state(folder: Path) -> bool:
    """True when the XP folder holds a state a run saved (`checkpoint.th`, `best.th` or a
    `save_every` copy): without one, a failed run saved nothing worth keeping, whatever else
    (logs, tracker events) it wrote there."""
    return any(any(folder.glob(pattern)) for pattern in ("checkpoint*.th", BEST_NAME))


# ---------------------------------------------------------------- content
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


def _ema_key(kind: str, index: int) -> str:
    return f"ema_{kind}_{index}"


def checkpoint_package(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       history: list, best_state: tp.Optional[dict], args: DictConfig,
                       emas: EMAs, scaler: tp.Optional[torch.amp.GradScaler] = None) -> dict:
    """What `checkpoint.th` holds: the keys of upstream Demucs (`state`, `optimizer`, `history`,
    `best_state`, `args`, `ema_<kind>_<k>`) plus the random generators (`rng`) and, when training
    with a loss scaler (`optim.amp=fp16`), its scale and growth counter (`grad_scaler`)."""
    package = {
        "state": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "history": history,
        "best_state": best_state,
        "args": OmegaConf.to_container(args, resolve=True),
        "rng": get_rng_state(),
    }
    for kind, kind_emas in emas.items():
        for index, ema in enumerate(kind_emas):
            package[_ema_key(kind, index)] = ema.state_dict()
    if scaler is not None:
        package[GRAD_SCALER_KEY] = scaler.state_dict()
    return package


def restore_grad_scaler(package: dict, scaler: tp.Optional[torch.amp.GradScaler],
                        path: Path) -> None:
    """Give `scaler` the state saved in `package` (an XP's own checkpoint, or the one it
    continues from with `continue_opt`); a checkpoint without one (written by float32 or bf16
    training, or by upstream Demucs) leaves it at its initial scale."""
    if scaler is None:
        return
    if GRAD_SCALER_KEY in package:
        scaler.load_state_dict(package[GRAD_SCALER_KEY])
    else:
        logger.info("%s has no %s: the fp16 loss scale starts from %g", path, GRAD_SCALER_KEY,
                    scaler.get_scale())


def restore_checkpoint(package: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       emas: EMAs, path: Path,
                       scaler: tp.Optional[torch.amp.GradScaler] = None) -> None:
    """Load the model, optimizer, EMAs, random generators and loss scaler (when given) of a
    `checkpoint_package` read from `path` (the history and best state are the caller's)."""
    model.load_state_dict(package["state"])
    optimizer.load_state_dict(package["optimizer"])
    for kind, kind_emas in emas.items():
        for index, ema in enumerate(kind_emas):
            key = _ema_key(kind, index)
            if key not in package:
                raise CheckpointError(f"{path} has no {key}: it was written with another ema.* "
                                      "configuration.")
            ema.load_state_dict(package[key])
    restore_grad_scaler(package, scaler, path)
    if "rng" in package:  # absent from checkpoints of upstream Demucs
        set_rng_state(package["rng"])


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


# ---------------------------------------------------------------- lock
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

    def __init__(self, folder: tp.Union[str, Path]):
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
        """The PID and host written in the lock file ({} when it is empty)."""
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
        """True when the owner is a process of this host that no longer runs."""
        pid = owner.get("pid")
        return (owner.get("host") == socket.gethostname() and isinstance(pid, int)
                and pid != os.getpid() and not _process_alive(pid))

    def _locked(self, owner: dict, detail: str) -> XPLockedError:
        return XPLockedError(
            f"Another training run uses this XP: PID {owner.get('pid', '?')} on host "
            f"{owner.get('host', '?')}{detail}, see {self.path}. Two runs on one XP would "
            "overwrite each other's checkpoint. Wait for it to end or stop it; if you are sure no "
            "such run is alive, delete the lock file and run again.")
