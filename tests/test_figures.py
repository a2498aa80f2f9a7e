"""tools.figures: the docs' measured numbers are those of a figures file (the real docs, and the
real README doctored, which must fail), the generated table, the figures files' fields, and the
parsing of each measurement's output."""
import json
from pathlib import Path
import re
import subprocess

import pytest

from tools import figures, machine
from tools.figure_citations import doc_problems, docs_problems
from tools.figures import (BY_NAME, MEASUREMENTS, TABLE_BEGIN, TABLE_END, TABLE_FILE,
                           FigureError, Measurement, Skipped, Value, load_all, render_table)


def test_every_measured_number_in_the_docs_is_cited_and_true():
    assert docs_problems() == []


def test_a_doctored_readme_fails():
    """The real README with one cited figure changed (or its marker dropped) is caught."""
    text = (figures.ROOT / "README.md").read_text()
    real = list(load_all().values())
    cited = re.search(r"(-?\d+\.\d+)(\s+dB\s+\[fig:demo\.model_nsdr\])", text)
    assert cited, "README.md cites the demo's nSDR"
    wrong = f"{float(cited.group(1)) + 0.3:.2f}"
    doctored = text.replace(cited.group(0), wrong + cited.group(2))
    assert any("[fig:demo.model_nsdr] is in no figures file" in problem
               for problem in doc_problems(doctored, real))
    unmarked = text.replace(cited.group(0), cited.group(1) + " dB")
    assert any("look measured but cite no figure" in problem
               for problem in doc_problems(unmarked, real))


def test_the_table_is_generated_from_the_figures_files():
    text = TABLE_FILE.read_text()
    table = text.split(TABLE_BEGIN, 1)[1].split(TABLE_END, 1)[0]
    assert table.strip() == render_table(load_all()).strip()


def test_render_table_shows_each_cpu_kind_and_what_was_skipped():
    skipped = {"cpu_kind": "other", "cpu": "Some CPU", "cores": 2, "torch": "2.13.0",
               "figures": {"demo": {"date": "2026-12-06T00:00:00Z", "load_before": [3.2],
                                    "took_s": 30.0, "skipped": "no peer"}}}
    measured = {"cpu_kind": "fake", "figures": {"demo": {
        "date": "2026-12-07T09:00:00Z", "load_before": [0.5], "took_s": 90.0,
        "values": {"model_nsdr": 2.0512}}, "onnx": {
        "date": "2026-12-07T09:02:00Z", "load_before": [1.5], "took_s": 60.0, "error": "failed"}}}
    table = render_table({"fake": measured, "other": skipped})
    row = next(line for line in table.splitlines() if "`demo.model_nsdr`" in line)
    assert row.endswith("| 2.05 dB | skipped |")
    onnx = next(line for line in table.splitlines() if "`onnx.fp32_s`" in line)
    assert onnx.endswith("| failed | not measured |")
    assert "`other`: Some CPU, 2 cores, torch 2.13.0, measured 2026-12-06" in table
    assert "average 0.5-1.5 at the start of each measurement, 2.5 minutes for all" in table


def test_figures_files_say_where_when_and_under_which_load():
    files = load_all()
    assert files, "docs/figures holds at least one figures file"
    for kind, data in files.items():
        assert data["cpu_kind"] == kind
        for field in ["cpu", "cores", "torch", "python", "updated"]:
            assert field in data, (kind, field)
        for name, record in data["figures"].items():
            assert name in BY_NAME
            fields = {"command", "date", "commit", "load_before", "load_after", "took_s"}
            assert fields <= set(record)
            assert ("values" in record) + ("skipped" in record) + ("error" in record) == 1
            assert set(record.get("values", {})) <= set(BY_NAME[name].values)


def test_take_records_values_skips_and_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(figures, "commit", lambda: "abc")

    def skipped(folder: Path) -> dict:
        raise Skipped("no peer here")

    def failed(folder: Path) -> dict:
        raise FigureError("it broke")

    def measured(folder: Path) -> dict:
        assert folder.is_dir() and not any(folder.iterdir())
        return {"seconds": 1.0}

    values = {"seconds": Value("x", "s", 0)}
    outcomes = [figures.take(Measurement("m", "cmd", measure, values), tmp_path)
                for measure in (measured, skipped, failed)]
    assert outcomes[0]["values"] == {"seconds": 1.0} and outcomes[0]["commit"] == "abc"
    assert outcomes[1]["skipped"] == "no peer here" and outcomes[2]["error"] == "it broke"
    assert all(len(outcome["load_before"]) == 3 for outcome in outcomes)


def test_measure_into_keeps_the_other_figures(tmp_path, monkeypatch):
    path = tmp_path / "kind.json"
    path.write_text(json.dumps({"cpu_kind": "kind", "figures": {"onnx": {"kept": 1}}}))
    record = {"values": {"seconds": 3.0}, "took_s": 1, "load_before": [0.1]}
    monkeypatch.setattr(figures, "take", lambda measurement, folder: dict(record))
    tables = []
    monkeypatch.setattr(figures, "write_table", lambda: tables.append(1))
    figures.measure_into(path, ["toy_training"], tmp_path)
    data = json.loads(path.read_text())
    assert data["figures"]["onnx"] == {"kept": 1}
    assert data["figures"]["toy_training"]["values"] == {"seconds": 3.0}
    assert data["cpu"] == machine.cpu_name() and data["torch"] and tables == [1]


def test_only_refuses_an_unknown_measurement(capsys):
    with pytest.raises(SystemExit):
        figures.main(["--only", "demo,nope"])
    assert "no measurement nope" in capsys.readouterr().err


DEMO_OUTPUT = """XP 1a2b3c4d, 8 epochs, in /x
Test nSDR in dB on the 2 toy test songs of /x:
                                  drums     bass    other   vocals     mean
model 1a2b3c4d                     3.00     2.00     1.00     2.20     2.05
equal split (mixture/N)            1.00     1.00     0.50     1.34     0.96
oracle gain (best g x mixture)     4.00     3.00     2.00     3.00     3.00
oracle mask (ideal ratio mask)    12.00    11.00    10.00     9.00    10.50
The trained model BEATS the equal split by 1.09 dB of nSDR.
Demo done in 312 s on AMD EPYC (amd-f25-m17-avx512_bf16, 2 cores usable, load 1.0, 1.0, 1.0).
"""


def test_demo_figures_are_read_from_its_output(tmp_path, monkeypatch):
    monkeypatch.setattr(figures, "run", lambda command, cwd, timeout, **_: DEMO_OUTPUT)
    values = figures.measure_demo(tmp_path)
    assert values == pytest.approx({"seconds": 312, "model_nsdr": 2.05, "equal_split_nsdr": 0.96,
                                    "oracle_gain_nsdr": 3.0, "oracle_mask_nsdr": 10.5,
                                    "margin_nsdr": 1.09})
    monkeypatch.setattr(figures, "run", lambda command, cwd, timeout, **_: "nothing")
    with pytest.raises(FigureError, match="no XP signature"):
        figures.measure_demo(tmp_path)


def test_onnx_and_peer_figures_are_read_from_their_output(tmp_path, monkeypatch):
    onnx = ("pytorch: 9.06 s\nonnxruntime fp32: 14.63 s (1.615 of pytorch), rel. L2 to pytorch "
            "2.40e-05, export 35 s\nonnxruntime int8: 12.42 s (1.371 of pytorch), rel. L2 to "
            "pytorch 2.41e-05, export 40 s\n")
    monkeypatch.setattr(figures, "run", lambda command, cwd, timeout, **_: onnx)
    values = figures.measure_onnx(tmp_path)
    assert values["fp32_ratio"] == 1.615 and values["int8_rel_l2"] == 2.41e-05
    peer = "pair 0: ...\nseparate htdemucs 30s: time ratio ours/official median 0.726, " \
           "peak-memory ratio median 0.910\n"
    monkeypatch.setattr(figures, "run", lambda command, cwd, timeout, **_: peer)
    assert figures.peer_ratios("separate", 3) == {"time_ratio": 0.726, "memory_ratio": 0.91}


def test_peer_figures_are_skipped_without_the_official_venv(tmp_path, monkeypatch):
    monkeypatch.setattr(figures, "PEER_PYTHON", tmp_path / "missing" / "python")
    with pytest.raises(Skipped, match="no official Demucs venv"):
        figures.measure_separation_vs_official(tmp_path)


def test_every_measurement_names_its_values():
    keys = [f"{m.name}.{key}" for m in MEASUREMENTS for key in m.values]
    assert len(keys) == len(set(keys)) and "demo.margin_nsdr" in keys
    assert figures.value_info("onnx.fp32_ratio").decimals == 2


def test_training_parity_is_skipped_when_the_official_venv_cannot_train(tmp_path, monkeypatch):
    peer = tmp_path / "python"
    peer.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'dora'\" >&2\nexit 1\n")
    peer.chmod(0o755)
    monkeypatch.setattr(figures, "PEER_PYTHON", peer)
    with pytest.raises(Skipped, match="cannot train .*No module named 'dora'.*pip install"):
        figures.measure_train_parity(tmp_path)


def test_a_command_over_its_time_is_killed_with_its_children(tmp_path):
    script = "sleep 30 & echo $! > child.pid; wait"
    with pytest.raises(FigureError, match="ran over 1 s"):
        figures.run(["sh", "-c", script], tmp_path, timeout=1)
    child = int((tmp_path / "child.pid").read_text())
    stat = Path(f"/proc/{child}/stat")
    assert not stat.exists() or stat.read_text().split()[2] == "Z"
    assert figures.run(["sh", "-c", "echo out; echo err >&2"], tmp_path, 10) == "out\nerr\n"
    with pytest.raises(FigureError, match="failed with status 3"):
        figures.run(["sh", "-c", "exit 3"], tmp_path, 10)


def test_tuned_interpreter_runs_the_script_with_its_arguments_after_tuning(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text("import json, sys\n"
                      "print(json.dumps([sys.argv, 'demucs.allocator' in sys.modules, "
                      "__name__]))\n")
    launcher = figures.tuned_interpreter(tmp_path)
    result = subprocess.run([str(launcher), str(script), "train", "--seconds", "3"],
                            capture_output=True, text=True, check=True,
                            env=figures.environment(checkout=True))
    argv, tuned, name = json.loads(result.stdout)
    assert argv == [str(script), "train", "--seconds", "3"]
    assert tuned and name == "__main__"
