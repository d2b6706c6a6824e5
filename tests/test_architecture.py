"""The shape of the house, read from the imports themselves (with ``ast``, nothing is imported).

Every import counts: at module level, inside functions, and under ``if TYPE_CHECKING:``,
because each is a dependency a reader has to follow. Checked: no import circle between
modules, the directions between packages (config -> trainer -> recorder -> expdb <-
dashboards; studies -> trainer, expdb, dashboards), that the leaf modules
trainer.files and trainer.metrics import nothing of the project, and that a private
room (a module or package whose name starts with one underscore, such as expdb._write)
is imported only from inside the package that holds it (and by the tests).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "expdb", "studies", "dashboards")
PROJECT = PACKAGES + ("bench", "tests")
LEAVES = ("trainer.files", "trainer.metrics")


@dataclass(frozen=True)
class Import:
    source: str        # the importing module, e.g. trainer.loop
    target: str        # the imported project module, e.g. trainer.checkpoints
    line: int

    def __str__(self) -> str:
        return f"{module_path(self.source)}:{self.line} imports {self.target}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_path(name: str) -> str:
    base = ROOT / Path(*name.split("."))
    return str((base / "__init__.py" if base.is_dir() else base.with_suffix(".py")).relative_to(ROOT))


def is_module(name: str) -> bool:
    base = ROOT / Path(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def resolve(source: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The project modules an import statement names (a submodule when ``from X import Y`` names one)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:                                   # relative: from . import x, from ..y import z
        package = source.split(".") if module_path(source).endswith("__init__.py") else source.split(".")[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    return [f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base for alias in node.names]


def project_imports(packages: tuple[str, ...] = PACKAGES) -> list[Import]:
    found = []
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            source = module_name(path)
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    found += [Import(source, target, node.lineno) for target in resolve(source, node)
                              if target.split(".")[0] in PROJECT and target != source]
    return list(dict.fromkeys(found))          # `from x import a, b` is one import of x


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return project_imports()


def find_circles(imports: list[Import]) -> list[list[Import]]:
    """One circle through each group of modules that import each other (Tarjan's strongly
    connected components), as the chain of imports that closes it."""
    graph: dict[str, list[Import]] = {}
    for imp in imports:
        graph.setdefault(imp.source, []).append(imp)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:             # recursion depth is at most the number of modules
        index[node] = low[node] = len(index)
        stack.append(node)
        for imp in graph.get(node, []):
            if imp.target not in index:
                visit(imp.target)
                low[node] = min(low[node], low[imp.target])
            elif imp.target in stack:
                low[node] = min(low[node], index[imp.target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_circle_in(group, graph) for group in groups]


def _circle_in(group: set[str], graph: dict[str, list[Import]]) -> list[Import]:
    """A shortest chain of imports inside ``group`` from its first module back to it."""
    start = min(group)
    paths: dict[str, list[Import]] = {start: []}
    frontier = [start]
    while frontier:
        next_frontier = []
        for node in frontier:
            for imp in graph.get(node, []):
                if imp.target == start:
                    return paths[node] + [imp]
                if imp.target in group and imp.target not in paths:
                    paths[imp.target] = paths[node] + [imp]
                    next_frontier.append(imp.target)
        frontier = next_frontier
    raise AssertionError(f"no circle found in {group}")


def test_no_import_circles(imports):
    circles = find_circles(imports)
    assert not circles, "import circles:\n" + "\n".join(
        " -> ".join([c[0].source] + [imp.target for imp in c]) + "\n    " + "\n    ".join(map(str, c))
        for c in circles)


def allowed(imp: Import) -> bool:
    """The directions between packages."""
    source, target = imp.source.split(".")[0], imp.target.split(".")[0]
    if target in ("bench", "tests"):
        return False                                     # development tools are never imported by the product
    if source == target:
        return True
    if source == "trainer":     # its protocols only (Recorder, Database): expdb is found by entry point
        return False
    if source == "expdb":
        return imp.target in ("trainer.recorder", "trainer.files", "trainer.metrics", "trainer.errors")
    if source == "dashboards":
        return target == "expdb" or imp.target in LEAVES
    if source == "studies":
        return target in ("trainer", "expdb", "dashboards")
    return False


def test_packages_import_each_other_only_in_the_allowed_directions(imports):
    wrong = [imp for imp in imports if not allowed(imp)]
    assert not wrong, "imports against the flow (config -> trainer -> recorder -> expdb <- dashboards; " \
                      "studies -> trainer, expdb, dashboards):\n" + "\n".join(map(str, wrong))


def test_the_leaf_modules_import_nothing_of_the_project(imports):
    wrong = [imp for imp in imports if imp.source in LEAVES]
    assert not wrong, "\n".join(map(str, wrong))


def private_owner(target: str) -> str | None:
    """The package that holds the first private part of ``target`` (expdb._write.rows -> expdb),
    or None when no part of it is private (dunder names such as __main__ are not)."""
    parts = target.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:i])
    return None


def reaches_inside(imp: Import) -> bool:
    """An import of a private room from outside the package that holds it."""
    owner = private_owner(imp.target)
    return owner is not None and imp.source != owner and not imp.source.startswith(owner + ".")


def test_private_rooms_are_entered_only_from_their_own_package():
    """expdb's write path (expdb._write) sits behind expdb's front door: the product and the
    benchmarks use ``expdb`` and its public modules; only the tests reach inside."""
    wrong = [imp for imp in project_imports(PACKAGES + ("bench",)) if reaches_inside(imp)]
    assert not wrong, "private modules imported from outside their package (import the public " \
                      "name from the package's front door instead):\n" + "\n".join(map(str, wrong))


def test_the_private_rule_tells_inside_from_outside():
    assert private_owner("expdb._write.rows") == "expdb" and private_owner("expdb.db") is None
    assert private_owner("trainer.__main__") is None
    assert reaches_inside(Import("studies.runner", "expdb._write.rows", 1))
    assert reaches_inside(Import("expdbx.tool", "expdb._write", 1))
    assert not reaches_inside(Import("expdb.db", "expdb._write.recorder", 1))
    assert not reaches_inside(Import("expdb._write.writer", "expdb._write.rows", 1))
    tree = ast.parse("from .._write import rows\n")
    assert resolve("expdb.mirrors.replay", tree.body[0]) == ["expdb._write.rows"]


def test_the_checker_sees_every_kind_of_import(tmp_path):
    """Function-level and TYPE_CHECKING imports are found, relative ones resolved."""
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from expdb import db\n"
                     "def f():\n    import trainer.metrics\n    from . import files\n")
    found = [t for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
             for t in resolve("trainer.loop", node)]
    assert found == ["typing", "expdb.db", "trainer.metrics", "trainer.files"]
    chain = [Import("a", "b", 1), Import("b", "c", 2), Import("c", "a", 3), Import("c", "d", 4)]
    assert find_circles(chain) == [chain[:3]]
