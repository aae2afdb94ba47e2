"""The type check the house style promises: mypy, strict, on the SDK and the server, with the
configuration in pyproject.toml (generated stubs excepted)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.tools import ROOT, missing


@pytest.mark.timeout(600)
def test_mypy_strict_finds_nothing() -> None:
    try:
        import mypy  # noqa: F401
    except ImportError:
        missing("mypy is not installed (pip install -e './server[test]')")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--cache-dir", str(ROOT / ".mypy_cache")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
