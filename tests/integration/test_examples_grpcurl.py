"""examples/grpcurl.md stays true: each `buf curl` line of it runs against the test server, and
each answer it prints (the json block after a call, or the `Message:` of an error) is checked.
The grpcurl lines carry the same request bodies.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

import pytest

from tests import tools
from tests.catalog import LOSS_NAMES

DOC = tools.ROOT / "examples" / "grpcurl.md"
ADDRESS = "localhost:50051"


def blocks() -> list[tuple[str, str]]:
    """The fenced blocks of the page, in order: (language, text)."""
    return re.findall(r"^```(\w*)\n(.*?)^```", DOC.read_text(), flags=re.DOTALL | re.MULTILINE)


def calls() -> list[tuple[list[str], str | None, str]]:
    """(buf curl argv, the json block printed after it or None, the block's text)."""
    found = []
    fenced = blocks()
    for index, (language, text) in enumerate(fenced):
        if language != "sh":
            continue
        after = fenced[index + 1] if index + 1 < len(fenced) else ("", "")
        for line in text.splitlines():
            if line.startswith("buf curl"):
                expected = after[1] if after[0] == "json" else None
                found.append((shlex.split(line, comments=True), expected, text))
    return found


def test_the_page_has_calls_to_check() -> None:
    assert sum(1 for _, expected, _ in calls() if expected is not None) == 2
    grpcurl_bodies = re.findall(r"^grpcurl .* -d '(.*?)' ", DOC.read_text(), flags=re.MULTILINE)
    curl_bodies = [argv[argv.index("-d") + 1] for argv, _, _ in calls() if "-d" in argv]
    assert grpcurl_bodies == curl_bodies  # the grpcurl and buf curl lines send the same requests


@pytest.mark.parametrize("call", calls(), ids=lambda call: " ".join(call[0])[-60:])
def test_documented_call(call: tuple[list[str], str | None, str], server: Any) -> None:
    argv, expected, text = call
    buf = tools.find("buf", "pip install buf-bin, part of the test extra")
    argv = [buf, *(arg.replace(ADDRESS, server.target) for arg in argv[1:])]
    result = tools.run(argv)
    error = re.search(r"#\s+Message: (.*)", text)
    if error is not None:  # the block shows a failing call
        assert result.returncode != 0
        assert json.loads(result.stderr) == {"code": "invalid_argument", "message": error.group(1)}
    elif "--list-methods" in argv:
        assert result.returncode == 0, result.stderr
        assert "remoteloss.v1.LossService/Compute" in result.stdout.split()
    elif expected is not None:
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == json.loads(expected)
    else:  # ListLosses
        assert result.returncode == 0, result.stderr
        assert [loss["name"] for loss in json.loads(result.stdout)["losses"]] == list(LOSS_NAMES)
