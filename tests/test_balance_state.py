"""The per-server state machine of the balancers' pool: the whole table, case by case."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import oxypy
from oxypy._balance.state import TRANSITIONS, Input, ServerState, State, transition

PACKAGE = Path(oxypy.__file__).parent

A, U, E, UE, D, R = (
    State.ACTIVE,
    State.UNHEALTHY,
    State.EJECTED,
    State.UNHEALTHY_EJECTED,
    State.DRAINING,
    State.REMOVED,
)

# (state before, input, state after, on_change event or None), written out from
# the rules rather than read from the table, so a changed rule fails here.
CASES = [
    (State.NEW, Input.ADD, A, "added"),
    (A, Input.PROBES_FAILED, U, "unhealthy"),
    (A, Input.PROBES_PASSED, A, None),
    (A, Input.EJECT, E, "ejected"),
    (A, Input.EJECTION_OVER, A, None),
    (A, Input.REMOVE, R, "removed"),
    (U, Input.PROBES_FAILED, U, None),
    (U, Input.PROBES_PASSED, A, "healthy"),
    (U, Input.EJECT, U, None),  # a straggler's failure: the server is already out
    (U, Input.EJECTION_OVER, U, None),
    (U, Input.REMOVE, R, "removed"),
    (E, Input.PROBES_FAILED, UE, "unhealthy"),
    (E, Input.PROBES_PASSED, E, None),  # healthy, but its ejection still runs
    (E, Input.EJECT, E, None),
    (E, Input.EJECTION_OVER, A, "returned"),
    (E, Input.REMOVE, R, "removed"),
    (UE, Input.PROBES_FAILED, UE, None),
    (UE, Input.PROBES_PASSED, E, "healthy"),
    (UE, Input.EJECT, UE, None),
    (UE, Input.EJECTION_OVER, U, "returned"),  # back from ejection, still unhealthy
    (UE, Input.REMOVE, R, "removed"),
    (A, Input.DRAIN, D, "draining"),
    (A, Input.UNDRAIN, A, None),
    (U, Input.DRAIN, D, "draining"),
    (U, Input.UNDRAIN, U, None),
    (E, Input.DRAIN, D, "draining"),  # draining forgets the ejection
    (E, Input.UNDRAIN, E, None),
    (UE, Input.DRAIN, D, "draining"),
    (UE, Input.UNDRAIN, UE, None),
    (D, Input.PROBES_FAILED, D, None),  # drained: health and traffic no longer count
    (D, Input.PROBES_PASSED, D, None),
    (D, Input.EJECT, D, None),  # a request in flight when the drain began
    (D, Input.EJECTION_OVER, D, None),
    (D, Input.REMOVE, R, "removed"),
    (D, Input.DRAIN, D, None),
    (D, Input.UNDRAIN, A, "undrained"),
    (R, Input.DRAIN, R, None),
    (R, Input.UNDRAIN, R, None),
    (R, Input.PROBES_FAILED, R, None),  # a late probe of a removed server
    (R, Input.PROBES_PASSED, R, None),
    (R, Input.EJECT, R, None),  # a request that drained after the removal
    (R, Input.EJECTION_OVER, R, None),
    (R, Input.REMOVE, R, None),
]


def server_in(state: State) -> ServerState:
    server = ServerState("http://s", "http://s:80/", 1)
    server.state = state
    if state in (E, UE):
        server.ejected_until = 50.0
    return server


@pytest.mark.parametrize(
    ("before", "event", "after", "reported"),
    [pytest.param(*case, id=f"{case[0].name}-{case[1].name}") for case in CASES],
)
def test_transition(before: State, event: Input, after: State, reported: str | None) -> None:
    server = server_in(before)
    server.consecutive_errors = 2
    server.recent.extend([True, False])
    events: list[tuple[str, str]] = []
    changed = transition(server, event, events, now=40.0, until=70.0)
    assert server.state is after
    assert changed is (after is not before)
    assert events == ([] if reported is None else [("http://s", reported)])
    assert server.available is (after is A)
    assert server.ejected is (after in (E, UE))
    if changed and event is Input.EJECT:
        assert server.ejected_until == 70.0
    if changed and event is Input.EJECTION_OVER:
        assert (server.ejected_until, server.returned_at) == (None, 40.0)
    if changed and event in (Input.DRAIN, Input.UNDRAIN):
        assert (server.ejected_until, server.check_streak) == (None, 0)
    if changed and event in (Input.EJECT, Input.EJECTION_OVER, Input.DRAIN, Input.UNDRAIN):
        # Ejected or returned, a server starts again with a clean slate.
        assert (server.consecutive_errors, list(server.recent)) == (0, [])
    else:
        assert (server.consecutive_errors, list(server.recent)) == (2, [True, False])


def test_the_table_is_the_cases_and_total() -> None:
    assert {(b, i): (a, r) for b, i, a, r in CASES} == TRANSITIONS
    live = [A, U, E, UE, D, R]
    inputs = [i for i in Input if i is not Input.ADD]
    assert {(s, i) for s in live for i in inputs} | {(State.NEW, Input.ADD)} == set(TRANSITIONS)


@pytest.mark.parametrize(
    ("state", "event"),
    [
        pytest.param(State.NEW, Input.EJECT, id="new-eject"),
        pytest.param(State.NEW, Input.REMOVE, id="new-remove"),
        pytest.param(A, Input.ADD, id="active-add"),
        pytest.param(R, Input.ADD, id="removed-add"),
    ],
)
def test_impossible_inputs_are_bugs(state: State, event: Input) -> None:
    server = server_in(state)
    with pytest.raises(RuntimeError, match="no transition"):
        transition(server, event, [], until=1.0)
    assert server.state is state


def test_eject_needs_its_end() -> None:
    with pytest.raises(RuntimeError):
        transition(server_in(A), Input.EJECT, [])


@pytest.mark.parametrize(
    ("inputs", "final", "reported"),
    [
        pytest.param(
            [Input.ADD, Input.EJECT, Input.PROBES_FAILED, Input.EJECTION_OVER, Input.PROBES_PASSED],
            A,
            ["added", "ejected", "unhealthy", "returned", "healthy"],
            id="ejected-then-unhealthy-needs-both-to-clear",
        ),
        pytest.param(
            [Input.ADD, Input.PROBES_FAILED, Input.EJECT, Input.PROBES_PASSED, Input.REMOVE],
            R,
            ["added", "unhealthy", "healthy", "removed"],
            id="no-ejection-while-unhealthy",
        ),
        pytest.param(
            [Input.ADD, Input.REMOVE, Input.PROBES_FAILED, Input.EJECT],
            R,
            ["added", "removed"],
            id="removed-is-terminal",
        ),
    ],
)
def test_sequences(inputs: list[Input], final: State, reported: list[str]) -> None:
    server = ServerState("http://s", "http://s:80/", 1)
    events: list[tuple[str, str]] = []
    for event in inputs:
        transition(server, event, events, now=1.0, until=2.0)
    assert server.state is final
    assert [name for _, name in events] == reported


# -- the layout of the balancing code ---------------------------------------------------

BALANCE_FILES = [
    "health.py",
    "sticky.py",
    "roundrobin.py",
    "leastrequest.py",
    "rebalancer.py",
    *(f"_balance/{p.name}" for p in (PACKAGE / "_balance").glob("*.py")),
]


def module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> tuple[set[str], list[int]]:
    """(oxypy modules imported at module level, lines of imports inside functions)."""
    tree = ast.parse(path.read_text())
    here = module_of(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found: set[str] = set()
    nested: list[int] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if node not in tree.body and not _under_type_checking(tree, node):
            nested.append(node.lineno)
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("oxypy"))
            continue
        if node.level:
            base = package[: len(package) - node.level + 1]
            name = ".".join([*base, *([node.module] if node.module else [])])
        else:
            name = node.module or ""
        if name.startswith("oxypy"):
            if node.module:  # ``from . import x`` needs x, not the package's __init__
                found.add(name)
            for alias in node.names:
                if (
                    (PACKAGE.parent / (name + "." + alias.name).replace(".", "/"))
                    .with_suffix(".py")
                    .exists()
                ):
                    found.add(f"{name}.{alias.name}")
    return found, nested


def _under_type_checking(tree: ast.Module, node: ast.stmt) -> bool:
    return any(
        isinstance(top, ast.If) and "TYPE_CHECKING" in ast.unparse(top.test) and node in top.body
        for top in tree.body
    )


def test_no_import_cycle_and_no_hidden_import_in_the_balancing_code() -> None:
    graph = {module_of(p): imports_of(p)[0] for p in PACKAGE.rglob("*.py")}
    for name in BALANCE_FILES:
        path = PACKAGE / name
        _, nested = imports_of(path)
        assert nested == [], f"{name} imports inside a function at lines {nested}"
        start = module_of(path)
        # Depth-first search for a path from start back to itself.
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    raise AssertionError("import cycle: " + " -> ".join([*trail, nxt]))
                if nxt not in seen and nxt in graph:
                    seen.add(nxt)
                    stack.append((nxt, [*trail, nxt]))
    # The configuration values know nothing of the machinery.
    for name in ("health.py", "sticky.py"):
        assert not any("_balance" in m for m in imports_of(PACKAGE / name)[0])


def test_no_reaching_into_another_objects_private_names() -> None:
    for name in BALANCE_FILES:
        tree = ast.parse((PACKAGE / name).read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            ):
                raise AssertionError(f"{name}:{node.lineno}: {ast.unparse(node)}")
