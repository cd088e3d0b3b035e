"""The code's shape: no import cycles between trtseg's modules (lazy imports included), and no function in the
product over 80 lines without a reason."""
from __future__ import annotations

import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules() -> dict[str, str]:
    mods = {}
    for f in glob.glob(os.path.join(ROOT, "trtseg", "**", "*.py"), recursive=True):
        m = os.path.relpath(f, ROOT)[:-3].replace(os.sep, ".")
        mods[m.removesuffix(".__init__")] = f
    return mods


def _imports(mods: dict[str, str]) -> dict[str, set[str]]:
    """module -> the trtseg modules it imports anywhere in its body (at import time or lazily)."""
    graph = {}
    for m, f in mods.items():
        out = set()
        for node in ast.walk(ast.parse(open(f).read())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            out |= {n for n in names if n in mods and n != m}
        graph[m] = out
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = _imports(_modules())
    assert "trtseg.accel.engines" in graph and "trtseg.jobs.driver" in graph  # the walk sees the subpackages
    assert _cycles(graph) == []
    assert _cycles({**graph, "trtseg.model": graph["trtseg.model"] | {"trtseg.model_v1"}}), "the check can fail"


def test_no_function_over_80_lines():
    long = []
    for m, f in _modules().items():
        for node in ast.walk(ast.parse(open(f).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                doc = ast.get_docstring(node) or ""
                if "over 80 lines because" not in doc:
                    long.append(f"{m}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert long == []
