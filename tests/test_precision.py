"""bf16 on every CPU: detection of bfloat16 units, the float32 LSTM fallback, the one-line warning.

The AVX2 tests run in a child process with oneDNN and ATen capped to AVX2 (as on an AMD EPYC of the
Zen 2/3 generations or an old Xeon), whatever CPU runs the suite.
"""
import json
import logging
import os
from pathlib import Path
import subprocess
import sys

from hypothesis import given, strategies as st
import pytest
import torch

from demucs import precision
from demucs.demucs import BLSTM

AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
ROOT = Path(__file__).parent.parent


def run_capped_to_avx2(code: str) -> dict:
    """Run `code` (which prints one JSON line last) in a child whose CPU kernels are AVX2's."""
    env = {**os.environ, **AVX2_ENV}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_cpu_flags_reads_the_first_cpu(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\n"
                       "processor\t: 1\nflags\t\t: fpu\n")
    assert precision.cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16"}
    assert precision.cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize("flags, isa, expected", [
    ({"avx2", "fma"}, "default", False),                      # AMD EPYC Zen 2/3
    ({"avx2", "avx512f", "avx512_bf16"}, "default", True),    # AMD EPYC Zen 4
    ({"avx512f", "avx512_bf16", "amx_bf16"}, "DEFAULT", True),  # Intel Sapphire Rapids
    ({"avx512f", "avx512_bf16", "amx_bf16"}, "AVX2", False),  # ... with oneDNN capped
    ({"avx512f", "avx512_bf16", "amx_bf16"}, "AVX512_CORE", False),
    ({"avx512f", "avx512_bf16", "amx_bf16"}, "AVX512_CORE_BF16", True),
    ({"avx512f", "avx512_bf16", "amx_bf16"}, "avx512_core_amx", True),
])
def test_cpu_has_bf16_units(flags, isa, expected):
    assert precision.cpu_has_bf16_units(flags, isa) is expected


def test_cpu_has_bf16_units_reads_the_onednn_cap(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not precision.cpu_has_bf16_units()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert precision.cpu_has_bf16_units()


def test_lstm_probe_leaves_the_random_state_alone():
    precision.cpu_bf16_lstm_works.cache_clear()
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    precision.cpu_bf16_lstm_works()
    assert torch.equal(torch.rand(4), expected)


def test_lstm_needs_float32_only_on_cpu_autocast_without_a_kernel(monkeypatch):
    x = torch.zeros(2)
    assert not precision.lstm_needs_float32(x)
    with torch.autocast("cpu", dtype=torch.float16):
        assert precision.lstm_needs_float32(x)
    monkeypatch.setattr(precision, "cpu_bf16_lstm_works", lambda: False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert precision.lstm_needs_float32(x)
    monkeypatch.setattr(precision, "cpu_bf16_lstm_works", lambda: True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not precision.lstm_needs_float32(x)


@given(amp=st.sampled_from([None, "bf16", "fp16"]), device=st.sampled_from(["cpu", "cuda"]),
       units=st.booleans())
def test_bf16_warning_applies_only_to_emulated_cpu_bf16(amp, device, units):
    original = precision.cpu_has_bf16_units
    precision.cpu_has_bf16_units = lambda: units
    try:
        applies = precision.warn_if_bf16_is_emulated(device, amp, "test option")
    finally:
        precision.cpu_has_bf16_units = original
    assert applies == (amp == "bf16" and device == "cpu" and not units)


def test_bf16_warning_is_one_line_once_per_option(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: False)
    monkeypatch.setattr(precision, "_warned_options", set())
    with caplog.at_level(logging.WARNING, logger="demucs.precision"):
        for _ in range(3):
            precision.warn_if_bf16_is_emulated("cpu", "bf16", "--amp bf16")
        precision.warn_if_bf16_is_emulated("cpu", "bf16", "optim.amp=bf16")
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2
    assert all("\n" not in line for line in lines)
    assert lines[0].startswith("--amp bf16: this CPU has no bfloat16 units")
    assert "float32" in lines[0]


BLSTM_UNDER_AVX2 = """
import json, torch
from demucs import precision
from demucs.demucs import BLSTM
torch.manual_seed(0)
lstm = BLSTM(8, layers=2, skip=True)
x = torch.randn(2, 8, 50)
reference = lstm(x)
with torch.autocast("cpu", dtype=torch.bfloat16):
    mixed = lstm(x)
mixed.float().sum().backward()
error = ((mixed.float() - reference).norm() / reference.norm()).item()
print(json.dumps({"lstm_works": precision.cpu_bf16_lstm_works(), "error": error,
                  "units": precision.cpu_has_bf16_units(),
                  "grads": all(p.grad is not None for p in lstm.parameters())}))
"""


def test_bf16_blstm_trains_on_an_avx2_cpu():
    result = run_capped_to_avx2(BLSTM_UNDER_AVX2)
    assert result["lstm_works"] is False  # oneDNN has no bf16 LSTM below AVX512_BF16
    assert result["units"] is False
    assert result["grads"]
    assert result["error"] < 3e-2


HYBRID_UNDER_AVX2 = """
import json, torch
from demucs.hdemucs import HDemucs
from demucs.utils import autocast
torch.manual_seed(0)
model = HDemucs(["drums", "bass", "other", "vocals"], channels=4, depth=4, nfft=256,
                dconv_lstm=2)  # BLSTMs in the two inner layers
mix = torch.randn(1, 2, 8000)
with torch.no_grad():
    reference = model(mix)
with autocast("cpu", "bf16"):
    mixed = model(mix)
mixed.float().square().mean().backward()
error = ((mixed.float() - reference).norm() / reference.norm()).item()
print(json.dumps({"error": error, "dtype": str(mixed.dtype)}))
"""


def test_bf16_hybrid_model_steps_on_an_avx2_cpu():
    """HDemucs with BLSTMs in its residual branches steps under bf16 autocast."""
    result = run_capped_to_avx2(HYBRID_UNDER_AVX2)
    assert result["error"] < 5e-2


def test_blstm_keeps_bf16_where_the_cpu_has_the_kernel(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_lstm_works", lambda: True)
    calls = []
    lstm = BLSTM(4)

    def recurrence(steps, *args):  # records where it ran; no real bf16 LSTM (none on AVX2)
        calls.append(torch.is_autocast_enabled("cpu"))
        return torch.zeros(*steps.shape[:2], 8), None

    lstm.lstm.forward = recurrence
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        lstm(torch.randn(1, 4, 10))
    monkeypatch.setattr(precision, "cpu_bf16_lstm_works", lambda: False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        lstm(torch.randn(1, 4, 10))
    assert calls == [True, False]


@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "fma"}, "AVX2"),
    ({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"}, "AVX512"),
    ({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"}, "AVX512_BF16"),
    ({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "AMX"),
    ({"sse4_2"}, "older"),
])
def test_cpu_isa(flags, expected):
    assert precision.cpu_isa(flags) == expected
