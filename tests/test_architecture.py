"""The floors of docs/architecture.md, checked on the source: every import of every module under
qlora/ (module level, inside functions, under TYPE_CHECKING: all of them, read with ast) goes to
its own floor or one below, and no modules import each other in a circle.

A failure names the importing file and line and the module it imports.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "qlora"

FLOORS = (
    ("errors", "assets", "rows"),  # the ground: leaves any floor may use
    ("kernels",),  # native and Triton kernels over plain tensors
    ("quant",),  # numbers -> 4 bits
    ("nn",),  # 4 bits -> a trainable layer
    ("model",),  # a transformers model -> a QLoRA model
    ("optim",),  # the update
    ("memory",),  # the planner: a run's peak from the config
    ("train",),  # the loop and everything a run writes
    ("explain", "cli", "threads", "__init__", "__main__"),  # the front door
)
FLOOR = {room: i for i, rooms in enumerate(FLOORS) for room in rooms}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def room(module: str) -> str:
    """qlora.quant.tensor -> quant; the package itself (qlora/__init__.py) -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(module: str) -> list[tuple[int, str]]:
    """(line, qlora module) of every import in `module`, at any depth of its code. `from X import y`
    counts as an import of X.y where that is a module, else of X (its __init__ runs)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "qlora"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "qlora":
                continue
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            found += [(node.lineno, s) for s in subs]
            if len(subs) < len(node.names):
                found.append((node.lineno, target))
    return [(line, m) for line, m in found if m != module]


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_lives_on_a_floor():
    unknown = sorted({room(m) for m in MODULES} - set(FLOOR))
    assert not unknown, f"qlora/{unknown[0]} is on no floor: add it to FLOORS here and to docs/architecture.md"


def test_no_import_runs_up_a_floor():
    up = [f"{MODULES[m].relative_to(ROOT.parent)}:{line} imports {target} "
          f"({room(m)} is on floor {FLOOR[room(m)]}, {room(target)} on floor {FLOOR[room(target)]})"
          for m, found in GRAPH.items() for line, target in found
          if room(target) in FLOOR and room(m) in FLOOR and FLOOR[room(target)] > FLOOR[room(m)]]
    assert not up, "imports that run up a floor:\n" + "\n".join(up)


def test_no_circles_between_rooms_of_a_floor():
    edges = {(room(m), room(t)) for m, found in GRAPH.items() for _, t in found if room(m) != room(t)}
    both = sorted(f"{a} <-> {b}" for a, b in edges if (b, a) in edges and a < b)
    assert not both, f"rooms that import each other: {both}"


def _cycles() -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for _, w in GRAPH[v]:
            if w not in MODULES:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in MODULES:
        if v not in index:
            visit(v)
    return groups


def test_no_modules_import_each_other_in_a_circle():
    # a package's __init__ imports its own modules; those may import their siblings through it
    # (`from . import data`), which is resolved to the sibling above, so no circle is excused
    assert not _cycles(), f"modules that import each other in a circle: {_cycles()}"


@pytest.mark.parametrize("source", ["from qlora.train.config import TrainConfig",
                                    "def f():\n    from ..train import config"])
def test_the_check_sees_an_upward_import(tmp_path, source):
    """The parser above finds module-level and function-level imports (the test can fail)."""
    MODULES["qlora.quant._arch_probe"] = tmp_path / "probe.py"
    (tmp_path / "probe.py").write_text(source)
    try:
        found = [t for _, t in imports("qlora.quant._arch_probe")]
    finally:
        del MODULES["qlora.quant._arch_probe"]
    assert found and room(found[0]) == "train" and FLOOR["train"] > FLOOR["quant"], found
