"""A bounded load soak against a real server process.

64 threads over 8 SDK clients send REMOTELOSS_SOAK_REQUESTS requests (default 10,000; set it
higher for a longer run, e.g. `REMOTELOSS_SOAK_REQUESTS=200000 pytest -s tests/integration/test_soak.py`)
drawn from a fixed set of distinct requests over eight losses, one in ten of them invalid (a class
index out of range, shapes torch refuses to broadcast). Expected values come from torch on this
process, once per distinct request. Every valid request must get torch's answer, every invalid
one INVALID_ARGUMENT, and nothing else may happen. The server's resident memory (VmRSS) is read
after a warm-up (the first tenth) and at the end: it may grow by at most RSS_GROWTH_BOUND_BYTES.
That bound is a few times what the server holds for the requests in flight at once (64 small
requests, well under 1 MiB together) plus allocator slack; a leak of even 1 KiB per request
would pass it within 64,000 requests. The figures are printed (run with -s) and written to
soak.json in the test's temporary folder.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import remoteloss
import torch
import torch.nn.functional as F

from .server_process import ServerProcess

REQUESTS = int(os.environ.get("REMOTELOSS_SOAK_REQUESTS", "10000"))
THREADS = 64
CLIENTS = 8
RSS_GROWTH_BOUND_BYTES = 64 * 1024 * 1024


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a)


def cases() -> list[tuple[Callable[[Any], Any], Any]]:
    """(call, expected): expected is torch's float value, or an exception class for invalid calls."""
    rng = np.random.default_rng(2024)
    valid: list[tuple[Callable[[Any], Any], Any]] = []
    for i in range(4):
        n = 8 * (i + 1)
        x, y = rng.standard_normal((n, 16)).astype(np.float32), rng.standard_normal((n, 16)).astype(np.float32)
        p = rng.random((n, 16)).astype(np.float32)
        t = rng.integers(0, 16, n)
        logp = np.log(rng.dirichlet(np.ones(16), n)).astype(np.float32)
        valid += [
            (lambda c, x=x, y=y: c.mse_loss(x, y), F.mse_loss(_t(x), _t(y))),
            (lambda c, x=x, y=y: c.l1_loss(x, y, reduction="sum"), F.l1_loss(_t(x), _t(y), reduction="sum")),
            (lambda c, x=x, y=y: c.smooth_l1_loss(x, y, beta=0.5), F.smooth_l1_loss(_t(x), _t(y), beta=0.5)),
            (lambda c, x=x, y=y: c.huber_loss(x, y, delta=2.0), F.huber_loss(_t(x), _t(y), delta=2.0)),
            (lambda c, x=x, t=t: c.cross_entropy(x, t), F.cross_entropy(_t(x), _t(t))),
            (lambda c, x=x, t=t: c.nll_loss(x, t), F.nll_loss(_t(x), _t(t))),
            (
                lambda c, x=x, p=p: c.binary_cross_entropy_with_logits(x, p),
                F.binary_cross_entropy_with_logits(_t(x), _t(p)),
            ),
            (
                lambda c, lp=logp, p=p: c.kl_div(lp, p / p.sum(1, keepdims=True), reduction="batchmean"),
                F.kl_div(_t(logp), _t(p / p.sum(1, keepdims=True)), reduction="batchmean"),
            ),
            (
                lambda c, x=x, y=y: c.value_and_grad("mse_loss", x, y)[1]["input"].sum(),
                (2 * (_t(x) - _t(y)) / x.size).sum(),  # the sum of mse_loss's gradient for input
            ),
        ]
    x = rng.standard_normal((4, 3)).astype(np.float32)
    invalid: list[tuple[Callable[[Any], Any], Any]] = [
        (lambda c: c.cross_entropy(x, np.array([0, 1, 7, 2])), remoteloss.InvalidArgumentError),
        (lambda c: c.mse_loss(x, np.zeros((5, 3), np.float32)), remoteloss.InvalidArgumentError),
    ]
    expected = [(call, float(value) if isinstance(value, torch.Tensor) else value) for call, value in valid]
    return expected + invalid


def test_soak(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, "--grace-period", "5")
    server.start()
    table = cases()
    valid = [i for i, (_, e) in enumerate(table) if isinstance(e, float)]
    invalid = [i for i, (_, e) in enumerate(table) if not isinstance(e, float)]
    # Request k is invalid when k % 10 == 9: one in ten.
    plan = [invalid[k % len(invalid)] if k % 10 == 9 else valid[k % len(valid)] for k in range(REQUESTS)]
    outcomes: Counter[str] = Counter()
    problems: list[str] = []
    lock = threading.Lock()
    next_index = iter(range(REQUESTS))
    rss: dict[str, int] = {"start": server.rss_bytes()}
    clients = [remoteloss.Client(server.target, timeout=60) for _ in range(CLIENTS)]

    def worker(w: int) -> None:
        client = clients[w % CLIENTS]
        for k in next_index:  # one shared iterator: each request index once (next() is atomic under the GIL)
            call, expected = table[plan[k]]
            try:
                value = call(client)
            except remoteloss.LossServiceError as exc:
                ok = not isinstance(expected, float) and isinstance(exc, expected)
                outcome, detail = ("ERROR_OK" if ok else "FAIL"), f"{type(exc).__name__}: {exc.details}"
            else:
                good = isinstance(expected, float) and abs(float(value) - expected) <= 1e-5 * max(1.0, abs(expected))
                outcome, detail = ("OK" if good else "FAIL"), f"request {plan[k]}: {value!r}, expected {expected!r}"
            with lock:
                outcomes[outcome] += 1
                if outcome == "FAIL":
                    problems.append(detail)
                if sum(outcomes.values()) == REQUESTS // 10:
                    rss["warm"] = server.rss_bytes()

    began = time.perf_counter()
    try:
        with ThreadPoolExecutor(THREADS) as pool:
            for future in [pool.submit(worker, w) for w in range(THREADS)]:
                future.result()
        elapsed = time.perf_counter() - began
        rss["end"] = server.rss_bytes()
        rss.setdefault("warm", rss["start"])
        healthy = server.health()
        answered_ok = server.metric("remoteloss_requests_total", code="OK")
    finally:
        for client in clients:
            client.close()
        status = server.stop()
    figures = {
        "requests": REQUESTS,
        "threads": THREADS,
        "clients": CLIENTS,
        "valid_answered_correctly": outcomes["OK"],
        "invalid_rejected_correctly": outcomes["ERROR_OK"],
        "failures": outcomes["FAIL"],
        "seconds": round(elapsed, 1),
        "requests_per_second": round(REQUESTS / elapsed),
        "rss_start_mib": round(rss["start"] / 2**20, 1),
        "rss_after_warmup_mib": round(rss["warm"] / 2**20, 1),
        "rss_end_mib": round(rss["end"] / 2**20, 1),
        "rss_growth_bound_mib": RSS_GROWTH_BOUND_BYTES / 2**20,
        "health_after": healthy,
        "exit_status": status,
    }
    (tmp_path / "soak.json").write_text(json.dumps(figures, indent=2))
    print(f"\nsoak: {json.dumps(figures)}")
    assert not problems, problems[:5]
    assert outcomes["OK"] + outcomes["ERROR_OK"] == REQUESTS
    assert outcomes["ERROR_OK"] == sum(1 for k in range(REQUESTS) if k % 10 == 9)
    assert answered_ok == outcomes["OK"]
    assert healthy == "SERVING" and status == 0
    assert rss["end"] - rss["warm"] <= RSS_GROWTH_BOUND_BYTES, figures
