"""What this CPU can do in bfloat16, so that `--amp bf16` / `optim.amp=bf16` never crash and never
slow a run down without a word.

bf16 pays on CPUs with bfloat16 units (Intel AMX, AVX512_BF16 on Intel Cooper Lake and AMD Zen 4):
oneDNN runs the convolutions and GEMMs there natively. Elsewhere (AVX2 CPUs, or oneDNN capped with
`ONEDNN_MAX_CPU_ISA`) bf16 is emulated and slower than float32, and oneDNN has no bf16 LSTM at all:
the LSTM then runs in float32 inside the autocast region (`lstm_needs_float32`).
"""
import functools
import logging
import os
from pathlib import Path
import typing as tp

import torch
from torch import nn

logger = logging.getLogger(__name__)

# /proc/cpuinfo flags of the bfloat16 dot-product units oneDNN uses.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# `ONEDNN_MAX_CPU_ISA` values (oneDNN's names, lower case) that still allow those units.
BF16_ONEDNN_ISAS = ("avx512_core_bf16", "avx512_core_fp16", "avx512_core_amx",
                    "avx512_core_amx_fp16", "avx10_1_512", "avx10_1_512_amx",
                    "avx10_1_512_amx_fp16", "avx10_2_512", "avx10_2_512_amx_2", "all", "default")


def cpu_fields(cpuinfo: Path = Path("/proc/cpuinfo")) -> tp.Dict[str, str]:
    """The `key: value` fields of the first CPU in `cpuinfo` (`vendor_id`, `cpu family`,
    `flags`, ...); empty where there is no such file."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return {}
    pairs = (line.split(":", 1) for line in text.split("\n\n")[0].splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> tp.FrozenSet[str]:
    """The feature flags of the first CPU in `cpuinfo` (empty where there is no such file)."""
    return frozenset(cpu_fields(cpuinfo).get("flags", "").split())


# The vector ISA levels oneDNN's kernels differ by, best first, with the flags each needs.
ISA_LEVELS = (("AMX", ("amx_bf16", "amx_tile")),
              ("AVX512_BF16", ("avx512_bf16",)),
              ("AVX512", ("avx512f", "avx512bw", "avx512vl", "avx512dq")),
              ("AVX2", ("avx2", "fma")))


def cpu_isa(flags: tp.Optional[tp.AbstractSet[str]] = None) -> str:
    """The best of `ISA_LEVELS` the CPU reports (`flags`, /proc/cpuinfo by default), "older"
    below AVX2. What a CPU kind is, as far as the floating-point kernels are concerned."""
    flags = cpu_flags() if flags is None else flags
    for name, needed in ISA_LEVELS:
        if all(flag in flags for flag in needed):
            return name
    return "older"


def cpu_has_bf16_units(flags: tp.Optional[tp.AbstractSet[str]] = None,
                       onednn_max_isa: tp.Optional[str] = None) -> bool:
    """Whether oneDNN can compute in bfloat16 natively here: the CPU reports a bf16 unit
    (`flags`, read from /proc/cpuinfo by default) and `ONEDNN_MAX_CPU_ISA` (`onednn_max_isa`,
    read from the environment by default) does not cap oneDNN below it."""
    flags = cpu_flags() if flags is None else flags
    if onednn_max_isa is None:
        onednn_max_isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "default")
    allowed = onednn_max_isa.strip().lower() in BF16_ONEDNN_ISAS
    return allowed and any(flag in flags for flag in BF16_CPU_FLAGS)


@functools.lru_cache(maxsize=None)
def cpu_bf16_lstm_works() -> bool:
    """Whether a bidirectional LSTM runs forward and backward under CPU bf16 autocast here
    (oneDNN has no bf16 LSTM kernel below AVX512_BF16). Probed once, on a 4-unit LSTM built
    without touching torch's global random state."""
    with torch.random.fork_rng(devices=[]):
        lstm = nn.LSTM(4, 4, bidirectional=True)
    steps = torch.zeros(3, 1, 4)
    try:
        with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            lstm(steps)[0].float().sum().backward()
    except RuntimeError as error:
        logger.debug("No bf16 LSTM on this CPU (%s): LSTMs run in float32 under bf16 autocast",
                     str(error).splitlines()[0])
        return False
    return True


def lstm_needs_float32(x: torch.Tensor) -> bool:
    """Whether an LSTM fed `x` must leave the autocast region to run: on the CPU, oneDNN has no
    float16 LSTM, and no bfloat16 one on CPUs without bf16 units."""
    if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return False
    dtype = torch.get_autocast_dtype("cpu")
    if dtype == torch.float16:
        return True
    return dtype == torch.bfloat16 and not cpu_bf16_lstm_works()


_warned_options: tp.Set[str] = set()


def warn_if_bf16_is_emulated(device: tp.Union[str, torch.device], amp: tp.Optional[str],
                             option: str = "amp=bf16") -> bool:
    """Log one warning (once per process and `option`) when `amp` is bf16 on a CPU without
    bfloat16 units, where it is emulated: slower than float32, with a different output. The run
    goes on in bf16, as asked. Returns whether the warning applies."""
    if amp != "bf16" or torch.device(device).type != "cpu" or cpu_has_bf16_units():
        return False
    if option not in _warned_options:
        _warned_options.add(option)
        logger.warning("%s: this CPU has no bfloat16 units (AMX or AVX512_BF16), so bf16 is "
                       "emulated and slower than float32 (about 2x for htdemucs on AVX2, see "
                       "docs/performance.md); leave it out to run in float32.", option)
    return True
