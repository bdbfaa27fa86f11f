"""The package's import graph: each module imports only from its own room or rooms below it, no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ragsae"

ROOMS = [
    {"_version", "errors", "layout", "storage", "provenance"},
    {"config"},
    {"text"},
    {"lm"},
    {"capture"},
    {"sae"},
    {"encode"},
    {"latents"},
    {"retrieval"},
    {"index"},
    {"routing"},
    {"abstention", "generate", "demo"},
    {"integrations", "langchain", "bench", "service"},
    {"cli"},
    {"__main__", "__init__"},
]
"""Pipeline stages in data-flow order (text -> lm -> capture -> sae -> encode -> latents -> retrieval ->
index -> routing -> abstention/generate -> integrations/bench/service -> cli); a module may import from its
own room and the rooms before it."""
RANK = {room: rank for rank, rooms in enumerate(ROOMS) for room in rooms}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(path: Path) -> set[str]:
    """ragsae modules imported anywhere in `path` (function bodies included), relative imports resolved."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "ragsae"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "ragsae":
                continue
            for alias in node.names:  # `from . import x` may name a submodule
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in ALL_MODULES else target)
    return found - {module}


ALL_MODULES = {module_name(p) for p in PACKAGE.rglob("*.py")}
GRAPH = {module_name(p): imported_modules(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_is_in_a_room():
    assert {room(m) for m in GRAPH} <= set(RANK), {room(m) for m in GRAPH} - set(RANK)


def test_modules_import_only_from_rooms_below():
    upward = [
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if RANK[room(target)] > RANK[room(module)]
    ]
    assert not upward, "imports from a room above:\n" + "\n".join(sorted(upward))


def test_import_graph_has_no_cycle():
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH.get(module, ())):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target in GRAPH and state.get(target) != 2:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_the_graph_walk_sees_relative_and_function_level_imports():
    assert "ragsae.index" in GRAPH["ragsae.generate"]
    assert "ragsae.index" in GRAPH["ragsae.cli"]  # imported inside a command function
    assert "ragsae.retrieval.scoring" in GRAPH["ragsae.retrieval.backends.csr"]


def test_research_and_benchmarks_stay_out_of_the_package():
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            assert not {n.split(".")[0] for n in names} & {"research", "benchmarks", "explore"}, path
