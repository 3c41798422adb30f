"""The import graph of the source tree, read with ``ast`` (nothing is imported): every ``import`` at the top,
under ``TYPE_CHECKING`` and inside functions alike, so a cycle or a forbidden edge cannot hide in a lazy import."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Where each top-level name's modules live in the tree.
ROOTS = {"tg_tinker": REPO / "sdk", "tensafe": REPO / "services"}


def modules() -> dict[str, Path]:
    """Module name -> file, for tg_tinker and the services (not the generated tensafe.api stubs)."""
    out: dict[str, Path] = {}
    for top, root in ROOTS.items():
        for path in (root / top).rglob("*.py"):
            if "migrations" in path.parts or "build" in path.relative_to(root).parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imported_names(name: str, path: Path, known: frozenset[str] | set[str] = frozenset()) -> set[str]:
    """Every dotted name ``path`` (module ``name``) imports, relative imports resolved. ``from a import b``
    gives ``a.b`` when that is one of the ``known`` modules (``from . import errors``), else ``a``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            out |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return out


def import_graph(within: str | None = None) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (a name resolved to the longest module prefix we have);
    ``within`` keeps only the modules of one package (``tensafe.trainer``) and the edges between them."""
    mods = modules()
    if within:
        mods = {m: p for m, p in mods.items() if m == within or m.startswith(within + ".")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for target in imported_names(name, path, known=set(mods)):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name:
                graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None
