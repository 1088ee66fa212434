"""The house's floors: every import in ``node/`` runs down the flow, and no modules import each other in
a circle. The imports are read from the source (ast), including those inside functions and under
``TYPE_CHECKING``: a lazy import that runs back up is still an arrow up."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

NODE = Path(__file__).resolve().parents[2] / "node"

#: The floors, from the ground up. A module may import from its own floor and the floors below it.
#: The ground floor holds the types every stage shares and imports nothing above it; the stages follow
#: the flow receive (spool, dicom) → assemble → infer (read: structure sets back into masks) → write →
#: send; jobs and service compose them; the command line is the roof.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("node", "node.errors", "node.model"),  # ground floor
    ("node.config", "node.config_dicomweb", "node.config_qa", "node.config_tls", "node.config_triton",
     "node.config_web", "node.telemetry"),  # + metrics
    ("node.spool",),  # receive: files + the index (the only SQL), and the queries on it
    ("node.dicom",),  # receive: the SCP (into the spool), and the SCU that send uses
    ("node.assemble",),
    ("node.infer", "node.read"),
    ("node.write", "node.nnunet"),  # + importing nnU-Net models as bundles (torch only inside it)
    ("node.qa",),  # edit QA: edited structure sets back in (node.read) → metrics against our result
    ("node.send",),
    ("node.jobs",),
    ("node.web",),  # the web UI: pages on the index's queries and the operator commands
    ("node.service",),
    ("node.cli", "node.cli_bundles", "node.cli_engines", "node.cli_qa", "node.cli_review", "node.cli_series",
     "node.__main__"),
)


def floor_of(module: str) -> int:
    best, floor = -1, -1
    for i, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, floor = len(prefix), i
    if floor < 0:
        raise AssertionError(f"module {module} is on no floor: add its package to FLOORS")
    return floor


def module_name(path: Path) -> str:
    parts = list(path.relative_to(NODE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """The node modules ``path`` imports (``from a.b import c`` counts as ``a.b.c`` when that is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(n, ast.Import):
            found.update(a.name for a in n.names if a.name.split(".")[0] == "node")
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = package.split(".")[: len(package.split(".")) - (n.level - 1)]
                target = ".".join(base + ([n.module] if n.module else []))
            else:
                target = n.module or ""
            if target.split(".")[0] != "node":
                continue
            for alias in n.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if _is_module(sub) else target)
    found.discard(name)
    return found


def _is_module(name: str) -> bool:
    path = NODE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(NODE.rglob("*.py"))}


def test_every_module_is_on_a_floor() -> None:
    for module in graph():
        floor_of(module)


def test_no_import_runs_up_the_flow() -> None:
    upward = [
        f"{module} (floor {floor_of(module)}: {FLOORS[floor_of(module)][0]}) imports {target} "
        f"(floor {floor_of(target)}: {FLOORS[floor_of(target)][0]})"
        for module, targets in graph().items()
        for target in sorted(targets)
        if floor_of(target) > floor_of(module)
    ]
    assert not upward, "imports that run up the flow:\n" + "\n".join(upward)


def test_the_ground_floor_imports_nothing_above_it() -> None:
    for module, targets in graph().items():
        if floor_of(module) == 0:
            assert all(floor_of(t) == 0 for t in targets), (module, targets)


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """A cycle of module-level imports as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(g.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (found := visit(t)) is not None:
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (found := visit(m)) is not None:
            return found
    return None


def test_no_import_cycle() -> None:
    g = graph()
    # A package's __init__ that only documents (imports nothing) never closes a cycle; a module that
    # imports its own package's names would.
    cycle = find_cycle(g)
    assert cycle is None, "import cycle: " + " → ".join(cycle)


@pytest.mark.parametrize(
    ("module", "source", "upward"),
    [
        ("node.spool.retention", "from node.jobs.worker import job_result_dir\n", True),
        ("node.assemble.select", "from node.model.bundle import Bundle\n", False),
        ("node.model.volume", "import node.infer.transforms\n", True),
        ("node.infer.segment", "def f():\n    from node.write.files import write_results\n", True),
        ("node.send.outbox", "from node.dicom import scu\n", False),
    ],
)
def test_the_check_sees_an_upward_import(tmp_path: Path, module: str, source: str, upward: bool) -> None:
    """The check itself: a planted import is judged as the floors say (it cannot pass vacuously)."""
    path = tmp_path / "probe.py"
    path.write_text(source)
    targets = {t for t in _imports_of_source(path)}
    assert bool([t for t in targets if floor_of(t) > floor_of(module)]) is upward


def _imports_of_source(path: Path) -> set[str]:
    found: set[str] = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            found.update(a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom) and n.module:
            found.update(f"{n.module}.{a.name}" if _is_module(f"{n.module}.{a.name}") else n.module for a in n.names)
    return found


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_module_of_node_is_over_500_lines() -> None:
    long = {str(p.relative_to(NODE.parent)): n for p in NODE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert not long, f"modules over 500 lines: {long}"
