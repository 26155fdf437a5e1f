"""Imports run one way: config/utils ← data ← models ← engine/retrieval/explain ← report/serve/export ← cli/demo.

Every `import` in src/carspotter (module level or inside a function: a lazy import is still a dependency) is
parsed with `ast`. The test fails on an import from a lower layer to a higher one, on a cycle between
modules, and on a cycle between the packages of one layer (retrieval ← engine ← explain, never back).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "carspotter"

# Top-level module or package of carspotter → its layer. A new top-level module must be added here.
LAYERS: dict[str, int] = {
    "__init__": 0,  # `carspotter` itself: __version__ only
    "config": 0,
    "utils": 0,
    "rundir": 0,
    "presets": 0,
    "data": 1,
    "models": 2,
    "retrieval": 3,
    "engine": 3,
    "explain": 3,
    "report": 4,
    "serve": 4,
    "export": 4,
    "cli": 5,
    "demo": 5,
    "__main__": 5,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def top_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The carspotter modules `path` imports, resolved to modules that exist."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path)
    pkg = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import submodule` depends on the submodule; `from pkg import name` on pkg
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for n in names:
            if not n.startswith("carspotter"):
                continue
            while n and n not in known:  # `from pkg import name` → the submodule if it is one, else pkg
                n = n.rsplit(".", 1)[0] if "." in n else ""
            if n and n != me:
                out.add(n)
    return out


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    files = sorted(src.rglob("*.py"))
    known = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, known) for p in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, …, a], or None (iterative DFS, white/grey/black)."""
    state: dict[str, int] = {}
    for start in sorted(graph):
        if state.get(start):
            continue
        stack: list[tuple[str, list[str]]] = [(start, sorted(graph.get(start, ())))]
        path = [start]
        state[start] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                state[node] = 2
                stack.pop()
                path.pop()
                continue
            nxt = todo.pop(0)
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, sorted(graph.get(nxt, ()))))
    return None


def layer_problems(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for mod, deps in sorted(graph.items()):
        top = top_of(mod)
        if top not in LAYERS:
            problems.append(
                f"{mod}: new top-level module {top!r} is not in the layer map; add it to LAYERS in "
                "tests/test_layers.py (and the layer drawing in docs/ARCHITECTURE.md)"
            )
            continue
        for dep in sorted(deps):
            dtop = top_of(dep)
            if dtop in LAYERS and LAYERS[dtop] > LAYERS[top]:
                problems.append(
                    f"{mod} (layer {LAYERS[top]}, {top}) imports {dep} (layer {LAYERS[dtop]}, {dtop}): upward"
                )
    return problems


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for mod, deps in graph.items():
        out.setdefault(top_of(mod), set()).update(top_of(d) for d in deps if top_of(d) != top_of(mod))
    return out


def test_no_upward_imports_and_every_module_mapped():
    problems = layer_problems(import_graph())
    assert not problems, "\n".join(problems)


def test_no_module_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def test_no_package_cycle_within_a_layer():
    cycle = find_cycle(package_graph(import_graph()))
    assert cycle is None, "packages import each other: " + " → ".join(cycle or [])


def test_checker_catches_upward_import_cycle_and_unknown_module(tmp_path):
    """The checks themselves: a planted upward import, a cycle and an unmapped module are all reported."""
    pkg = tmp_path / "carspotter"
    for rel, text in {
        "__init__.py": "",
        "utils.py": "def f():\n    from carspotter.engine import train\n",
        "engine/__init__.py": "",
        "engine/train.py": "from carspotter.utils import f\n",
        "newthing.py": "",
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    global SRC
    saved, SRC = SRC, pkg
    try:
        graph = import_graph(pkg)
    finally:
        SRC = saved
    problems = layer_problems(graph)
    assert any("carspotter.utils" in p and "upward" in p for p in problems)
    assert any("newthing" in p and "add it to LAYERS" in p for p in problems)
    assert find_cycle(graph) is not None


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_map_names_are_real_or_future(name):
    future = {"explain"}
    assert (
        name in future
        or name in ("__init__", "__main__")
        or (SRC / name).exists()
        or (SRC / f"{name}.py").exists()
    )
