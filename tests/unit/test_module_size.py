"""The size gate of the SDK (HOUSE_STYLE §1): no module over 400 lines, no function over 60.

A module that outgrows one reason to change is split; a function that outgrows a screen is too.
The generated stubs (remoteloss.v1) are not counted. The load generator, in the server's
distribution, is held to the same limits. The server's own modules are not gated here yet.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GATED = [ROOT / "client" / "remoteloss", ROOT / "server" / "remoteloss_bench"]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> list[Path]:
    return sorted(
        path
        for folder in GATED
        for path in folder.rglob("*.py")
        if "v1" not in path.relative_to(folder).parts
    )


@pytest.mark.parametrize("path", _modules(), ids=lambda path: path.relative_to(ROOT).as_posix())
def test_module_and_its_functions_stay_small(path: Path) -> None:
    source = path.read_text()
    lines = source.count("\n")
    assert lines <= MAX_MODULE_LINES, f"{lines} lines: split it by reason to change"
    long = {
        f"{node.name} (line {node.lineno}): {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(ast.parse(source, str(path)))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    }
    assert not long, sorted(long)


def test_the_gate_sees_the_sdk() -> None:
    names = {path.relative_to(ROOT).as_posix() for path in _modules()}
    assert {"client/remoteloss/_wire/stripping.py", "client/remoteloss/nn.py",
            "server/remoteloss_bench/command.py"} <= names
    assert not any("/v1/" in name for name in names)
