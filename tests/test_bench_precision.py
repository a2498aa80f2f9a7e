"""tools.bench_precision on a tiny model: both precisions run, the report says what was measured."""
import json

import torch

from demucs.hdemucs import HDemucs
from demucs.pretrained import SOURCES
from tools import bench_precision


def tiny_hybrid(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return HDemucs(SOURCES, channels=4, depth=4, nfft=256, dconv_lstm=2, segment=1).eval()


def test_bench_precision_reports_both_precisions(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench_precision, "build_model", tiny_hybrid)
    out = tmp_path / "precision.json"
    assert bench_precision.main(["--seconds", "1.5", "--repeat", "2", "--models", "hdemucs",
                                 "--threads", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert len(result["times"]["float32"]) == len(result["times"]["bf16"]) == 2
    assert result["ratio"] == result["bf16_s"] / result["float32_s"]
    assert 0 < result["relative_l2"] < 0.1  # bf16 differs from float32, but not by much
    assert report["machine"]["cpu_isa"] in {"AMX", "AVX512_BF16", "AVX512", "AVX2", "older"}
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("CPU ")
    assert printed[-1].startswith("hdemucs")
