"""bench/peers_report.py: the figures, ranges and same-round ratios of PEERS.md, from made-up records."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from tests.bench_modules import load


def _report() -> ModuleType:
    return load("peers_report")


def _records() -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for number, (ours, theirs) in enumerate([(1.0, 3.0), (2.0, 4.0), (1.0, 2.5)]):
        records.append({"round": number, "workload": "A", "server": "remoteloss", "p50_ms": ours})
        records.append({"round": number, "workload": "A", "server": "pytriton", "p50_ms": theirs})
        records.append({"round": number, "workload": "B", "server": "remoteloss", "rps": 1000.0 * ours})
        records.append({"round": number, "workload": "B", "server": "pytriton", "rps": 500.0})
    records.append({"round": 0, "workload": "C", "server": "pytriton", "error": "wrong answer"})
    return records


def test_figures_are_medians_and_ratios_are_taken_within_a_round() -> None:
    report = _report()
    latency = report.summarize(_records(), report.WORKLOADS[0], "pytriton")
    assert latency["median"] == 3.0 and (latency["low"], latency["high"]) == (2.5, 4.0)
    assert latency["ratio"] == 2.5  # median of 3/1, 4/2, 2.5/1: not 3.0 / 1.0
    throughput = report.summarize(_records(), report.WORKLOADS[1], "pytriton")
    assert throughput["ratio"] == 0.5  # median of 0.5, 0.25, 0.5
    assert report.summarize(_records(), report.WORKLOADS[2], "remoteloss") is None


def test_the_table_shows_failures_and_leaves_out_what_was_not_run() -> None:
    report = _report()
    meta = {"command": "python bench/peers.py --quick", "date": "today", "quick": True, "rounds": 3,
            "warmup_s": 1.0, "duration_s": 5.0, "versions": {"pytriton": {"nvidia-pytriton": "0.7.0"}},
            "machine": {"cpus": 2, "cpu_model": "cpu", "memory_gib": 24.0, "kernel": "6", "python": "3.11",
                        "load": "0.1 0.1 0.1"}}
    text = report.render(meta, _records(), ["remoteloss", "remoteloss stream", "pytriton", "ray"],
                         ["python bench/peers.py"], {"ray": "pip install failed"})
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "3.00 ms (2.50–4.00) · 2.50×" in rows["pytriton"] and "| failed |" in rows["pytriton"]
    assert "500 req/s (500–500) · 0.50×" in rows["pytriton"]
    assert "remoteloss stream" not in rows and "ray" not in rows
    assert "- ray did not start: pip install failed" in text
    assert "- pytriton, workload C, round 1: wrong answer" in text
    assert "nvidia-pytriton 0.7.0" in text and "smoke run" in text and "provisional" not in text
