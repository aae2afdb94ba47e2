"""Sections of ``RESULTS.md`` that other benchmarks write, between markers, and that a new report
from ``bench/run.py`` keeps.

A section is ``<!-- section NAME -->`` ... ``<!-- end NAME -->``. ``write`` replaces the section
of that name in a report (or adds it before the analysis); ``carry`` copies every section of the
old report into a freshly rendered one, so each benchmark's figures stay until it runs again.
"""

from __future__ import annotations

import re
from pathlib import Path

_SECTION = re.compile(r"<!-- section (?P<name>[\w-]+) -->\n.*?<!-- end (?P=name) -->\n", re.S)
_ANALYSIS = "\n## Analysis"


def _insert(report: str, block: str) -> str:
    """``block`` before the report's analysis, else at its end."""
    at = report.find(_ANALYSIS)
    if at < 0:
        return report.rstrip("\n") + "\n\n" + block
    return report[: at + 1] + block + "\n" + report[at + 1 :]


def write(path: Path, name: str, body: str) -> None:
    """Replace (or add) section ``name`` of the report at ``path`` with ``body`` (Markdown)."""
    block = f"<!-- section {name} -->\n{body.rstrip()}\n<!-- end {name} -->\n"
    report = path.read_text() if path.exists() else ""
    found = [m for m in _SECTION.finditer(report) if m["name"] == name]
    if found:
        report = report[: found[0].start()] + block + report[found[0].end() :]
    else:
        report = _insert(report, block)
    path.write_text(report)


def carry(old: str, new: str) -> str:
    """``new`` with every section of ``old`` that ``new`` lacks."""
    present = {m["name"] for m in _SECTION.finditer(new)}
    for match in _SECTION.finditer(old):
        if match["name"] not in present:
            new = _insert(new, match.group(0))
    return new
