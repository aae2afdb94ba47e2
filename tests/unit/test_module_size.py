"""The size gate of the SDK (HOUSE_STYLE §1): no module over 400 lines, no function over 60.

A module that outgrows one reason to change is split; a function that outgrows a screen is too.
The generated stubs (remoteloss.v1, remoteloss_server.inference) are not counted; a function's docstring is not counted as
its length. The server and the load generator are held to the same limits.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GATED = [ROOT / "client" / "remoteloss", ROOT / "server" / "remoteloss_bench", ROOT / "server" / "remoteloss_server"]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> list[Path]:
    return sorted(
        path
        for folder in GATED
        for path in folder.rglob("*.py")
        if not {"v1", "inference"} & set(path.relative_to(folder).parts)
    )


@pytest.mark.parametrize("path", _modules(), ids=lambda path: path.relative_to(ROOT).as_posix())
def test_module_and_its_functions_stay_small(path: Path) -> None:
    source = path.read_text()
    lines = source.count("\n")
    assert lines <= MAX_MODULE_LINES, f"{lines} lines: split it by reason to change"
    long = {
        f"{node.name} (line {node.lineno}): {_length(node)} lines"
        for node in ast.walk(ast.parse(source, str(path)))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _length(node) > MAX_FUNCTION_LINES
    }
    assert not long, sorted(long)


def _length(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """The function's lines, its docstring left out."""
    assert node.end_lineno is not None
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str) and len(body) > 1:
        docstring = body[0]
        assert docstring.end_lineno is not None
        return node.end_lineno - node.lineno + 1 - (docstring.end_lineno - docstring.lineno + 1)
    return node.end_lineno - node.lineno + 1


def test_the_gate_sees_the_sdk() -> None:
    names = {path.relative_to(ROOT).as_posix() for path in _modules()}
    assert {"client/remoteloss/_wire/stripping.py", "client/remoteloss/nn.py",
            "server/remoteloss_bench/command.py", "server/remoteloss_server/batcher.py"} <= names
    assert not any("/v1/" in name for name in names)
