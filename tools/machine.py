"""What machine a figure was measured on: the CPU kind (the name of its figures file), the CPU's
model name and the load average, for `tools.demo`'s last line and `tools.figures`.

A CPU kind is what the floating-point speed of this project depends on: the vendor, the family
and model numbers (one micro-architecture) and the best vector ISA level oneDNN uses
(`demucs.precision.cpu_isa`), e.g. `amd-f25-m17-avx512_bf16` for an AMD EPYC Zen 4.
"""
import os
from pathlib import Path
import platform
import re
import typing as tp

from demucs.precision import cpu_fields, cpu_isa

VENDORS = {"AuthenticAMD": "amd", "GenuineIntel": "intel"}


def cpu_kind(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """`VENDOR-fFAMILY-mMODEL-ISA` of the first CPU in `cpuinfo`, lower case, made of
    `[a-z0-9_-]` only (a file name); `unknown-<machine>` where there is no such file."""
    fields = cpu_fields(cpuinfo)
    if not fields:
        return f"unknown-{platform.machine() or 'cpu'}".lower()
    vendor = fields.get("vendor_id", "unknown")
    flags = frozenset(fields.get("flags", "").split())
    kind = (f"{VENDORS.get(vendor, vendor)}-f{fields.get('cpu family', 'x')}"
            f"-m{fields.get('model', 'x')}-{cpu_isa(flags)}")
    return re.sub(r"[^a-z0-9_-]+", "_", kind.lower())


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (`model name` of `cpuinfo`), or the platform's processor string."""
    name = cpu_fields(cpuinfo).get("model name") or platform.processor() or platform.machine()
    return " ".join(name.split())


def load_average() -> tp.List[float]:
    """The 1, 5 and 15 minute load averages, rounded to 0.01 (figures taken under load say so)."""
    return [round(value, 2) for value in os.getloadavg()]


def describe() -> str:
    """One line naming the machine: CPU model, kind, usable cores and the current load."""
    load = ", ".join(f"{value:.2f}" for value in load_average())
    return (f"{cpu_name()} ({cpu_kind()}, {len(os.sched_getaffinity(0))} cores usable, "
            f"load average {load})")
