"""tools.gpu_check: its CPU dry run end to end (every step present, golden parity, toy XPs stopped
and resumed, throughput rows, fp16 training refused off CUDA) and its helpers."""
import json
import math
import os
from pathlib import Path
import subprocess
import sys

import pytest
import torch

from tools import gpu_check
from tools.gpu_check import FAIL, FAILED, PASS, SKIPPED, STEPS

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT.parent / "shared" / "golden"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    """`python -m tools.gpu_check --dry-run --out DIR` run once: its process and its JSON."""
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    proc = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--dry-run", "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert (out / "gpu_check.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"proc": proc, "out": out,
            "report": json.loads((out / "gpu_check.json").read_text())}


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# --------------------------------------------------------------------------- the dry run
def test_dry_run_passes_and_prints_the_table_last(dry_run):
    proc = dry_run["proc"]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == f"JSON: {dry_run['out'] / 'gpu_check.json'}"
    assert lines[-2] == "all steps passed or skipped"
    header = lines.index(next(line for line in lines if line.startswith("step ")))
    assert [line.split()[0] for line in lines[header + 1:-3]] == list(STEPS)
    assert (dry_run["out"] / "gpu_check.txt").read_text().strip().endswith(lines[-2])


def test_dry_run_reports_every_step_and_the_device(dry_run):
    report = dry_run["report"]
    assert list(report["steps"]) == list(STEPS) and report["failed"] == []
    assert report["dry_run"] is True
    facts = report["devices"]
    assert facts["torch"] == torch.__version__ and facts["device"] == "cpu"
    assert set(facts["tf32_defaults"]) == {"cuda.matmul.allow_tf32", "cudnn.allow_tf32",
                                           "float32_matmul_precision"}
    for row in report["steps"].values():
        assert row["status"] in (PASS, SKIPPED) and finite(row["step_s"])


def test_dry_run_golden_cases_pass_on_cpu(dry_run):
    if not gpu_check.golden_cases(GOLDEN):
        pytest.skip(f"no reference vectors at {GOLDEN}")
    golden = dry_run["report"]["steps"]["golden"]
    assert golden["status"] == PASS
    assert [row["case"] for row in golden["cases"]] == [
        case.name for case in gpu_check.golden_cases(GOLDEN)]
    for row in golden["cases"]:
        assert row["status"] == PASS and row["forward"] <= gpu_check.TOLERANCE
        assert row.get("apply", 0.) <= gpu_check.TOLERANCE
        assert "tf32_forward" not in row  # TF32 is a CUDA setting: not run on CPU
    assert "TF32 pass skipped" in golden["summary"]


def test_dry_run_trains_stops_and_resumes_and_refuses_fp16(dry_run):
    xps = {row["xp"]: row for row in dry_run["report"]["steps"]["train"]["xps"]}
    assert list(xps) == ["fp32", "bf16", "fp16"]
    for name in ("fp32", "bf16"):
        row = xps[name]
        assert row["status"] == PASS and row["resumed"] is True, row
        assert row["epochs"] == gpu_check.TRAIN_EPOCHS and len(row["wall_s"]) == 2
        assert finite(row["train_loss"]) and finite(row["valid_loss"])
    fp16 = xps["fp16"]
    assert fp16["status"] == PASS
    assert fp16["refused"].startswith("demucs.train: optim.amp=fp16")


def test_dry_run_throughput_rows(dry_run):
    step = dry_run["report"]["steps"]["throughput"]
    assert step["status"] == PASS and step["seconds_of_audio"] == 3
    rows = {row["variant"]: row for row in step["rows"]}
    assert list(rows) == ["fp32", "bf16", "fp16", "segment_batch=4", "segment_batch=8",
                          "bf16+segment_batch=8", "compile"]
    assert rows["fp16"]["status"] == rows["compile"]["status"] == SKIPPED
    assert "CPU" in rows["compile"]["reason"]
    for row in rows.values():
        if row["status"] != SKIPPED:
            assert row["status"] == PASS, row
            for key in ("seconds", "first_s", "xrt", "peak_mb", "max_abs_diff", "rel_l2"):
                assert finite(row[key]), (row["variant"], key)
    assert rows["fp32"]["max_abs_diff"] == 0
    for name in ("segment_batch=4", "segment_batch=8"):
        assert rows[name]["rel_l2"] < 1e-4  # batching segments changes rounding only
    assert rows["bf16"]["rel_l2"] < 0.1


def test_dry_run_peer_and_torch_hdemucs(dry_run):
    steps = dry_run["report"]["steps"]
    peer = steps["peer"]
    if gpu_check.default_peer_site() is None:
        assert peer["status"] == SKIPPED and "--peer-site" in peer["reason"]
    else:
        assert peer["status"] == PASS and peer["demucs_version"] == "4.1.0"
        assert peer["rel_l2"] < 1e-4  # same weights, same input, both float32 on CPU
        assert finite(peer["seconds"]) and finite(peer["peak_mb"])
    hdemucs = steps["torch_hdemucs"]
    try:
        import torchaudio  # noqa: F401
    except ImportError:
        assert hdemucs["status"] == SKIPPED and "torchaudio" in hdemucs["reason"]
    else:
        assert hdemucs["status"] == PASS


# ------------------------------------------------------------------------------ helpers
def test_format_rows_aligns_columns():
    text = gpu_check.format_rows(["a", "long header"], [["wide cell", "1"], ["x", "22"]])
    assert text.splitlines() == ["a          long header", "wide cell  1", "x          22"]


@pytest.mark.parametrize("value,expected", [
    (None, "-"), (0., "0.00"), (1.2345, "1.23"), (3e-6, "3.0e-06"), (True, "True"), (3, "3")])
def test_number_cells(value, expected):
    assert gpu_check._number(value) == expected


def test_report_lists_failed_steps_last():
    report = {"dry_run": False, "wall_s": 12., "devices": {"gpu": "G", "torch": "t"},
              "steps": {"devices": {"status": PASS, "step_s": 0.1, "summary": "G"},
                        "golden": {"status": FAIL, "step_s": 2., "summary": "5/6 cases"},
                        "peer": {"status": SKIPPED, "step_s": 0., "reason": "no peer"},
                        "train": {"status": FAILED, "step_s": 1., "error": "boom"}}}
    assert gpu_check.failed_steps(report["steps"]) == ["golden", "train"]
    lines = [line for line in gpu_check.format_report(report).splitlines() if line]
    assert lines[-1] == "FAILED: golden, train"
    assert lines[-2].split()[:3] == ["train", "FAILED", "1.0"] and lines[-2].endswith("boom")
    assert "no peer" in lines[-3] and lines[0].startswith("gpu_check: G, torch t")


def test_detail_tables_show_golden_train_and_throughput_rows():
    steps = {"golden": {"cases": [{"case": "c", "status": PASS, "forward": 1e-7}]},
             "train": {"xps": [{"xp": "fp32", "status": PASS, "epochs": 3, "train_loss": 0.5,
                                "valid_loss": 0.25, "wall_s": [1., 2.], "resumed": True}]},
             "throughput": {"rows": [{"variant": "fp32", "status": PASS, "seconds": 2.,
                                      "xrt": 30., "peak_mb": 512., "max_abs_diff": 0.}]}}
    golden, train, throughput = gpu_check.detail_tables(steps)
    assert golden.splitlines()[1].split() == ["c", PASS, "1.0e-07", "-", "-", "-"]
    assert train.splitlines()[1].split() == ["fp32", PASS, "3", "0.5000", "0.2500", "1.0+2.0",
                                             "True"]
    assert throughput.splitlines()[1].split() == ["fp32", PASS, "2.00", "30.0", "512", "0.00"]


def test_run_step_records_a_failure_and_goes_on():
    def broken(ctx):
        raise RuntimeError("no device\nsecond line")
    row = gpu_check.run_step("x", broken, ctx=None)
    assert row["status"] == FAILED and row["error"] == "RuntimeError: no device | second line"
    assert "broken" in row["traceback"] and finite(row["step_s"])


def test_errors_are_relative_and_absolute():
    reference = torch.tensor([3., 4.])
    assert gpu_check.relative_error(torch.tensor([3., 4.5]), reference) == pytest.approx(0.1)
    assert gpu_check.max_abs_diff(torch.tensor([2., 4.5]), reference) == 1.


def test_refusal_line_is_the_one_line_error():
    output = "INFO stuff\ndemucs.train: optim.amp=fp16 trains only on CUDA GPUs\nExecutor: died"
    assert gpu_check.refusal_line(output) == "demucs.train: optim.amp=fp16 trains only on CUDA GPUs"
    assert gpu_check.refusal_line("demucs.train: interrupted; ...") is None


def test_pythonpath_puts_front_first_and_drops_the_checkout(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), "/tmp/site", "", "/tmp/site"]))
    assert gpu_check.pythonpath(tmp_path, drop=[ROOT]) == os.pathsep.join([str(tmp_path),
                                                                           "/tmp/site"])
    assert gpu_check.pythonpath(ROOT).split(os.pathsep) == [str(ROOT), "/tmp/site"]


def test_selected_steps_keep_the_order_and_the_devices():
    assert gpu_check.selected_steps(None) == list(STEPS)
    assert gpu_check.selected_steps("peer, golden") == ["devices", "golden", "peer"]
    with pytest.raises(SystemExit, match="unknown step.*gold"):
        gpu_check.selected_steps("gold")


def test_peer_site_must_hold_the_official_package(tmp_path):
    assert "no --peer-site" in gpu_check.peer_problem(None)
    assert "holds no demucs package" in gpu_check.peer_problem(tmp_path)
    assert "is this checkout" in gpu_check.peer_problem(ROOT)
    (tmp_path / "demucs").mkdir()
    (tmp_path / "demucs" / "htdemucs.py").write_text("")
    assert gpu_check.peer_problem(tmp_path) is None
    env = gpu_check.peer_env(tmp_path)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path)
    assert str(ROOT) not in env["PYTHONPATH"].split(os.pathsep)


def test_golden_cases_are_the_folders_with_vectors(tmp_path):
    assert gpu_check.golden_cases(None) == [] == gpu_check.golden_cases(tmp_path / "missing")
    for name in ("b", "a", "empty"):
        (tmp_path / name).mkdir()
    for name in ("a", "b"):
        (tmp_path / name / "io.pt").write_bytes(b"")
    assert [case.name for case in gpu_check.golden_cases(tmp_path)] == ["a", "b"]


def test_tf32_switch_is_restored():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with gpu_check.tf32(not before[1]):
        assert torch.backends.cudnn.allow_tf32 is (not before[1])
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def _import_solver_with_hook(tmp_path: Path, stop_after: str) -> str:
    (tmp_path / "sitecustomize.py").write_text(gpu_check.STOP_HOOK)
    env = dict(os.environ, PYTHONPATH=gpu_check.pythonpath(tmp_path, ROOT))
    env[gpu_check.STOP_ENV] = stop_after
    code = "from demucs.solver import Solver; print(Solver._run_epoch.__name__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_stop_hook_patches_the_solver_only_when_asked(tmp_path):
    assert _import_solver_with_hook(tmp_path, "2") == "run_then_stop"
    assert _import_solver_with_hook(tmp_path, "") == "_run_epoch"


def test_worker_separates_a_saved_package_with_the_demucs_on_its_path(tmp_path):
    """The child process the peer and compile measurements use, here with this checkout."""
    from demucs.htdemucs import HTDemucs
    kwargs = dict(gpu_check.TINY_HTDEMUCS, sources=["drums", "bass", "other", "vocals"])
    torch.manual_seed(0)
    model = HTDemucs(**kwargs).eval()
    mix = 0.1 * torch.randn(1, 2, 44100 + 100)
    torch.save({"kwargs": kwargs, "state": model.state_dict(), "mix": mix},
               tmp_path / "package.pt")

    class Ctx:
        work, device, repeats = tmp_path, torch.device("cpu"), 1
    env = dict(os.environ, PYTHONPATH=gpu_check.pythonpath(ROOT))
    result, out = gpu_check.run_worker(Ctx, tmp_path / "package.pt", "ours", env, timeout=120)
    assert Path(result["demucs_file"]).resolve().is_relative_to(ROOT)
    assert finite(result["seconds"]) and result["compiled"] is False
    expected, _ = gpu_check.time_separation(model, mix, gpu_check.separation_options(), 1)
    assert out.shape == (1, 4, 2, mix.shape[-1])
    assert gpu_check.relative_error(out, expected) < 1e-6
