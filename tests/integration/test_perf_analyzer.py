"""Triton's perf_analyzer, unchanged, against a real server: the protocol's plain command over gRPC,
gRPC streaming and HTTP.

perf_analyzer reads the model's metadata, config and statistics before it sends a request, so a
run that completes shows those answers are what it expects. The runs are short (3 windows of 20
requests, `mse_loss` of 1,000 float32); the figures are in bench/RESULTS.md (bench/perf_analyzer.py).
It comes from scripts/install_perf_analyzer.sh (bench/.perf_analyzer/); where it is missing the
tests skip, and fail under CI, which installs it.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .. import tools
from .deploy_files import free_port

PROGRAM = tools.ROOT / "bench" / ".perf_analyzer" / "perf_analyzer"
# Three windows of at least 20 requests each (however slow a busy machine makes them), reported as
# they come (no retries until they agree).
WINDOWS = ["--measurement-mode", "count_windows", "--measurement-request-count", "20",
           "--stability-percentage", "1000", "--max-trials", "3"]


def perf_analyzer() -> str:
    if not (PROGRAM.is_file() and os.access(PROGRAM, os.X_OK)):
        tools.missing("perf_analyzer is not installed (scripts/install_perf_analyzer.sh)")
    return str(PROGRAM)


@pytest.fixture(scope="module")
def oip_server() -> Iterator[Any]:
    """A server with the protocol's REST endpoints on a free port (``oip_server.config.http_port``)."""
    from remoteloss_server.app import ServerThread
    from remoteloss_server.config import ServerConfig

    with ServerThread(ServerConfig(port=0, host="127.0.0.1", device="cpu", metrics_port=0,
                                   http_port=free_port())) as running:
        yield running


def run(arguments: list[str], tmp_path: Path) -> tuple[int, str, list[dict[str, str]]]:
    """perf_analyzer's exit status, its output, and the rows of its CSV report."""
    report = tmp_path / "report.csv"
    done = tools.run([perf_analyzer(), *arguments, "-f", str(report)], timeout=120)
    rows = list(csv.DictReader(report.read_text().splitlines())) if report.exists() else []
    return done.returncode, done.stdout + done.stderr, rows


@pytest.mark.parametrize("mode", ["grpc", "grpc-streaming", "http"])
def test_the_plain_command_measures_mse_loss(oip_server: Any, mode: str, tmp_path: Path) -> None:
    port = oip_server.config.http_port if mode == "http" else oip_server.port
    arguments = ["-m", "mse_loss", "-u", f"127.0.0.1:{port}", "-i", "http" if mode == "http" else "grpc",
                 "--shape", "input:1000", "--shape", "target:1000"]
    if mode == "grpc-streaming":
        arguments.append("--streaming")
    status, output, rows = run(arguments + WINDOWS, tmp_path)
    assert status == 0, output
    assert rows, f"no report:\n{output}"
    assert float(rows[-1]["Inferences/Second"]) > 0, rows
    assert float(rows[-1]["p50 latency"]) > 0, rows


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_an_unknown_model_fails_with_perf_analyzers_exit_status(oip_server: Any, protocol: str,
                                                                tmp_path: Path) -> None:
    """The exit status is perf_analyzer's own (not a wrapper's that drops it), and the server's
    answer for a model it does not serve stops it before any measurement."""
    port = oip_server.config.http_port if protocol == "http" else oip_server.port
    status, output, rows = run(["-m", "no_such_loss", "-u", f"127.0.0.1:{port}", "-i", protocol,
                                "--shape", "input:1000", *WINDOWS], tmp_path)
    assert status != 0, output
    assert not rows
    assert "no_such_loss" in output, output
