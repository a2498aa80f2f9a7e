"""tools.bench_profile: the per-class table of one separated segment, and the operator classes."""
import json
from pathlib import Path

import pytest
import torch

from demucs.htdemucs import HTDemucs
from tools import bench
from tools.bench_profile import (CLASSES, MODEL_SCOPE, SPEC_SCOPE, format_profile, gemm_peak,
                                 one_segment_mix, op_class, op_flop, run_profile)

SOURCES = ["drums", "bass", "other", "vocals"]


def tiny_model() -> HTDemucs:
    torch.manual_seed(0)
    return HTDemucs(SOURCES, channels=8, depth=3, t_layers=1, t_heads=2, bottom_channels=16,
                    samplerate=8000, segment=0.3)


@pytest.fixture(scope="module")
def profile() -> dict:
    return run_profile(tiny_model(), threads=1, warmup=1)


def test_table_has_every_class_once_and_shares_sum_to_one(profile: dict):
    assert [row["class"] for row in profile["classes"]] == list(CLASSES)
    assert sum(row["share"] for row in profile["classes"]) == pytest.approx(1., abs=1e-6)
    assert sum(row["seconds"] for row in profile["classes"]) == pytest.approx(profile["total_s"])
    assert profile["forwards"] == 1


def test_the_tiny_model_does_arithmetic_where_expected(profile: dict):
    rows = {row["class"]: row for row in profile["classes"]}
    for name in ("convolution", "gemm_attention", "stft_istft"):
        assert rows[name]["seconds"] > 0 and rows[name]["gflop"] > 0, name
    assert rows["layout"]["gflop"] == 0 and rows["overlap_add"]["seconds"] > 0
    model_gflop = sum(row["gflop"] for name, row in rows.items() if name != "overlap_add")
    assert profile["model_gflop"] == pytest.approx(model_gflop, rel=1e-6)
    assert profile["floor_s"] == pytest.approx(profile["model_gflop"] / profile["peak_gflops"])


def test_format_and_json(profile: dict, tmp_path: Path):
    text = format_profile(profile)
    assert text.splitlines()[0].split() == ["class", "ms", "share", "GFLOP", "GFLOP/s", "of",
                                            "peak"]
    assert len(text.splitlines()) == len(CLASSES) + 2 and "floor" in text
    out = tmp_path / "profile.json"
    out.write_text(json.dumps(profile))
    assert json.loads(out.read_text())["classes"][0]["class"] == "convolution"


@pytest.mark.parametrize("name, scope, expected", [
    ("aten::mkldnn_convolution", MODEL_SCOPE, "convolution"),
    ("aten.convolution.default", MODEL_SCOPE, "convolution"),
    ("aten::addmm", MODEL_SCOPE, "gemm_attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", MODEL_SCOPE, "gemm_attention"),
    ("aten::native_group_norm", MODEL_SCOPE, "normalisation"),
    ("aten::glu", MODEL_SCOPE, "elementwise"),
    ("aten::gelu_", MODEL_SCOPE, "elementwise"),
    ("aten.relu_.default", MODEL_SCOPE, "elementwise"),
    ("aten.add_.Tensor", MODEL_SCOPE, "elementwise"),
    ("aten::copy_", MODEL_SCOPE, "layout"),
    ("aten::constant_pad_nd", MODEL_SCOPE, "layout"),
    ("aten::_fft_r2c", MODEL_SCOPE, "stft_istft"),
    ("aten::copy_", SPEC_SCOPE, "stft_istft"),
    ("aten::addcmul_", None, "overlap_add"),
    ("aten::some_new_op", MODEL_SCOPE, "other"),
])
def test_op_class(name: str, scope, expected: str):
    assert op_class(name, scope) == expected


def test_flop_formulas():
    a, b = torch.ones(3, 5), torch.ones(5, 7)
    mm = torch.ops.aten.mm
    assert op_flop("mm", mm, (a, b), {}, a @ b) == 2 * 3 * 5 * 7
    q = torch.ones(1, 2, 4, 8)
    k = torch.ones(1, 2, 6, 8)
    attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    assert op_flop(attention.__name__.split(".")[-1], attention, (q, k, k), {}, None) == \
        4 * 2 * 4 * 6 * 8
    signal = torch.ones(3, 16)
    assert op_flop("_fft_r2c", torch.ops.aten._fft_r2c, (signal, [1], 0, True), {}, None) == \
        int(2.5 * 3 * 16 * 4)
    out = torch.ones(2, 5)
    assert op_flop("gelu", torch.ops.aten.gelu, (out,), {}, out) == 10
    assert op_flop("copy_", torch.ops.aten.copy_, (out, out), {}, out) == 0


def test_one_segment_mix_fits_in_one_stride():
    mix = one_segment_mix(tiny_model())
    assert mix.shape[:2] == (1, 2)
    assert 0 < mix.shape[-1] <= int(0.75 * int(0.3 * 8000))


def test_gemm_peak_is_a_positive_rate():
    assert gemm_peak(threads=1, size=64, repeat=2) > 0


def test_cli_profile_mode_is_wired(monkeypatch, capsys, tmp_path: Path):
    calls = []

    def fake_run_profile(model, threads):
        calls.append(threads)
        return {"stub": True}
    monkeypatch.setattr("tools.bench_profile.run_profile", fake_run_profile)
    monkeypatch.setattr("tools.bench_profile.format_profile", lambda result: "TABLE")
    monkeypatch.setattr(bench, "separation_model", lambda package: torch.nn.Identity())
    out = tmp_path / "p.json"
    assert bench.main(["--profile", "--threads", "1", "--json", str(out)]) == 0
    assert calls == [1] and "TABLE" in capsys.readouterr().out
    assert json.loads(out.read_text()) == {"stub": True}
