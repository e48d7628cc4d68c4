"""The package's shape rules that ruff cannot state (docs/architecture.md): functions fit on a screen or two,
and no module imports another's private name. Read from the source with `ast`, so they cannot drift."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "clusterar"
MAX_FUNCTION_LINES = 120


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))]


def test_no_function_is_longer_than_a_screen_or_two():
    long = [
        f"{p.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for p, tree in _modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, "functions over {} lines:\n{}".format(MAX_FUNCTION_LINES, "\n".join(long))


def test_no_module_imports_another_modules_private_name():
    private = [
        f"{p.relative_to(PACKAGE.parent)}:{node.lineno} from {'.' * node.level}{node.module or ''} import {a.name}"
        for p, tree in _modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for a in node.names
        if a.name.startswith("_") and not a.name.startswith("__")
    ]
    assert not private, "private names imported across modules:\n" + "\n".join(private)


def test_the_checks_see_the_package():
    """Guards the two tests above against passing on an empty walk."""
    modules = _modules()
    assert len(modules) > 20
    assert any(isinstance(n, ast.FunctionDef) for _, tree in modules for n in ast.walk(tree))
