"""Tuning of the C allocator for the large, short-lived tensors of Demucs on CPU.

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh `mmap` and
gives it back with `munmap` when it is freed. A Demucs forward pass allocates and frees dozens of
such tensors per segment (a frequency-branch activation of one 7.8 s segment is 33 to 66 MB),
so every one of them is faulted in page by page and zeroed by the kernel again: about 15 % of
the time of a separation and of a training step on CPU (see docs/performance.md).

`tune_malloc` asks glibc to serve large blocks from the heap and to keep freed memory for
reuse (`mallopt(M_MMAP_MAX, 0)` and the largest trim threshold, 2 GB). The process then keeps
its heap (up to 2 GB free on top) instead of shrinking between segments, and fragmentation can
raise the peak a little: 50 forward passes of HTDemucs settle at 1282 MB instead of 1129 MB
(docs/performance.md). Importing `demucs` changes nothing: the entry points that separate or
train call `tune_malloc` (the `demucs` command, `demucs.api.Separator`, `apply_model` on CPU and
the training main), so that a program which merely imports the package keeps its allocator.
Calling it again is harmless. It is skipped:

- outside Linux/glibc;
- when `DEMUCS_TUNE_MALLOC=0` is set;
- when the user already tunes the allocator (`MALLOC_MMAP_MAX_`, `MALLOC_TRIM_THRESHOLD_`,
  `MALLOC_MMAP_THRESHOLD_`, `GLIBC_TUNABLES`) or preloads another one (`LD_PRELOAD`).
"""
import ctypes
import ctypes.util
import logging
import os
import platform

logger = logging.getLogger(__name__)

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# The largest trim threshold mallopt accepts (its argument is an int): free memory on top of the
# heap is only given back above 2 GB.
NEVER_TRIM = 2 ** 31 - 1

USER_ALLOCATOR_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
                           "GLIBC_TUNABLES", "LD_PRELOAD")


def _skip_reason() -> str:
    """Why the allocator must be left alone, or '' when it may be tuned."""
    if os.environ.get("DEMUCS_TUNE_MALLOC", "1") == "0":
        return "DEMUCS_TUNE_MALLOC=0"
    for name in USER_ALLOCATOR_SETTINGS:
        if os.environ.get(name):
            return f"{name} is set"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not Linux with glibc"
    return ""


def tune_malloc() -> bool:
    """Makes glibc reuse freed large blocks instead of unmapping them; True if it was applied."""
    reason = _skip_reason()
    if reason:
        logger.debug("allocator left alone: %s", reason)
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        applied = libc.mallopt(M_MMAP_MAX, 0) == 1
        applied = libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1 and applied
    except (OSError, AttributeError) as error:
        logger.debug("allocator left alone: %s", error)
        return False
    return applied
