"""The backward-mode registry: one source of names, each mode's declared config keys, no import cycles."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import phantomgrad as pg


def test_every_mode_is_registered_once_and_reachable_by_name():
    assert set(pg.BACKWARD_MODES) == {"implicit", "upg", "npg", "jfb", "backprop", "adaptive", "shine", "gdeq"}
    assert pg.BACKWARD_MODES["adaptive"] is pg.AdaptivePhantom
    assert len(set(pg.BACKWARD_MODES.values())) == len(pg.BACKWARD_MODES)
    for name, cls in pg.BACKWARD_MODES.items():
        assert issubclass(cls, pg.BackwardMode)
        assert type(pg.make_backward(name)) is cls


@pytest.mark.parametrize("name", sorted(pg.BACKWARD_MODES))
def test_config_keys_are_init_arguments_with_defaults(name):
    cls = pg.BACKWARD_MODES[name]
    params = inspect.signature(cls).parameters
    assert isinstance(cls.config_keys, tuple) and len(set(cls.config_keys)) == len(cls.config_keys)
    for key in cls.config_keys:
        assert key in params and params[key].default is not inspect.Parameter.empty, key
    # every __init__ argument is declared: the config can set all of them
    assert set(params) == set(cls.config_keys)


def test_make_backward_takes_exactly_the_declared_keys():
    mode = pg.make_backward("upg", k=3, damping=0.7)
    assert (mode.k, mode.damping) == (3, 0.7)
    implicit = pg.make_backward("implicit", solver=pg.FixedPoint(max_iter=7))
    assert isinstance(implicit.solver, pg.FixedPoint)
    with pytest.raises(ValueError, match=r"'jfb' does not take 'k'; it takes: no options"):
        pg.make_backward("jfb", k=2)
    with pytest.raises(ValueError, match=r"does not take 'kk'; it takes: k, damping"):
        pg.make_backward("npg", kk=2)
    with pytest.raises(ValueError, match="choose one of"):
        pg.make_backward("upgg")


def test_backward_mode_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        pg.BackwardMode()

    class Incomplete(pg.BackwardMode):
        pass

    with pytest.raises(TypeError, match="attach"):
        Incomplete()


def _module_level_imports(path: Path, package: str) -> set[str]:
    """The phantomgrad modules that ``path`` imports when it is imported (not inside functions)."""
    tree = ast.parse(path.read_text())
    found = set()
    body = list(tree.body)
    while body:
        node = body.pop(0)
        if isinstance(node, (ast.If, ast.Try)):  # e.g. `if TYPE_CHECKING:` is skipped, try bodies count
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            handlers = [h for hd in getattr(node, "handlers", []) for h in hd.body]
            body.extend(node.body + getattr(node, "orelse", []) + handlers)
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("phantomgrad"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("phantomgrad"))
    return found


def test_no_import_cycle_among_the_core_modules():
    root = Path(pg.__file__).parent
    modules = {f"phantomgrad.{p.stem}": p for p in root.glob("*.py") if p.stem not in ("__init__", "__main__")}
    graph = {
        m: {t for t in _module_level_imports(p, "phantomgrad") if t in modules and t != m} for m, p in modules.items()
    }

    def visit(node, stack):
        assert node not in stack, f"import cycle: {' -> '.join(stack + [node])}"
        for nxt in graph[node]:
            visit(nxt, stack + [node])

    for module in graph:
        visit(module, [])
    assert "phantomgrad.modes" not in graph["phantomgrad.backward"] | graph["phantomgrad.adaptive"]
