"""The package's structure as docs/architecture.md describes it.

The layer table of the doc is the one source of truth: every module of `demucs/` is in it, no
import goes up a layer and no modules import each other in a circle, counting the imports made
inside functions. The configuration groups table names every folder of `conf/`. No function is
longer than 60 lines.
"""
import ast
from pathlib import Path
import re
import typing as tp

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "demucs"
DOC = ROOT / "docs" / "architecture.md"
MAX_FUNCTION_LINES = 60
Graph = tp.Dict[str, tp.Set[str]]
Layers = tp.Dict[str, tp.Tuple[int, str]]  # table entry (module, or package prefix) -> layer


def package_modules(package: Path) -> tp.Dict[str, Path]:
    """Dotted name -> file of every module of `package` (a package is named by its folder)."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _targets(module: str, path: Path, node: ast.AST, modules: tp.Container[str]) -> tp.List[str]:
    """The modules of the package an import statement loads: `from X import a` loads `X.a` when
    that is a module, else `X`."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in modules]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    found = [f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target
             for alias in node.names]
    return [name for name in found if name in modules]


def import_graph(package: Path = PACKAGE) -> Graph:
    """Module -> the modules of the package it imports, anywhere in its file (inside functions
    and `if` blocks too: a lazy import is an import all the same)."""
    modules = package_modules(package)
    graph: Graph = {}
    for module, path in modules.items():
        graph[module] = {target for node in ast.walk(ast.parse(path.read_text()))
                         for target in _targets(module, path, node, modules)
                         if target != module}
    return graph


def _section(markdown: str, title: str) -> str:
    """The text of the `## title` section of a markdown document."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", markdown, re.S | re.M)
    assert match, f"no '## {title}' section"
    return match.group(1)


def _table_rows(section: str) -> tp.List[tp.List[str]]:
    """The cells of each body row of the first table of a section."""
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def layer_table(markdown: str, package: str = "demucs") -> Layers:
    """Module (or `package.sub` for a `sub/` entry, standing for its modules) -> (layer index
    from the bottom, layer name), from the `## Layers` table of `markdown`."""
    layers: Layers = {}
    for index, (name, cells, *_) in enumerate(_table_rows(_section(markdown, "Layers"))):
        for entry in re.findall(r"`([^`]+)`", cells):
            dotted = package if entry == "__init__" else f"{package}.{entry.rstrip('/')}"
            assert dotted not in layers, f"{entry} is in two layers"
            layers[dotted] = (index, name)
    return layers


def layer_of(module: str, layers: Layers) -> tp.Optional[tp.Tuple[int, str]]:
    """The layer of `module`: its own entry, else the entry of the nearest package holding it."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in layers and (end == len(parts) or end > 1):
            return layers[".".join(parts[:end])]
    return None


def upward_imports(graph: Graph, layers: Layers) -> tp.List[str]:
    """Every import of `graph` from a lower layer into a higher one, as readable lines."""
    found = []
    for module in sorted(graph):
        here = layer_of(module, layers)
        for target in sorted(graph[module]):
            there = layer_of(target, layers)
            if here is not None and there is not None and there[0] > here[0]:
                found.append(f"{module} ({here[1]}) imports {target} ({there[1]})")
    return found


def unplaced(graph: Graph, layers: Layers) -> tp.List[str]:
    """Modules of `graph` that the layer table does not place."""
    return sorted(module for module in graph if layer_of(module, layers) is None)


def find_cycle(graph: Graph) -> tp.Optional[tp.List[str]]:
    """One import circle of `graph` (its modules in order), or None."""
    state: tp.Dict[str, str] = {}
    path: tp.List[str] = []

    def visit(node: str) -> tp.Optional[tp.List[str]]:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


FAKE_DOC = """## Layers

| layer | modules | what they do |
|---|---|---|
| low | `__init__`, `base` | below |
| high | `top`, `sub/` | above |

## Next
"""


def _fake_package(root: Path, files: tp.Dict[str, str]) -> Path:
    package = root / "fakepkg"
    for name, text in {"__init__.py": "", **files}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    return package


def test_the_checker_reports_an_upward_import_made_inside_a_function(tmp_path: Path):
    package = _fake_package(tmp_path, {
        "base.py": "def helper():\n    from .top import value\n    return value\n",
        "top.py": "value = 1\n",
        "sub/__init__.py": "", "sub/leaf.py": "from .. import base\n"})
    graph = import_graph(package)
    layers = layer_table(FAKE_DOC, "fakepkg")
    assert graph["fakepkg.base"] == {"fakepkg.top"}
    assert graph["fakepkg.sub.leaf"] == {"fakepkg.base"}
    assert upward_imports(graph, layers) == ["fakepkg.base (low) imports fakepkg.top (high)"]
    assert unplaced(graph, layers) == []


def test_the_checker_reports_an_unplaced_module_and_a_lazy_circle(tmp_path: Path):
    package = _fake_package(tmp_path, {
        "base.py": "import typing\n", "extra.py": "",
        "top.py": "from . import base\n\n\ndef later():\n    from .sub import leaf\n",
        "sub/__init__.py": "", "sub/leaf.py": "from ..top import later\n"})
    graph = import_graph(package)
    layers = layer_table(FAKE_DOC, "fakepkg")
    assert upward_imports(graph, layers) == []
    assert unplaced(graph, layers) == ["fakepkg.extra"]
    assert find_cycle(graph) == ["fakepkg.sub.leaf", "fakepkg.top", "fakepkg.sub.leaf"]


def test_find_cycle_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_is_in_the_layer_table_and_every_entry_is_a_module():
    graph, layers = import_graph(), layer_table(DOC.read_text())
    assert unplaced(graph, layers) == [], "add these modules to the table of docs/architecture.md"
    stale = sorted(entry for entry in layers if entry not in graph)
    assert stale == [], "the table of docs/architecture.md names modules that do not exist"


def test_no_import_goes_up_a_layer():
    graph = import_graph()
    assert "demucs.apply" in graph["demucs.api"]  # the graph sees relative imports
    assert "demucs.train" in graph["demucs.pretrained"]  # and those inside functions
    assert upward_imports(graph, layer_table(DOC.read_text())) == []


def test_the_package_has_no_import_circle_counting_lazy_imports():
    graph = import_graph()
    assert find_cycle(graph) is None, find_cycle(graph)


def test_the_doc_names_every_configuration_group():
    rows = _table_rows(_section(DOC.read_text(), "Configuration groups"))
    named = sorted(entry for row in rows for entry in re.findall(r"`([^`]+)/`", row[0]))
    folders = sorted(path.name for path in (ROOT / "conf").iterdir() if path.is_dir())
    assert named == folders
    for row in rows:
        group, default = row[0].strip("`/"), row[1].strip("`")
        assert (ROOT / "conf" / group / f"{default}.yaml").is_file(), row


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} "
                                f"{node.name} ({length} lines)")
    assert not long, long
