"""tools.machine: the CPU kind that names a figures file, from /proc/cpuinfo fields."""
import re

from tools import machine


def test_cpu_kind_names_vendor_family_model_and_isa(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
                    "model name\t: AMD EPYC 9R14 96-Core Processor\n"
                    "flags\t\t: fpu avx2 fma avx512f avx512bw avx512vl avx512dq avx512_bf16\n\n"
                    "processor\t: 1\n")
    assert machine.cpu_kind(info) == "amd-f25-m17-avx512_bf16"
    assert machine.cpu_name(info) == "AMD EPYC 9R14 96-Core Processor"
    info.write_text("vendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n"
                    "flags\t\t: avx2 fma amx_bf16 amx_tile\n")
    assert machine.cpu_kind(info) == "intel-f6-m143-amx"
    assert machine.cpu_kind(tmp_path / "none").startswith("unknown-")
    assert re.fullmatch(r"[a-z0-9_-]+", machine.cpu_kind())
