"""Imports go one way: no module of the package imports another that (transitively) imports it back,
and no module but the entry point pulls in the CLI."""

import ast
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"trainer": "paratrain.trainer", "strategies": "paratrain.strategies"}


def package_modules() -> dict[str, Path]:
    """{"paratrain.trainer.launch.slurm": path} for every .py file of the package's code folders."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules `name` imports anywhere in its file (top level or inside a function)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from . import x` names the module x; `from .a import b` names a (b is a symbol of it).
            submodules = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in known]
            candidates = submodules or [module]
        else:
            continue
        for c in candidates:
            # The deepest known module that c is, or lies inside (a symbol of a module).
            while c and c not in known:
                c = c.rpartition(".")[0]
            # A module's own parent packages are imported before it anyway: not an edge.
            if c and c != name and not name.startswith(c + "."):
                found.add(c)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    # A module's parent packages are imported with it; their __init__ is counted as an edge too.
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 20, sorted(graph)  # the walk found the package
    cycle = find_cycle(graph)
    files = [str(package_modules()[m].relative_to(ROOT)) for m in cycle] if cycle else None
    assert cycle is None, "import cycle: " + " -> ".join(files)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_relative_imports_resolve_to_modules():
    graph = import_graph()
    assert "paratrain.trainer.launch.jobs" in graph["paratrain.trainer.launch.slurm"]
    assert "paratrain.trainer.errors" in graph["paratrain.trainer.models.moe"]
    assert "paratrain.strategies.portable_state" in graph["paratrain.strategies.mesh_strategy"]


def test_only_the_entry_point_imports_the_cli():
    graph = import_graph()
    importers = sorted(m for m, deps in graph.items() if "paratrain.trainer.cli" in deps)
    assert importers == [], importers


def test_every_module_imports_alone_without_the_cli():
    # One fresh interpreter imports each module in turn, from an empty sys.modules for the package.
    modules = [m for m in package_modules() if m != "paratrain.trainer.cli"]
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    for loaded in [m for m in sys.modules if m.startswith('paratrain')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
        "    assert 'paratrain.trainer.cli' not in sys.modules, name + ' imports the CLI'\n"
        "print('imported', len(" + repr(modules) + "))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"imported {len(modules)}" in result.stdout
