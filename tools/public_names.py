"""List the public names of every module of a `demucs` package, read from its source.

    python -m tools.public_names [--package DIR] [-o FILE]

Without `--package`, the `demucs` package the running interpreter would import is listed (found
with `importlib.util.find_spec`, so nothing of it runs: no training dependencies are needed).
The source is parsed, not imported. For each module: its top-level functions (with their
parameters), classes (with their public methods and parameters), assignments, and the names it
imports from its own package (re-exports such as `pretrained.ModelLoadingError`).

`tests/data/public_names_4_1_0.json` was made with the official Demucs 4.1.0 wheel's interpreter:
`~/.cache/demucs-peer/bin/python tools/public_names.py -o tests/data/public_names_4_1_0.json`,
run from outside this checkout; `tests/test_public_names.py` compares this project with it.
"""
import argparse
import ast
import importlib.util
import json
from pathlib import Path
import sys
import typing as tp

Names = tp.Dict[str, tp.Dict[str, tp.Any]]


def _parameters(function: tp.Union[ast.FunctionDef, ast.AsyncFunctionDef]) -> tp.List[str]:
    """Parameter names, `*NAME` / `**NAME` for the variadic ones, `|` before keyword-only ones."""
    arguments = function.args
    names = [arg.arg for arg in arguments.posonlyargs + arguments.args]
    if arguments.vararg is not None:
        names.append("*" + arguments.vararg.arg)
    elif arguments.kwonlyargs:
        names.append("|")
    names += [arg.arg for arg in arguments.kwonlyargs]
    if arguments.kwarg is not None:
        names.append("**" + arguments.kwarg.arg)
    return names


def _class_entry(node: ast.ClassDef) -> tp.Dict[str, tp.Any]:
    methods = {item.name: _parameters(item) for item in node.body
               if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
               and (not item.name.startswith("_") or item.name == "__init__")}
    return {"kind": "class", "methods": methods}


def _assigned_names(node: ast.stmt) -> tp.List[str]:
    if isinstance(node, ast.Assign):
        return [target.id for target in node.targets if isinstance(target, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def _statement_names(node: ast.stmt) -> Names:
    """Public names a top-level statement defines."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return {node.name: {"kind": "function", "params": _parameters(node)}}
    if isinstance(node, ast.ClassDef):
        return {node.name: _class_entry(node)}
    if isinstance(node, ast.ImportFrom) and node.level > 0:  # from the package itself
        return {alias.asname or alias.name: {"kind": "import"} for alias in node.names
                if alias.name != "*"}
    if isinstance(node, ast.If) and "__main__" in ast.dump(node.test):
        return {}  # a script's main block defines nothing importable
    if isinstance(node, (ast.If, ast.Try)):  # optional imports and definitions
        found: Names = {}
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                found.update(_statement_names(child))
        return found
    return {name: {"kind": "value"} for name in _assigned_names(node)}


def module_names(path: Path) -> Names:
    """Public names defined at the top level of the module file `path`."""
    names: Names = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        names.update(_statement_names(node))
    return {name: entry for name, entry in sorted(names.items()) if not name.startswith("_")}


def package_names(package: Path) -> tp.Dict[str, Names]:
    """`{module: names}` for every module of the package folder `package` (sub-packages too)."""
    result = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(part.startswith("_") for part in parts):
            continue
        result[".".join(parts)] = module_names(path)
    return result


def _default_package() -> Path:
    spec = importlib.util.find_spec("demucs")
    if spec is None or spec.origin is None:
        raise SystemExit("no demucs package is importable here; pass --package DIR")
    return Path(spec.origin).parent


def main(argv: tp.Optional[tp.List[str]] = None) -> None:
    parser = argparse.ArgumentParser("tools.public_names", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, default=None,
                        help="The demucs package folder (default: the importable one).")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="JSON file to write (default: standard output).")
    args = parser.parse_args(argv)
    package = args.package or _default_package()
    text = json.dumps(package_names(package), indent=1, sort_keys=True) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
