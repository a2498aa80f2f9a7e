"""The package's structure as docs/architecture.md describes it: no import circle between the
modules of `demucs/` and no function longer than 60 lines."""
import ast
from pathlib import Path
import typing as tp

PACKAGE = Path(__file__).resolve().parent.parent / "demucs"
MAX_FUNCTION_LINES = 60


def _modules() -> tp.Dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imported(module: str, path: Path, statement: ast.stmt) -> tp.List[str]:
    """Names a module-level import statement may refer to, as dotted module paths."""
    if isinstance(statement, ast.Import):
        return [alias.name for alias in statement.names]
    if not isinstance(statement, ast.ImportFrom):
        return []
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    if statement.level:
        base = base[:len(base) - statement.level + 1]
        target = ".".join(base + ([statement.module] if statement.module else []))
    else:
        target = statement.module or ""
    return [target] + [f"{target}.{alias.name}" for alias in statement.names]


def import_graph() -> tp.Dict[str, tp.Set[str]]:
    """Module -> modules of the package it imports at module level (lazy imports excluded)."""
    modules = _modules()
    graph: tp.Dict[str, tp.Set[str]] = {}
    for module, path in modules.items():
        body = ast.parse(path.read_text()).body
        graph[module] = {name for statement in body
                         for name in _imported(module, path, statement)
                         if name in modules and name != module}
    return graph


def find_cycle(graph: tp.Dict[str, tp.Set[str]]) -> tp.Optional[tp.List[str]]:
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


def test_find_cycle_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert "demucs.apply" in graph["demucs.api"]  # the graph sees relative imports
    assert find_cycle(graph) is None, find_cycle(graph)


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
