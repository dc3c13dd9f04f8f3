"""The declared layering of deqlib holds: every import points down the stack (README, "Layers"),
no module imports another's private name, and the import graph has no cycle.

Imports are read from the source (every ``import`` and ``from ... import`` statement, at any
depth, so a lazy import inside a function counts as much as one at the top)."""

import ast
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "deqlib"
# Rank of each module or subpackage: a module may import only modules of a lower rank, or
# modules of its own subpackage. Leaves first.
RANKS = {
    "checks": 0, "atomic": 0, "numerics": 0, "buffers": 0, "stats": 0,
    "nn": 1, "measure": 1, "config": 1, "data": 1, "penalty_schedule": 1,
    "jacobian": 2, "solvers": 2,
    "deq": 3,
    "step": 4,
    "models": 5,
    "train": 6,
    "report": 7,
    "experiments": 8,
    "bench": 9,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out[".".join(parts)] = path
    return out


def _group(module: str) -> str:
    return module.split(".")[0] if module else ""


def _imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """``(imported deqlib module, imported names, line)`` for every import of a deqlib module."""
    tree = ast.parse(path.read_text())
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.split(".")[0] == "deqlib":
                target = ".".join(node.module.split(".")[1:])
            else:
                continue
            names = [a.name for a in node.names]
            # ``from . import jacobian`` imports the submodule jacobian
            subs = [n for n in names if f"{target}.{n}".strip(".") in _MODULES]
            if subs:
                found += [(f"{target}.{n}".strip("."), [], node.lineno) for n in subs]
                names = [n for n in names if n not in subs]
            if names:
                found.append((target, names, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "deqlib":
                    found.append((".".join(alias.name.split(".")[1:]), [], node.lineno))
    return found


_MODULES = _modules()


def _edges() -> list[tuple[str, str, list[str], int]]:
    return [(m, target, names, line) for m, p in _MODULES.items() for target, names, line in _imports(m, p)]


def test_every_module_has_a_rank():
    unranked = sorted({_group(m) for m in _MODULES if m and _group(m) not in RANKS})
    assert not unranked, f"give these a place in RANKS (and the README's diagram): {unranked}"


def test_imports_point_down_the_stack():
    upward = []
    for src, dst, _, line in _edges():
        if not src:  # the package root gathers the public API from every layer
            continue
        gs, gd = _group(src), _group(dst)
        if gs == gd and gs in ("data", "models", "experiments", "bench", "train", "solvers", "report"):
            continue  # within one subpackage
        if gd and RANKS.get(gd, -1) >= RANKS.get(gs, 99):
            upward.append(f"deqlib/{src.replace('.', '/')}.py:{line} imports {dst} "
                          f"(rank {RANKS.get(gd)} >= {RANKS.get(gs)})")
    assert not upward, "\n".join(upward)


def test_no_private_name_is_imported_across_modules():
    private = [f"deqlib/{src.replace('.', '/')}.py:{line} imports {n} from {dst}"
               for src, dst, names, line in _edges() for n in names if n.startswith("_") and dst != src]
    assert not private, "\n".join(private)


def test_the_import_graph_has_no_cycle():
    graph: dict[str, set[str]] = {}
    for src, dst, _, _ in _edges():
        if src and dst and dst != src and dst in _MODULES:
            graph.setdefault(src, set()).add(dst)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if state.get(nxt) is None:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if state.get(node) is None:
            visit(node)


def test_no_library_file_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 420}
    assert not long, f"split these (one job per module): {long}"
