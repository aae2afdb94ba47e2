"""``PEERS.md`` from the measurements of ``bench/peers.py``: the machine, the versions, the
commands, and each server's figure per workload with its ratio to remoteloss's in the same round."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

REFERENCE = "remoteloss"


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    elements: int
    callers: int
    metric: str  # "p50_ms" (lower is better) or "rps" (higher is better)

    @property
    def unit(self) -> str:
        return "ms" if self.metric == "p50_ms" else "req/s"


WORKLOADS = (
    Workload("A", "A: 1,000 elements, 1 caller, p50", 1_000, 1, "p50_ms"),
    Workload("B", "B: 1,000 elements, 64 callers, req/s", 1_000, 64, "rps"),
    Workload("C", "C: 1,000,000 elements, 1 caller, p50", 1_000_000, 1, "p50_ms"),
)


# How each server is set up and called (peer_serve.py, peer_load.py); one line each in PEERS.md.
SETUPS = (
    "remoteloss: `remoteloss_server` with its defaults (batching on, at most 64 a batch, no added delay); "
    "each caller has its own `remoteloss.Client` and calls `client.value_and_grad(\"mse_loss\", x, y, "
    "wrt=(\"input\",))` with numpy arrays; `remoteloss stream`: the 64 callers share one `client.stream()` "
    "on the same server; `--no-batching`: each request alone.",
    "pytriton: model `mse_loss` bound with `@batch` and Triton's dynamic batcher (`max_batch_size=64`, "
    "`max_queue_delay_microseconds=0`), or `ModelConfig(batching=False)`; each caller has its own "
    "`tritonclient.grpc.InferenceServerClient` and calls `infer` on the gRPC port (FP32 `input`, `target`).",
    "ray: one Serve replica, `max_ongoing_requests=256` (the default of 5 would cap a batch at 5), "
    "`@serve.batch(max_batch_size=64, batch_wait_timeout_s=0)` or no batching, access log off; "
    "each caller has its own `requests.Session` and POSTs the raw float32 bytes of input and target.",
    "litserve: one worker, `LitAPI(max_batch_size=64, batch_timeout=0)` or no batching, log level warning; "
    "each caller has its own `requests.Session` and POSTs JSON with base64 float32 (LitServe parses "
    "requests as JSON).",
)


def summarize(records: Sequence[dict[str, Any]], workload: Workload, server: str) -> dict[str, Any] | None:
    """The server's figures over the rounds (median, low, high) and its ratio to remoteloss.

    The ratio is the median over rounds of (figure / remoteloss's figure in the same round); None
    when the server has no figure for this workload; ``error`` holds its first failure, if any.
    """
    mine = [r for r in records if r["workload"] == workload.key and r["server"] == server]
    if not mine:
        return None
    reference = {r["round"]: r[workload.metric] for r in records
                 if r["workload"] == workload.key and r["server"] == REFERENCE and workload.metric in r}
    figures = [r[workload.metric] for r in mine if workload.metric in r]
    ratios = [r[workload.metric] / reference[r["round"]] for r in mine
              if workload.metric in r and reference.get(r["round"])]
    errors = [r["error"] for r in mine if "error" in r]
    return {
        "median": statistics.median(figures) if figures else None,
        "low": min(figures, default=None),
        "high": max(figures, default=None),
        "ratio": statistics.median(ratios) if ratios else None,
        "rounds": len(figures),
        "error": errors[0] if errors else None,
    }


def _figure(value: float, unit: str) -> str:
    if unit == "req/s":
        return f"{value:,.0f}"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def cell(summary: dict[str, Any] | None, workload: Workload) -> str:
    """``1.23 ms (0.98–1.40) · 2.10×``; ``failed`` or ``—`` where there is no figure."""
    if summary is None:
        return "—"
    if summary["median"] is None:
        return "failed"
    text = f"{_figure(summary['median'], workload.unit)} {workload.unit}"
    if summary["rounds"] > 1:
        text += f" ({_figure(summary['low'], workload.unit)}–{_figure(summary['high'], workload.unit)})"
    if summary["ratio"] is not None:
        text += f" · {summary['ratio']:.2f}×"
    if summary["error"]:
        text += " (some rounds failed)"
    return text


def table(records: Sequence[dict[str, Any]], servers: Sequence[str]) -> list[str]:
    """One row per server, one column per workload."""
    lines = ["| server | " + " | ".join(w.title for w in WORKLOADS) + " |",
             "|---|" + "---|" * len(WORKLOADS)]
    for server in servers:
        cells = [cell(summarize(records, w, server), w) for w in WORKLOADS]
        if all(c == "—" for c in cells):
            continue
        lines.append(f"| {server} | " + " | ".join(cells) + " |")
    return lines


def failures(records: Sequence[dict[str, Any]], failed_servers: dict[str, str]) -> list[str]:
    """A line per server that did not start, and per failed measurement."""
    lines = [f"- {server} did not start: {reason}" for server, reason in failed_servers.items()]
    for r in records:
        if "error" in r:
            lines.append(f"- {r['server']}, workload {r['workload']}, round {r['round'] + 1}: {r['error']}")
    return lines


def _busy(machine: dict[str, Any]) -> bool:
    try:
        return float(str(machine["load"]).split()[0]) > 0.5 * float(machine["cpus"])
    except (KeyError, ValueError, IndexError, TypeError):
        return False


def render(meta: dict[str, Any], records: Sequence[dict[str, Any]], servers: Sequence[str],
           commands: Sequence[str], failed_servers: dict[str, str]) -> str:
    """The whole of PEERS.md."""
    machine, versions = meta["machine"], meta["versions"]
    out = [
        "# remoteloss beside other model servers",
        "",
        f"Written by `{meta['command']}` on {meta['date']}, in {meta.get('took_min', 0):.0f} minutes"
        f"{' (quick: short rounds, a smoke run; its figures are rough)' if meta.get('quick') else ''}.",
        "",
        "The same job everywhere: float32 `mse_loss` (mean) and the gradient of its input, computed with",
        "torch on one torch thread, answered to callers that are threads of one client process on the same",
        "machine, each through the server's own client. Every server runs on its own free loopback ports",
        "and all of them run for the whole run, but only the one measured is running: the others are",
        "paused (SIGSTOP) during each measurement and resumed after it. Servers and workloads are",
        f"interleaved: {meta['rounds']} rounds, each measuring every server once per workload, in a rotated",
        f"order; {meta['warmup_s']:g} s unrecorded, then {meta['duration_s']:g} s recorded per measurement.",
        "",
        "Each cell: the median over rounds (lowest–highest), then the median over rounds of its ratio to",
        "remoteloss's figure in the same round (`remoteloss`, batching on, unary calls). For p50 a ratio",
        "above 1 means slower than remoteloss; for req/s a ratio below 1 means less throughput.",
        "",
        *table(records, servers),
        "",
        "## The servers",
        "",
        *[f"- {line}" for line in SETUPS],
        "",
        "## Machine",
        "",
        f"- {machine['cpus']} cores, {machine['cpu_model']}; {machine['memory_gib']:.0f} GiB; "
        f"Linux {machine['kernel']}; Python {machine['python']}",
        f"- load average before the run: {machine['load']}"
        + (" (a busy machine: treat the figures as provisional)" if _busy(machine) else ""),
        "",
        "## Versions",
        "",
        *[f"- {name}: {', '.join(f'{k} {v}' for k, v in found.items())}" for name, found in versions.items()],
        "",
        "## Commands",
        "",
        "```sh",
        *commands,
        "```",
    ]
    problems = failures(records, failed_servers)
    if problems:
        out += ["", "## Failures", "", *problems]
    return "\n".join(out) + "\n"
