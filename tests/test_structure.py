"""The project's shape, read from its source: the top-level files form layers without an import
cycle (imports inside functions included), and the files people read step by step keep their
functions short.

    python -m pytest -q tests/test_structure.py
"""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = {p.stem: p for p in sorted(ROOT.glob("*.py"))}
# The layers, bottom first (README, "Tests"): a file imports only files of a lower layer; one absent here
# (a new entry point) belongs on top.
LAYERS = [{"teamlora", "model", "data", "metrics"}, {"common", "sharding"}, {"runs"}]
SHORT = ("train", "eval", "data", "teamlora")  # no function over MAX_LINES in these
MAX_LINES = 80


def project_imports(path: Path) -> dict[str, int]:
    """{project module: first line importing it} for every import in the file, at any depth."""
    found = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split(".")[0]]
        else:
            continue
        for name in names:
            if name in MODULES:
                found.setdefault(name, node.lineno)
    return found


def layer(module: str) -> int:
    return next((i for i, members in enumerate(LAYERS) if module in members), len(LAYERS))


def test_the_files_import_each_other_in_layers_without_a_cycle():
    graph = {m: project_imports(p) for m, p in MODULES.items()}
    upward = [f"{m}.py:{line} imports {dep} (layer {layer(dep)} is not below layer {layer(m)})"
              for m, deps in graph.items() for dep, line in deps.items()
              if layer(dep) >= layer(m) and layer(m) < len(LAYERS)]
    assert not upward, "\n".join(upward)

    done, path = set(), []

    def visit(m):  # depth-first; a module met again while still on the path closes a cycle
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m not in done:
            path.append(m)
            for dep in graph[m]:
                visit(dep)
            path.pop()
            done.add(m)

    for m in graph:
        visit(m)


def test_teamlora_py_needs_only_torch_to_be_copied():
    """Copying teamlora.py into another project must be enough: torch and the standard library."""
    tree = ast.parse(MODULES["teamlora"].read_text())
    names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert names - {"torch"} <= set(sys.stdlib_module_names), names


def test_the_scan_sees_imports_inside_functions(tmp_path):
    (tmp_path / "a.py").write_text("import os\n\ndef f():\n    from model import Tokenizer\n    import data, common.x\n")
    assert project_imports(tmp_path / "a.py") == {"model": 4, "data": 5, "common": 5}


def test_no_long_functions_in_the_files_read_step_by_step():
    long = []
    for name in SHORT:
        for node in ast.walk(ast.parse(MODULES[name].read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1  # decorators not counted, docstring counted
                if lines > MAX_LINES:
                    long.append(f"{name}.py:{node.lineno} {node.name}: {lines} lines")
    assert not long, f"functions over {MAX_LINES} lines:\n" + "\n".join(long)
