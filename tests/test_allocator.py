"""Tests of demucs.allocator: when the C allocator is tuned, and that freed large tensors are
then reused without new page faults."""
import os
import platform
import subprocess
import sys

import pytest

from demucs import allocator

GLIBC_LINUX = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Fills and frees a 64 MB tensor, then counts the minor page faults of filling a 48 MB one, which
# fits in the freed block (both are above glibc's largest mmap threshold, 32 MB).
REFAULT_PROBE = """
import resource, sys, torch
import demucs.allocator, demucs.api, demucs.separate, demucs.pretrained
if sys.argv[1] == "tune":
    demucs.allocator.tune_malloc()
first = torch.ones(16 * 2 ** 20)
del first
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
second = torch.ones(12 * 2 ** 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.fixture
def clean_env(monkeypatch):
    for name in allocator.USER_ALLOCATOR_SETTINGS + ("DEMUCS_TUNE_MALLOC",):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("name,value", [("DEMUCS_TUNE_MALLOC", "0"),
                                        ("GLIBC_TUNABLES", "glibc.malloc.mmap_max=4"),
                                        ("MALLOC_MMAP_MAX_", "8"),
                                        ("LD_PRELOAD", "libjemalloc.so.2")])
def test_user_settings_leave_the_allocator_alone(clean_env, name, value):
    clean_env.setenv(name, value)
    assert name in allocator._skip_reason()
    assert allocator.tune_malloc() is False


@pytest.mark.skipif(not GLIBC_LINUX, reason="mallopt tuning only exists with glibc")
def test_tuning_applies_on_glibc(clean_env):
    assert allocator._skip_reason() == ""
    assert allocator.tune_malloc() is True


def _refaults(action: str, **env) -> int:
    clean = {k: v for k, v in os.environ.items() if k not in allocator.USER_ALLOCATOR_SETTINGS}
    res = subprocess.run([sys.executable, "-c", REFAULT_PROBE, action], env={**clean, **env},
                         capture_output=True, text=True, check=True)
    return int(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC_LINUX, reason="mallopt tuning only exists with glibc")
def test_freed_large_tensors_are_reused_without_page_faults():
    pages = 48 * 2 ** 20 // 4096
    untuned = _refaults("tune", DEMUCS_TUNE_MALLOC="0")
    tuned = _refaults("tune")
    assert untuned > pages // 2  # the system allocator maps the 48 MB afresh
    assert tuned < pages // 20  # the tuned heap hands back memory already faulted in


@pytest.mark.skipif(not GLIBC_LINUX, reason="mallopt tuning only exists with glibc")
def test_importing_demucs_leaves_the_allocator_alone():
    """Programs that only import the package (torch.hub users, services) keep their allocator."""
    assert _refaults("import only") > 48 * 2 ** 20 // 4096 // 2
