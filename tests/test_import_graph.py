"""No import circle among the modules of gptq_plugin, gptq_plugin.kernels and gptq_plugin.adapters.

The graph is read from the source with ``ast`` (nothing is imported but the three packages, to find their folders):
every ``import`` and ``from ... import`` between these modules, at module level or inside a function (a function's
import runs on the first call and closes a circle just the same), except those under ``if TYPE_CHECKING:``.
``from pkg import name`` counts as importing ``pkg.name`` when that is a module, and ``pkg`` itself (whose
``__init__`` runs). Importing ``a.b`` is not counted as importing the package ``a``: every module of the project
needs ``gptq_plugin/__init__.py`` to have started, and it imports only what does not import it back.
Modules are found by walking the packages' folders, so new modules are checked without editing this test.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

PACKAGES = ("gptq_plugin", "gptq_plugin.kernels", "gptq_plugin.adapters")


def package_folders(packages=PACKAGES) -> dict[str, Path]:
    """Package name -> its folder (``gptq_plugin.kernels`` lives in the checkout's ``kernels/``)."""
    return {p: Path(importlib.util.find_spec(p).submodule_search_locations[0]) for p in packages}


def module_files(folders: dict[str, Path]) -> dict[str, Path]:
    """Module name -> source file, for every ``*.py`` under each package folder (``__init__.py`` is the package)."""
    mods: dict[str, Path] = {}
    for pkg, folder in folders.items():
        for f in sorted(folder.rglob("*.py")):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods.setdefault(".".join([pkg, *parts]), f)
    return mods


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The dotted names ``node`` imports (``from pkg import x`` gives ``pkg.x`` and ``pkg``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([base] if base else []))
    return [t for a in node.names for t in (f"{base}.{a.name}", base)]


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of ``mods`` it imports (anywhere but under ``if TYPE_CHECKING:``)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        todo: list[ast.AST] = [ast.parse(f.read_text(), str(f))]
        while todo:
            node = todo.pop()
            for child in ast.iter_child_nodes(node):
                if _is_type_checking(child):
                    todo.extend(child.orelse)
                    continue
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for t in _targets(child, m, f.name == "__init__.py"):
                        while t and t not in mods:  # `from a.b import func` imports the module a.b
                            t = t.rpartition(".")[0]
                        if t and t != m:
                            graph[m].add(t)
                todo.append(child)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _path_around(graph: dict[str, set[str]], circle: list[str]) -> str:
    """One import path around ``circle``, for the failure message: ``a -> b -> c -> a``."""
    members, start = set(circle), circle[0]
    parent: dict[str, str] = {}
    todo = [start]
    while todo:  # breadth-first from start back to start, inside the circle
        v = todo.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return " -> ".join([start, *reversed(path[:-1]), start])
            if w not in parent:
                parent[w] = v
                todo.append(w)
    return ", ".join(circle)


def test_no_import_circle():
    mods = module_files(package_folders())
    graph = import_graph(mods)
    # the walker sees the real project: its modules and their imports
    assert {"gptq_plugin.checkpoint", "gptq_plugin.kernels.base", "gptq_plugin.adapters.vllm"} <= mods.keys()
    assert "gptq_plugin.safetensors_io" in graph["gptq_plugin.checkpoint"]
    assert "gptq_plugin.adapters.transformers" in graph["gptq_plugin"]  # a function-level import counts
    found = circles(graph)
    assert not found, "import circles:\n  " + "\n  ".join(_path_around(graph, c) for c in found)


def test_a_planted_circle_is_found(tmp_path):
    """A circle closed only by an import inside a function, through a kernel-like subpackage, is reported; one
    closed under ``if TYPE_CHECKING:`` is not."""
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from .b import f\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    from pkg.sub.c import g\n    return g\n")
    (tmp_path / "pkg" / "sub" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "sub" / "c.py").write_text("from .. import a\n")
    (tmp_path / "pkg" / "d.py").write_text("from typing import TYPE_CHECKING\n"
                                           "if TYPE_CHECKING:\n    from .e import x\n")
    (tmp_path / "pkg" / "e.py").write_text("from .d import y\n")
    graph = import_graph(module_files({"pkg": tmp_path / "pkg"}))
    assert circles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    assert _path_around(graph, ["pkg.a", "pkg.b", "pkg.sub.c"]) == "pkg.a -> pkg.b -> pkg.sub.c -> pkg.a"
