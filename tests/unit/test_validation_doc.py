"""docs/VALIDATION.md and README's table of losses are generated from the loss catalog and must be current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from remoteloss_server.losses import LOSSES
from remoteloss_server.losses.validation import render

ROOT = Path(__file__).resolve().parents[2]


def test_the_document_is_current() -> None:
    current = (ROOT / "docs" / "VALIDATION.md").read_text(encoding="utf-8")
    assert current == render(), "docs/VALIDATION.md is stale: run `python scripts/gen_validation.py` and commit it"


def test_the_readme_table_of_losses_is_current() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_validation
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    current = (ROOT / "README.md").read_text(encoding="utf-8")
    assert current == gen_validation.readme(current), "README's table of losses is stale: run scripts/gen_validation.py"
    table = current[current.index(gen_validation.BEGIN) : current.index(gen_validation.END)]
    assert [row.split("`")[1] for row in table.splitlines()[3:]] == list(LOSSES)


def test_the_script_checks_it() -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_validation.py"), "--check"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("loss", list(LOSSES))
def test_every_check_says_what_it_checks(loss: str) -> None:
    for check in LOSSES[loss].checks:
        assert (check.__doc__ or "").strip(), f"{loss}: a check without a docstring: {check!r}"


def test_the_readme_links_it() -> None:
    assert "docs/VALIDATION.md" in (ROOT / "README.md").read_text(encoding="utf-8")
