"""No module of the package imports another in a cycle (module-level imports, read with ast).

Imports inside functions (deferred, for start-up time or optional packages) and under
``if TYPE_CHECKING:`` are not edges: they run after every module has loaded. A package's
``__init__`` is an edge to what it imports, like any module; importing ``pkg.mod`` also runs
``pkg/__init__``, which is not counted as an edge from ``pkg.mod`` (Python loads the parent first
and the parent's own imports are its own edges)."""

from __future__ import annotations

import ast
from pathlib import Path

import phantomgrad

ROOT = Path(phantomgrad.__file__).parent
PACKAGE = "phantomgrad"


def _module_name(path: Path) -> str:
    parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported: at module level, inside module-level
    try/if blocks, but not inside functions, classes or ``if TYPE_CHECKING:``."""
    found = []

    def visit(body):
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, ast.If):
                test = ast.unparse(node.test)
                if "TYPE_CHECKING" not in test:
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(tree.body)
    return found


def _every_import(tree: ast.Module, type_checking: bool) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, inside functions too; those under ``if TYPE_CHECKING:`` only with ``type_checking``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test) and not type_checking:
                for other in child.orelse:
                    visit_one(other)
                continue
            visit_one(child)

    def visit_one(child: ast.AST) -> None:
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            found.append(child)
        visit(child)

    visit(tree)
    return found


def import_graph(imports=_top_level_imports) -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rsplit(".", 1)[0]
        for node in imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = here
                for _ in range(node.level - 1 if node.level else 0):
                    base = base.rsplit(".", 1)[0]
                base = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                # "from pkg import mod" imports the submodule pkg.mod when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # "import a.b.c" of a name inside a module
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_is_read_correctly():
    graph = import_graph()
    assert "phantomgrad.solvers" in graph["phantomgrad.backward"]
    assert "phantomgrad.train.tasks" in graph["phantomgrad.train.builders"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_in_a_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_cycle_through_deferred_imports_either():
    """Imports inside functions run later, but a cycle through them still ties two modules together (the
    bench's config <-> modes was one): none anywhere in the package."""
    cycle = find_cycle(import_graph(lambda tree: _every_import(tree, type_checking=False)))
    assert cycle is None, "import cycle through a function-level import: " + " -> ".join(cycle)


def test_no_cycle_even_through_type_checking_imports():
    """Not even an annotation-only import (``if TYPE_CHECKING:``) closes a cycle anywhere in the package
    (the bench's measure <-> targets, the solvers' loop <-> broyden, the train wrappers <-> tasks and
    config <-> registry were such cycles; the types they named moved to modules of their own)."""
    cycle = find_cycle(import_graph(lambda tree: _every_import(tree, type_checking=True)))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]  # the same finder sees a two-module cycle
