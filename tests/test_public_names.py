"""Every public name of Demucs 4.1.0 exists here, with parameters its callers may pass by name.

The reference is `tests/data/public_names_4_1_0.json`, listed once from the official 4.1.0 wheel by
`tools/public_names.py` (see its docstring). Names still missing are listed below on purpose, each
group saying why; a name listed there that exists again fails the test, so the list only shrinks.
"""
import importlib
import inspect
import json
from pathlib import Path
import typing as tp

import pytest

from tools.public_names import package_names

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = json.loads((ROOT / "tests" / "data" / "public_names_4_1_0.json").read_text())

EXPECTED_MISSING: tp.Dict[str, tp.List[str]] = {
    # `wav` would import dora through `distrib`, which a separation-only install lacks.
    "demucs.wav": ["distrib"],
    # The training code may not import the name -> model facade: `pretrained.get_model_from_sig`
    # imports the training code (an import circle, issue 27); use `demucs.pretrained` itself.
    "demucs.solver": ["pretrained"],
}

# Callables whose parameters were renamed or regrouped (a caller passing the old names by keyword
# breaks), with why; to close in the modules' own parts.
EXPECTED_SIGNATURE_CHANGES = {
    "demucs.solver.Solver.__init__": "the Solver takes built objects (issue 14 redesign)",
    "demucs.wav.get_wav_datasets": "takes the `dset` section, not `args` and `name`",
    "demucs.wav.get_musdb_wav_datasets": "takes the `dset` section, not `args`",
}


@pytest.fixture(scope="module")
def ours() -> tp.Dict[str, tp.Dict[str, tp.Any]]:
    return package_names(ROOT / "demucs")


def test_every_module_of_4_1_exists(ours):
    assert sorted(set(REFERENCE) - set(ours)) == []


@pytest.mark.parametrize("module", sorted(REFERENCE))
def test_public_names_of_4_1_exist(ours, module: str):
    missing = sorted(name for name in REFERENCE[module] if name not in ours.get(module, {}))
    expected = sorted(EXPECTED_MISSING.get(module, []))
    closed = sorted(set(expected) - set(missing))
    assert not closed, f"{module}: {closed} exist now, remove them from EXPECTED_MISSING"
    assert missing == expected, \
        f"{module} lacks the 4.1.0 names {sorted(set(missing) - set(expected))}"


def _accepts(theirs: tp.List[str], mine: tp.List[str]) -> bool:
    """Whether a function with parameters `mine` takes every call that `theirs` takes by name."""
    if any(name.startswith("**") for name in mine):
        return True
    named = [name for name in theirs if name != "|" and not name.startswith("*")]
    return all(name in mine for name in named)


def _callables(names: tp.Dict[str, tp.Any], module: str) -> tp.Iterator[tp.Tuple[str, list]]:
    for name, entry in names.items():
        if entry["kind"] == "function":
            yield f"{module}.{name}", entry["params"]
        elif entry["kind"] == "class":
            for method, params in entry["methods"].items():
                yield f"{module}.{name}.{method}", params


def _signature(function: tp.Callable) -> tp.List[str]:
    """Parameter names as `tools.public_names` writes them, read from a live callable."""
    names: tp.List[str] = []
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind is parameter.VAR_POSITIONAL:
            names.append("*" + parameter.name)
        elif parameter.kind is parameter.VAR_KEYWORD:
            names.append("**" + parameter.name)
        else:
            if parameter.kind is parameter.KEYWORD_ONLY and not any(
                    name == "|" or name.startswith("*") for name in names):
                names.append("|")
            names.append(parameter.name)
    return names


def _reexported(qualified: str) -> tp.Optional[tp.List[str]]:
    """Parameters of `module.name[.method]`, followed through the module's imports."""
    module_name, _, attribute = qualified.rpartition(".")
    path = [attribute]
    while module_name not in REFERENCE:
        module_name, _, outer = module_name.rpartition(".")
        path.insert(0, outer)
    target: tp.Any = importlib.import_module(module_name)
    for part in path:
        target = getattr(target, part, None)
    return _signature(target) if callable(target) else None


def test_parameters_of_4_1_are_accepted(ours):
    mine = dict(item for module, names in ours.items() for item in _callables(names, module))
    reference = dict(item for module, names in REFERENCE.items()
                     for item in _callables(names, module))
    followed = {qualified: _reexported(qualified) for qualified in reference
                if qualified not in mine}
    mine.update({qualified: params for qualified, params in followed.items() if params is not None})
    # The functions and classes that moved to other modules are checked where they are now.
    assert {"demucs.audio.save_audio", "demucs.audio.AudioFile.__init__"} <= set(followed)
    changed = {}
    for module, names in REFERENCE.items():
        for qualified, params in _callables(names, module):
            if qualified in mine and not _accepts(params, mine[qualified]):
                changed[qualified] = (params, mine[qualified])
    unexpected = {name: value for name, value in changed.items()
                  if name not in EXPECTED_SIGNATURE_CHANGES}
    assert not unexpected, f"parameters of 4.1.0 no longer accepted: {unexpected}"
    closed = sorted(set(EXPECTED_SIGNATURE_CHANGES) - set(changed))
    assert not closed, f"{closed} accept 4.1.0's parameters now: remove them from the list"


def test_the_listing_tool_reads_definitions_and_reexports(tmp_path: Path):
    package = tmp_path / "demucs"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text(
        "from .other import Thing\nimport os\nCONSTANT = 1\n_private = 2\n"
        "def run(a, b=1, *, c): pass\nclass Box:\n    def __init__(self, x, **kw): pass\n"
        "    def open(self): pass\n    def _hidden(self): pass\n"
        "if __name__ == '__main__':\n    args = 3\n")
    names = package_names(package)["demucs.mod"]
    assert names == {"Box": {"kind": "class", "methods": {"__init__": ["self", "x", "**kw"],
                                                          "open": ["self"]}},
                     "CONSTANT": {"kind": "value"}, "Thing": {"kind": "import"},
                     "run": {"kind": "function", "params": ["a", "b", "|", "c"]}}
