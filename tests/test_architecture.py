"""The package's shape, checked from the source: no import cycles, no reaching in.

Every import counts: the ones inside functions (a lazy import does not make a
cycle go away, it hides it) and the ones under ``TYPE_CHECKING`` (two modules
that need each other's types are one concern split in two). The map these
rules keep true is docs/architecture.md.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "oxypy"
SUBPACKAGES = ("_core", "_server", "_client", "_tunnel", "_balance", "_buffer", "_cli", "_status")


def module_name(path: pathlib.Path) -> str:
    parts = ["oxypy", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


class Module:
    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.name = module_name(path)
        self.is_package = path.name == "__init__.py"
        self.tree = ast.parse(path.read_text(), str(path))


MODULES = {m.name: m for m in map(Module, sorted(PACKAGE.rglob("*.py")))}


def edges(module: Module) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import of oxypy code."""
    out: list[tuple[str, list[str]]] = []
    for node in _imports(module.tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, []) for alias in node.names if alias.name.startswith("oxypy"))
            continue
        target = _resolve(module.name, module.is_package, node)
        if not target.startswith("oxypy"):
            continue
        names = [alias.name for alias in node.names]
        submodules = [n for n in names if f"{target}.{n}" in MODULES]
        out.extend((f"{target}.{n}", []) for n in submodules)
        rest = [n for n in names if n not in submodules]
        if rest:
            out.append((target, rest))
    return out


def graph() -> dict[str, set[str]]:
    result: dict[str, set[str]] = {}
    for name, module in MODULES.items():
        deps = set()
        for target, _names in edges(module):
            # importing a package runs its __init__; a package's own __init__
            # importing its members is the package being built, not a cycle.
            if target in MODULES and target != name:
                deps.add(target)
        result[name] = deps
    return result


def find_cycles(deps: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strongconnect(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(deps.get(node, ())):
            if nxt not in index:
                strongconnect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(deps):
        if node not in index:
            strongconnect(node)
    return cycles


def test_no_import_cycles() -> None:
    deps = graph()
    # The top-level package re-exports every block, and blocks import leaf
    # modules of the package, never "oxypy" itself: leave the root out.
    deps = {k: {d for d in v if d != "oxypy"} for k, v in deps.items() if k != "oxypy"}
    assert find_cycles(deps) == []


def test_find_cycles_sees_a_cycle() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_anothers_private_names() -> None:
    offenders = []
    for name, module in MODULES.items():
        for target, names in edges(module):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != name:
                offenders.append(f"{name} imports {', '.join(private)} from {target}")
    assert offenders == []


@pytest.mark.parametrize("sub", SUBPACKAGES)
def test_subpackages_exist_and_are_documented(sub: str) -> None:
    assert (PACKAGE / sub / "__init__.py").is_file()
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    assert f"## {sub}" in doc
    section = doc.split(f"## {sub}", 1)[1].split("\n## ", 1)[0]
    assert "to be completed" not in section
    for path in sorted((PACKAGE / sub).glob("*.py")):
        if path.name != "__init__.py":
            assert path.name in doc, f"docs/architecture.md does not mention {sub}/{path.name}"


def test_private_modules_live_in_subpackages() -> None:
    top = [p.name for p in PACKAGE.glob("_*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert top == []
