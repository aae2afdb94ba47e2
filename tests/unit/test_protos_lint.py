"""`buf lint` passes on protos/ with the STANDARD rules (protos/buf.yaml)."""

from __future__ import annotations

from tests import tools


def test_buf_lint_passes() -> None:
    buf = tools.find("buf", "pip install buf-bin, part of the test extra")
    result = tools.run([buf, "lint", "protos"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_config_uses_standard_rules() -> None:
    text = (tools.ROOT / "protos" / "buf.yaml").read_text()
    assert "version: v2" in text
    assert "- STANDARD" in text
