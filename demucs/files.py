"""Writing files so that a reader never sees half of one.

Every file the project writes for a user or for itself (stems, checkpoints, exported models,
metadata and dataset caches) goes through `atomic_write`: the content is written to a temporary
file beside the destination, then renamed over it in one step. A failure or an interrupt leaves
the previous file (or nothing) in place, never a truncated one.

All temporary files follow one naming convention, `.NAME.XXXXXXXX.partial` in the destination's
folder, so that `remove_stale_partials` can clean up after a process that was killed before it
could do so itself (SIGKILL, power loss).
"""
from contextlib import contextmanager
import errno
import glob
import logging
import os
from pathlib import Path
import secrets
import shutil
import tempfile
import typing as tp

logger = logging.getLogger(__name__)

PathLike = tp.Union[str, os.PathLike]
PARTIAL_SUFFIX = ".partial"


def _current_umask() -> int:
    """The process umask (reading it requires setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode a plain `open(path, "w")` gives a new file: 0666 minus the umask."""
    return 0o666 & ~_current_umask()


def partial_path(path: PathLike) -> Path:
    """A fresh temporary name for `path`, in its folder: `.NAME.XXXXXXXX.partial`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")


@contextmanager
def atomic_write(path: PathLike) -> tp.Iterator[Path]:
    """Yield a temporary path to write `path`'s content to; it becomes `path` on success.

    The temporary file lives in the destination's folder (so the final rename is atomic), gets
    the mode a plain `open()` would give, and is removed if the block raises (KeyboardInterrupt
    included). The folder must exist.

    Example:
        with atomic_write(out / "model.th") as tmp:
            torch.save(package, tmp)
    """
    path = Path(path)
    temporary = partial_path(path)
    try:
        yield temporary
        if not temporary.exists():
            raise FileNotFoundError(f"nothing was written to {temporary} for {path}")
        os.chmod(temporary, default_file_mode())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: PathLike, mode: str = "w", **kwargs: tp.Any) -> tp.Iterator[tp.IO]:
    """`open(path, mode)` through `atomic_write`: the file appears whole, or not at all."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes new files, mode must start with 'w', got {mode!r}")
    with atomic_write(path) as temporary:
        with open(temporary, mode, **kwargs) as file:
            yield file


def remove_stale_partials(path: PathLike) -> int:
    """Delete the temporary files of `path` left by a killed writer; returns how many."""
    path = Path(path)
    return len(remove_stale_partials_in(path.parent, glob.escape(path.name)))


def remove_stale_partials_in(folder: PathLike, pattern: str = "*") -> tp.List[Path]:
    """Delete the temporary files left by killed writers of the files of `folder` whose names
    match the glob `pattern` (e.g. "*.th"); returns them, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(folder.glob(f".{pattern}.*{PARTIAL_SUFFIX}"))
    for path in stale:
        logger.info("Removing %s, left by an interrupted run", path)
        path.unlink(missing_ok=True)
    return stale


# Below this much free space, a write error without an errno (libsndfile's "System error.") is
# reported as a full disk.
_NEARLY_FULL_BYTES = 1 << 20


def nearest_existing(path: PathLike) -> Path:
    """`path` itself when it exists, else its closest existing ancestor."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: PathLike) -> tp.Optional[int]:
    """Free space of the file system holding `path` (or its closest existing ancestor); None
    when it cannot be read."""
    try:
        return shutil.disk_usage(nearest_existing(path)).free
    except OSError:
        return None


def describe_write_error(error: BaseException, path: PathLike) -> str:
    """'PATH: cause (ERRNO NAME)' for a failed write of `path`.

    Errors that lost their errno on the way (libsndfile only says "System error.") are
    diagnosed from the file system: nearly no free space is reported as ENOSPC.
    """
    code = getattr(error, "errno", None)
    if isinstance(code, int) and code in errno.errorcode:
        return f"{path}: {os.strerror(code)} ({errno.errorcode[code]})"
    free = free_bytes(path)
    if free is not None and free < _NEARLY_FULL_BYTES:
        return (f"{path}: {os.strerror(errno.ENOSPC)} (ENOSPC, {free} bytes free; the writer "
                f"said: {error})")
    return f"{path}: {error}"


def describe_spool_error(error: OSError) -> str:
    """`describe_write_error` for a temporary file (a decoded track or a stem being gathered),
    saying where to find space when the temporary folder is full."""
    message = describe_write_error(error, error.filename or tempfile.gettempdir())
    if error.errno == errno.ENOSPC:
        message += "; set TMPDIR to a folder with more free space"
    return message


def unwritable_reason(folder: PathLike) -> tp.Optional[str]:
    """Why files cannot be created in `folder` (which may not exist yet), or None when they
    can. Nothing is left behind: the check creates and removes a temporary folder in the closest
    existing ancestor."""
    ancestor = nearest_existing(folder)
    if not ancestor.is_dir():
        return f"{ancestor} is a file, so the folder {folder} cannot be created there"
    try:
        tempfile.TemporaryDirectory(dir=ancestor, prefix=".demucs-check-").cleanup()
    except OSError as error:
        return f"cannot create files in {folder}: " + describe_write_error(error, ancestor)
    return None


@contextmanager
def created_folders(folder: PathLike) -> tp.Iterator[Path]:
    """Create `folder` and its missing parents; if the block raises, remove again those of them
    that this call created and that are still empty (a failed write leaves no empty folders)."""
    folder = Path(folder)
    target = folder.absolute()
    depth = len(nearest_existing(target).parts)
    missing = [path for path in [target, *target.parents] if len(path.parts) > depth]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        for created in missing:  # deepest first
            try:
                created.rmdir()
            except OSError:
                break
        raise
