"""External programs some tests run (buf, node, the installed `remoteloss` script).

A program is looked for next to this Python first (a virtual environment's bin/, where
pip puts `buf` from buf-bin and console scripts), then on PATH. Where it is missing, a test
skips with the reason, except under CI (CI=true), where it fails: CI installs everything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


def missing(reason: str) -> None:
    """Skip with ``reason``, or fail under CI."""
    if in_ci():
        pytest.fail(f"{reason} (CI must provide it)")
    pytest.skip(reason)


def find(name: str, hint: str) -> str:
    """The path of program ``name``; skips (fails under CI) when it is not installed."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        missing(f"{name} is not installed ({hint})")
    assert found is not None
    return found


def run(command: Sequence[str], *, input: str | None = None, timeout: float = 60,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a program from the repository root, capturing its text output."""
    return subprocess.run(
        list(command), input=input, capture_output=True, check=False, text=True, timeout=timeout, cwd=ROOT,
        env=None if env is None else {**os.environ, **env},
    )
