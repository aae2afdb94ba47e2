"""bench/report.py: the ratios, PASS/FAIL and NOT MEASURED of RESULTS.md, from made-up results."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from tests.bench_modules import load


def _report() -> ModuleType:
    return load("report")


def _summary(p50_s: float, rps: float) -> dict[str, Any]:
    return {"p50_s": p50_s, "p90_s": p50_s, "p99_s": p50_s, "throughput_rps": rps, "requests": 10,
            "rounds": [{"p50_s": p50_s, "throughput_rps": rps}]}


def _results(*, batching: bool, stream: bool) -> dict[str, Any]:
    mib = 1024 * 1024
    latency = {kind: {"echo": _summary(0.001, 1000), "remoteloss": _summary(0.0012, 900), "request_bytes": 8000}
               for kind in ("small", "small_grad")}
    latency["large_grad"] = {"echo": _summary(0.010, 100), "remoteloss": _summary(0.015, 60), "request_bytes": 8 * mib}
    concurrency = {"echo": _summary(0.02, 3000), "remoteloss": _summary(0.03, 2500)}
    if batching:
        concurrency["remoteloss-no-batching"] = _summary(0.04, 2000)
    return {
        "quick": False, "elapsed_s": 100.0, "plan": {"rounds": 3}, "load_average": {"start": [0.1, 0.1, 0.1]},
        "machine": {"cpus": 2, "cpu_model": "cpu", "kernel": "6", "libc": "glibc 2.36", "python": "3.11",
                    "torch": "2", "grpc": "1", "protobuf": "7", "numpy": "2"},
        "local_torch": {name: {"p50_s": 0.0001, "command": "python bench/local_torch.py"}
                        for name in ("small", "small_grad", "large_grad")},
        "latency": latency,
        "concurrency": concurrency,
        "stream": {"window": 64, "pipelined": _summary(0.01, 2000), "lockstep": _summary(0.001, 950),
                   "unary": _summary(0.0011, 900)} if stream else None,
        "big": {"remoteloss": _summary(0.3, 6.0), "request_bytes": 40 * mib, "response_bytes": 20 * mib},
        "memory": {"remoteloss-memory": {"idle_rss_bytes": 200 * mib, "peak_rss_bytes": 1800 * mib,
                                         "in_flight_bytes": 512 * mib, "after_rss_bytes": 900 * mib}},
        "servers": {"echo": "python bench/echo_server.py --port $PORT"},
        "commands": ["remoteloss --target $TARGET bench --shape 1000"],
    }


def test_ratios_and_verdicts() -> None:
    report = _report()
    text, passed = report.render(_results(batching=True, stream=True))
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    small = next(row for name, row in rows.items() if name.startswith("Small request (mse_loss"))
    assert "| 1.09 | ≤ 1.2 |" in small and "**PASS**" in small  # 1.2 ms / (1.0 + 0.1 ms)
    large = next(row for name, row in rows.items() if name.startswith("Large"))
    assert "| 1.49 | ≤ 1.3 |" in large and "**FAIL**" in large
    assert "**PASS**" in next(row for name, row in rows.items() if name.startswith("64 callers, small, one"))
    assert "| 1.25 | ≥ 1.0 |" in next(row for name, row in rows.items() if name.startswith("64 callers, small: batch"))
    assert "| 2.22 | ≥ 2.0 |" in next(row for name, row in rows.items() if name.startswith("One caller"))
    assert "| 3.12 | ≤ 3.0 |" in next(row for name, row in rows.items() if name.startswith("Memory"))  # 1600 / 512
    assert passed is False


def test_memory_given_back_once_quiet_is_its_own_column() -> None:
    report = _report()
    results = _results(batching=True, stream=True)
    text, _ = report.render(results)
    assert "| RSS at the end |\n" in text  # results of a run from before the column: no such column
    results["memory"]["remoteloss-memory"].update(quiet_rss_bytes=300 * 1024 * 1024, quiet_wait_s=5.0)
    text, _ = report.render(results)
    assert "| RSS at the end | RSS 5 s later |" in text
    assert "| 900 MiB | 300 MiB |" in next(line for line in text.splitlines() if line.startswith("| remoteloss-memory"))


def test_missing_features_are_not_measured() -> None:
    report = _report()
    text, _ = report.render(_results(batching=False, stream=False))
    assert text.count("**NOT MEASURED**") == 2
    assert "Streaming: not measured" in text and "--no-batching | not measured" in text
    assert "NOT MEASURED" in report.summary(_results(batching=False, stream=False))


def _sections() -> ModuleType:
    return load("sections")


def test_marked_sections_are_replaced_in_place_and_survive_a_new_report(tmp_path: Path) -> None:
    sections = _sections()
    path = tmp_path / "RESULTS.md"
    path.write_text("# results\n\n## Figures\n\nold figures\n\n## Analysis\n\nwhy\n")
    sections.write(path, "perf-analyzer", "## perf_analyzer\n\nfirst")
    sections.write(path, "protocol-cost", "## cost\n\none")
    sections.write(path, "perf-analyzer", "## perf_analyzer\n\nsecond")
    text = path.read_text()
    assert "first" not in text and text.count("second") == 1
    assert text.index("second") < text.index("one") < text.index("## Analysis"), "in place, before the analysis"
    fresh = "# results\n\n## Figures\n\nnew figures\n\n## Analysis\n\nwhy now\n"
    carried = sections.carry(text, fresh)
    assert "new figures" in carried and "old figures" not in carried and "why now" in carried
    assert carried.index("second") < carried.index("one") < carried.index("## Analysis")
    assert sections.carry(carried, carried) == carried, "a section already there is not added twice"
