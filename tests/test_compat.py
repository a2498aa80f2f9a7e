"""tools.compat (`make test-compat`): its pure parts only, with no venv created and nothing
installed. The plan read from the project's own files, the commands, the subset's node ids, the
JUnit counts, the table and the exit status."""
import ast
from pathlib import Path
import re

import pytest

from tools import compat
from tools.compat import (Combination, CompatError, Result, exit_status, format_table,
                          install_command, make_plan, parse_junit, pinned_version,
                          pytest_command, read_makefile_torch_spec, read_python_floor,
                          read_torch_floor, subset_ids)

ROOT = Path(__file__).resolve().parent.parent


def _setup_call_keywords() -> dict:
    """The keyword arguments of setup() in setup.py, as source text."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "setup")
    return {keyword.arg: ast.unparse(keyword.value) for keyword in call.keywords}


# --------------------------------------------------------------------------- the plan
def test_the_torch_floor_is_the_one_setup_py_installs():
    """setup.py's install_requires is requirements_minimal.txt, whose torch floor the tool
    reads: one place says what the oldest torch is."""
    assert _setup_call_keywords()["install_requires"] == \
        "read_requirements('requirements_minimal.txt')"
    floor = read_torch_floor((ROOT / "requirements_minimal.txt").read_text())
    line = next(line for line in (ROOT / "requirements_minimal.txt").read_text().splitlines()
                if line.startswith("torch"))
    assert floor == compat.full_version(line.split(">=")[1].split("#")[0].strip())
    assert compat.full_version("2.10") == "2.10.0" and compat.full_version("2.6.1") == "2.6.1"


@pytest.mark.parametrize("text, floor", [
    ("numpy\ntorch>=2.6  # safe loading\ntqdm\n", "2.6.0"),
    ("torch >= 2.7.1\n", "2.7.1"),
    ("torch>=2.8,<3\n", "2.8.0"),
    ("# torch>=1.0 in a comment\n-r other.txt\ntorch>=2.9\n", "2.9.0"),
])
def test_read_torch_floor(text, floor):
    assert read_torch_floor(text) == floor


@pytest.mark.parametrize("text", ["torch\n", "torch==2.6.0\n", "numpy\n# torch>=2.6\n"])
def test_a_requirements_file_without_a_floor_is_refused(text):
    with pytest.raises(CompatError, match="no `torch>=X` line"):
        read_torch_floor(text)


def test_python_floor_and_torch_spec_come_from_setup_py_and_the_makefile():
    assert read_python_floor((ROOT / "setup.py").read_text()) == \
        _setup_call_keywords()["python_requires"].strip("'\">=")
    spec = read_makefile_torch_spec((ROOT / "Makefile").read_text())
    assert spec.startswith("torch==")
    assert read_makefile_torch_spec("PY := x\nTORCH_SPEC ?= torch==2.9.1\n") == "torch==2.9.1"
    with pytest.raises(CompatError):
        read_makefile_torch_spec("PY := x\n")


def test_only_pinned_torch_specs_are_accepted():
    assert pinned_version("torch==2.13.0") == "2.13.0"
    assert pinned_version(" torch == 2.5.1+cpu ") == "2.5.1+cpu"
    for spec in ["torch>=2.6", "torch", "numpy==1.26.4"]:
        with pytest.raises(CompatError, match="must pin one version"):
            pinned_version(spec)


def test_plan_is_oldest_then_newest_each_with_both_numpy_series(tmp_path):
    plan = make_plan("2.6.0", "2.13.0", tmp_path, "3.11")
    assert [combination.name for combination in plan] == [
        "torch-2.6.0+numpy-2.x", "torch-2.6.0+numpy-1.26",
        "torch-2.13.0+numpy-2.x", "torch-2.13.0+numpy-1.26"]
    assert [combination.role for combination in plan] == ["oldest"] * 2 + ["newest"] * 2
    # numpy is swapped inside one venv per torch version.
    assert [combination.venv for combination in plan] == \
        [tmp_path / "py3.11-torch-2.6.0"] * 2 + [tmp_path / "py3.11-torch-2.13.0"] * 2
    assert [combination.numpy_requirement for combination in plan] == \
        ["numpy>=2,<3", "numpy==1.26.*"] * 2
    assert plan[1].log_name == "py3.11-torch-2.6.0+numpy-1.26"


def test_plan_of_a_pin_equal_to_the_floor_has_one_torch(tmp_path):
    plan = make_plan("2.6.0", "2.6.0", tmp_path, "3.10")
    assert len(plan) == 2 and {combination.role for combination in plan} == {"oldest"}


# --------------------------------------------------------------------------- the commands
def _combination(numpy_label: str = "1.26") -> Combination:
    requirement = dict(compat.NUMPY_SERIES)[numpy_label]
    return Combination("2.6.0", numpy_label, requirement, Path("/v"), "oldest")


def test_install_command_pins_torch_and_numpy_and_lets_pip_choose_the_rest():
    command = install_command(Path("/v/bin/python"), _combination())
    assert command[:4] == ["/v/bin/python", "-m", "pip", "install"]
    assert "torch==2.6.0" in command and "numpy==1.26.*" in command
    assert command[-2:] == ["-e", ".[dev]"]
    # every other package is chosen afresh for this numpy, whatever the venv held
    assert command[command.index("--upgrade-strategy") + 1] == "eager"


def test_install_command_adds_the_pins_of_its_numpy_series(monkeypatch):
    monkeypatch.setitem(compat.PINS, "1.26", ["somepkg<3"])
    assert "somepkg<3" in install_command(Path("p"), _combination("1.26"))
    assert "somepkg<3" not in install_command(Path("p"), _combination("2.x"))


def test_pytest_command_writes_no_cache_and_runs_the_subset():
    command = pytest_command(Path("/v/bin/python"), Path("/logs/j.xml"))
    assert command[:3] == ["/v/bin/python", "-m", "pytest"]
    assert command[command.index("-p") + 1] == "no:cacheprovider"
    assert "--junitxml=/logs/j.xml" in command
    assert "not slow" in command[command.index("-m", 3) + 1]
    assert command[-len(subset_ids()):] == subset_ids()


def test_subset_covers_each_area_and_names_existing_tests():
    assert set(compat.SUBSET) == {"reference vectors", "CLI separation", "training with resume",
                                  "checkpoint loading", "ONNX export"}
    for node in subset_ids():
        path, _, name = node.partition("::")
        assert (ROOT / path).is_file(), node
        if name:
            function = name.split("[")[0]
            assert re.search(rf"^def {function}\(", (ROOT / path).read_text(), re.MULTILINE), \
                node


# --------------------------------------------------------------------------- results
JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests">
<testsuite name="pytest" errors="1" failures="2" skipped="3" tests="20" time="9.1">
</testsuite></testsuites>"""


def test_parse_junit_counts_errors_as_failures():
    assert parse_junit(JUNIT) == (14, 3, 3)
    assert parse_junit('<testsuite tests="5" failures="0" errors="0" skipped="1"/>') == \
        (4, 0, 1)


def _result(name: str = "1.26", **kwargs) -> Result:
    versions = {"torch": "2.6.0+cu124", "numpy": "1.26.4", "python": "3.11.7"}
    return Result(_combination(name), versions=versions, **kwargs)


def test_table_has_one_row_per_combination_with_installed_versions():
    results = [_result(passed=50, skipped=2, install_s=125.0, test_s=61.0),
               _result("2.x", passed=40, failed=3, test_s=59.9),
               Result(_combination(), error="pip install failed")]
    lines = format_table(results).splitlines()
    assert lines[0].split() == ["combination", "torch", "numpy", "python", "passed", "failed",
                                "skipped", "install", "tests", "result"]
    assert set(lines[1]) == {"-"}
    assert lines[2].split() == ["torch-2.6.0+numpy-1.26", "2.6.0+cu124", "1.26.4", "3.11.7",
                                "50", "0", "2", "2m05s", "1m01s", "ok"]
    assert lines[3].split() == ["torch-2.6.0+numpy-2.x", "2.6.0+cu124", "1.26.4", "3.11.7",
                                "40", "3", "0", "0m00s", "0m59s", "FAIL"]
    assert lines[4].startswith("torch-2.6.0+numpy-1.26") and "?" in lines[4]
    assert lines[4].endswith("FAIL: pip install failed")
    # columns line up
    assert lines[0].index("torch ") == lines[2].index("2.6.0+cu124") == \
        lines[3].index("2.6.0+cu124") == lines[4].index("?")


@pytest.mark.parametrize("results, status", [
    ([], 1),
    ([_result(passed=3)], 0),
    ([_result(passed=3, skipped=4), _result("2.x", passed=1)], 0),
    ([_result(passed=3), _result("2.x", passed=3, failed=1)], 1),
    ([_result(passed=0, skipped=5)], 1),  # nothing ran: the subset was not tested
    ([_result(passed=3, error="pytest exited with status 2")], 1),
])
def test_exit_status(results, status):
    assert exit_status(results) == status
