"""Tenants end to end: fair shares of compute, a light tenant beside a heavy one, and SIGHUP's
reload of keys and certificates, against real server processes (``ServerProcess``).

The load runs in processes of its own (``tenant_load``), so that the light caller measuring its
latency here (``attack.Bystander``) shares its GIL with no load thread. Figures are printed at
the end of the run, as the adversarial suite's are (``conftest.py``).
"""

from __future__ import annotations

import logging
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import remoteloss
from grpc_health.v1 import health_pb2, health_pb2_grpc
from remoteloss import codec
from remoteloss.v1 import loss_pb2 as pb
from remoteloss_server.app import ServerThread
from remoteloss_server.config import ServerConfig
from remoteloss_server.metrics import LATENCY_BUCKETS

from tests.pki import make_pki

from .attack import Bystander, Figures, RssSampler, Watch
from .server_process import ServerProcess

KEYS = {tenant: f"{tenant}-key-0123456789abcdef" for tenant in ("alice", "bob", "carol")}
COMPUTE = "/remoteloss.v1.LossService/Compute"
SHARE_ELEMENTS = 250_000  # per tensor: 2 MB requests, each computed alone (over max_batch_elements)
HEAVY_ELEMENTS = 1_000_000  # per tensor: 4 MB of input (8 MB requests), 4 MB of gradient back
HEAVY_CALLERS = 64
# The light calls' end-to-end p99 beside the heavy tenant may exceed (unloaded p99 + one heavy
# compute) by the server's event loop and GIL time spent on the heavy tenant's bytes (receiving,
# parsing and answering its requests, about as much as their compute on a CPU): measured 10 to
# 40 ms on 2 shared cores on grpc.aio's front; on the native front, which copies each 8 MB request
# into Python bytes on the loop's thread, one fresh-clone run in five needed 69 ms (the rest
# passed under 50), and a later one 85 ms (p99 137.5 ms against 2.2 unloaded and a 50 ms heavy
# compute bucket; other runs of that day 31.6-97.6 ms end to end). The allowance is what the tail
# showed, not a cause located; a light call queued behind the heavy tenant would wait its 64
# calls, seconds. The batcher's own part, the light calls' wait in its queue, is checked without
# it. Inside the heavy tenant, light calls of another loss form a group of their own (on
# a CPU a group is a loss: each call computes as alone), which takes turns with the heavy loss's
# batches: they too wait one or two heavy batches, not behind the heavy tenant's whole queue.
LOOP_ALLOWANCE_S = 0.12


def bearer(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEYS[tenant]}"),)


class Load:
    """``tenant_load`` in a subprocess: ``callers`` calls in flight until ``close()``."""

    def __init__(self, server: ServerProcess, tenant: str, callers: int, elements: int, *extra: str) -> None:
        argv = [sys.executable, "-m", "tests.integration.tenant_load", server.target, KEYS[tenant], str(callers),
                str(elements), *extra]
        root = Path(__file__).resolve().parents[2]
        self.process = subprocess.Popen(argv, cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None and self.process.stdout.readline().strip() == "ready"

    def close(self) -> str:
        """Close its stdin, which stops it; its ``calls=N errors=M`` line."""
        summary, _ = self.process.communicate(timeout=60)
        assert self.process.returncode == 0, summary
        return str(summary).strip()


def light_calls(server: ServerProcess, tenant: str, seconds: float) -> Bystander:
    """Small mse_loss calls with ``tenant``'s key for ``seconds``, each checked against torch."""
    bystander = Bystander(server.target, metadata=bearer(tenant)).start()
    time.sleep(seconds)
    bystander.stop()
    assert not bystander.problems, bystander.problems[:5]
    return bystander


def buckets(server: ServerProcess, name: str, **labels: str) -> list[float]:
    """The cumulative counts of histogram ``name``, one per bound of ``LATENCY_BUCKETS`` and +Inf."""
    bounds = [*map(str, LATENCY_BUCKETS), "+Inf"]
    return [server.metric(f"{name}_bucket", le=bound, **labels) for bound in bounds]


def p99_bound_s(before: list[float], after: list[float]) -> float:
    """The upper bound of the bucket holding the 99th percentile of what was observed in between."""
    counts = [b - a for a, b in zip(before, after, strict=True)]
    for bound, count in zip([*LATENCY_BUCKETS, float("inf")], counts, strict=True):
        if count >= 0.99 * counts[-1]:
            return bound
    return float("inf")


def _bucket_after(bound_s: float) -> float:
    """The next bound of ``LATENCY_BUCKETS`` after ``bound_s`` (+Inf after the last)."""
    return next((bound for bound in LATENCY_BUCKETS if bound > bound_s), float("inf"))


def percentiles(bystander: Bystander) -> str:
    ordered = sorted(bystander.latencies)
    at = [ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3 for q in (0.5, 0.9, 0.99)]
    return f"p50/p90/p99 {at[0]:.1f}/{at[1]:.1f}/{at[2]:.1f} ms over {len(ordered)} calls"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("tenants")
    keys = folder / "api-keys"
    keys.write_text("".join(f"{tenant}:{key}\n" for tenant, key in KEYS.items()))
    server = ServerProcess(folder, "--api-keys-file", str(keys), "--tenant-weights", "alice=3,bob=1")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_what_the_server_started_with_is_out_of_the_garbage_collectors_sight(keyed: ServerProcess) -> None:
    """A full collection of a started server's heap (torch, gRPC, the server: over 200,000
    objects) held the event loop about 90 ms, a few times a minute under load: the light
    tenant's tail below. The server freezes that heap once it serves."""
    frozen = re.search(r"event=gc_frozen objects=(\d+)", keyed.log.read_text())
    assert frozen is not None and int(frozen.group(1)) > 100_000, keyed.log.read_text()[-2000:]


def test_tenants_share_compute_by_weight_and_a_light_one_is_not_held_up(keyed: ServerProcess) -> None:
    figures = Figures("tenants: 3:1 shares, a light tenant beside 64 heavy callers")
    rss = RssSampler(keyed).start()
    # (a) Two tenants keep the server saturated with calls of one size; weights 3:1.
    loads = [Load(keyed, "alice", 6, SHARE_ELEMENTS), Load(keyed, "bob", 6, SHARE_ELEMENTS)]
    try:
        time.sleep(1.0)
        before = [keyed.metric("remoteloss_tenant_compute_seconds_total", tenant=t) for t in ("alice", "bob")]
        time.sleep(6.0)
        after = [keyed.metric("remoteloss_tenant_compute_seconds_total", tenant=t) for t in ("alice", "bob")]
    finally:
        summaries = [load.close() for load in loads]
    alice, bob = (b - a for a, b in zip(before, after, strict=True))
    share = alice / (alice + bob)
    figures.notes.append(f"weights 3:1 -> alice {share:.1%} of {alice + bob:.2f} s compute in 6 s ({summaries})")

    # (b) A light tenant's small calls, unloaded, beside a heavy tenant, and as the heavy tenant's own.
    unloaded = light_calls(keyed, "carol", 2.0)
    heavy = Load(keyed, "bob", HEAVY_CALLERS, HEAVY_ELEMENTS, "distinct")
    try:
        deadline = time.monotonic() + 30
        while keyed.metric("remoteloss_queue_depth") < HEAVY_CALLERS // 2:  # the heavy tenant's queue has formed
            assert time.monotonic() < deadline, "the heavy tenant's calls never queued"
            time.sleep(0.05)
        # The light calls are the only mse_loss calls: their wait in the batcher has its own series.
        compute_before = buckets(keyed, "remoteloss_compute_duration_seconds", loss="l1_loss")
        queue_before = buckets(keyed, "remoteloss_queue_duration_seconds", loss="mse_loss")
        fair = light_calls(keyed, "carol", 4.0)
        queue_after = buckets(keyed, "remoteloss_queue_duration_seconds", loss="mse_loss")
        compute_after = buckets(keyed, "remoteloss_compute_duration_seconds", loss="l1_loss")
        fcfs = light_calls(keyed, "bob", 4.0)  # in the heavy tenant: its groups take turns
        fcfs_queue_after = buckets(keyed, "remoteloss_queue_duration_seconds", loss="mse_loss")
    finally:
        figures.notes.append(f"heavy load {heavy.close()}")
    heavy_compute_s = p99_bound_s(compute_before, compute_after)
    light_queue_s = p99_bound_s(queue_before, queue_after)
    fcfs_queue_s = p99_bound_s(queue_after, fcfs_queue_after)
    figures.notes.append(
        f"light calls unloaded {percentiles(unloaded)}; beside 64 heavy callers {percentiles(fair)}, their wait "
        f"in the batcher p99 <= {light_queue_s * 1e3:g} ms; in the heavy tenant {percentiles(fcfs)}, "
        f"waiting p99 <= {fcfs_queue_s * 1e3:g} ms; heavy compute p99 <= {heavy_compute_s * 1e3:g} ms"
    )
    rss.stop()
    figures.rss_before, figures.rss_peak, figures.rss_after = rss.before, rss.peak, keyed.rss_bytes()
    figures.slowest_s, figures.bystander_calls = fair.slowest_s, fair.calls
    Watch.report.append(figures)
    assert abs(share - 0.75) <= 0.075, figures.line()
    assert light_queue_s <= heavy_compute_s, figures.line()  # behind the batch computing, no more
    # Turns with the heavy loss's batches: the batch computing when the call came, and the heavy
    # group's turn if it was chosen before the light group's; histogram buckets are ~2x apart.
    assert fcfs_queue_s <= _bucket_after(heavy_compute_s), figures.line()
    assert fair.p99_s() <= unloaded.p99_s() + heavy_compute_s + LOOP_ALLOWANCE_S, figures.line()


# ------------------------------------------------------------------------------------ SIGHUP


def tls_channel(target: str, ca: Path) -> grpc.Channel:
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(ca.read_bytes()))


def compute(channel: grpc.Channel, tenant: str, request: bytes, timeout: float = 30) -> None:
    channel.unary_unary(COMPUTE)(request, metadata=bearer(tenant), timeout=timeout)


def small_request() -> bytes:
    x = np.ones((2, 3), np.float32)
    return pb.ComputeRequest(mse_loss=pb.MseLoss(input=codec.encode(x), target=codec.encode(x))).SerializeToString()


def wait_serving_tls(server: ServerProcess, ca: Path) -> None:
    deadline = time.monotonic() + 90
    with tls_channel(server.target, ca) as channel:
        while True:
            assert server.alive(), server.log.read_text()
            try:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                return
            except grpc.RpcError:
                assert time.monotonic() < deadline, server.log.read_text()
                time.sleep(0.1)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_sighup_reloads_keys_and_certificate_with_calls_in_flight(tmp_path: Path) -> None:
    old, new = make_pki(tmp_path / "old"), make_pki(tmp_path / "new")
    cert, key, keys = tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "api-keys"
    shutil.copy(old.server_cert, cert)
    shutil.copy(old.server_key, key)
    keys.write_text(f"alice:{KEYS['alice']}\nbob:{KEYS['bob']}\n")
    server = ServerProcess(tmp_path, "--api-keys-file", str(keys), "--tls-cert", str(cert), "--tls-key", str(key))
    server.start(wait=False)
    try:
        wait_serving_tls(server, old.ca)
        small = small_request()
        failures: list[str] = []
        stop = threading.Event()

        def alice_loop(channel: grpc.Channel) -> None:  # on a connection opened before the reload
            while not stop.is_set():
                try:
                    compute(channel, "alice", small)
                except grpc.RpcError as exc:
                    failures.append(f"alice: {exc.code()}")  # type: ignore[attr-defined]
                except ValueError:  # the channel closed: the test failed and left
                    return

        with tls_channel(server.target, old.ca) as open_channel:
            compute(open_channel, "alice", small)
            alice = threading.Thread(target=alice_loop, args=(open_channel,))
            alice.start()
            # bob's stream: open (authenticated at its start) with calls in flight when his key goes
            x = np.ones((1000, 1000), np.float32)
            bob = remoteloss.Client(server.target, root_certificates=old.ca, api_key=KEYS["bob"])
            stream = bob.stream()
            before = [stream.l1_loss(x, x * 0.5) for _ in range(8)]
            before[0].result()
            keys.write_text(f"alice:{KEYS['alice']}\ncarol:{KEYS['carol']}\n")  # bob goes, carol comes
            shutil.copy(new.server_cert, cert)
            shutil.copy(new.server_key, key)
            server.signal(signal.SIGHUP)
            with tls_channel(server.target, new.ca) as channel:  # new connections: the new certificate
                deadline = time.monotonic() + 30
                while True:
                    try:
                        compute(channel, "carol", small)
                        break
                    except grpc.RpcError:
                        assert time.monotonic() < deadline, server.log.read_text()[-2000:]
                        time.sleep(0.05)
                with pytest.raises(grpc.RpcError) as refused:
                    compute(channel, "bob", small)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
            after = [stream.l1_loss(x, x * 0.5) for _ in range(8)]
            assert all(call.result() == pytest.approx(0.5) for call in before + after)  # none failed
            stream.close()
            bob.close()
            with tls_channel(server.target, old.ca) as channel, pytest.raises(grpc.RpcError) as untrusted:
                compute(channel, "alice", small, timeout=10)  # the old CA does not sign the new certificate
            assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]

            keys.write_text("alice:short\n")  # unusable: the keys stay as they were
            server.signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while "what=api_keys status=failed" not in server.log.read_text():
                assert time.monotonic() < deadline
                time.sleep(0.05)
            with tls_channel(server.target, new.ca) as channel:
                compute(channel, "carol", small)
            stop.set()
            alice.join()
            compute(open_channel, "alice", small)  # the connection opened before both reloads
        assert not failures, failures[:5]
        log = server.log.read_text()
        assert "event=reload what=api_keys status=ok tenants=2 keys=2" in log
        assert "event=reload what=tls status=ok" in log
        assert KEYS["carol"] not in log and "short" not in log
    finally:
        server.stop()


def test_server_thread_reload_keeps_the_old_keys_when_the_file_is_bad(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = tmp_path / "api-keys"
    keys.write_text(f"alice:{KEYS['alice']}\n")
    config = ServerConfig(port=0, host="127.0.0.1", device="cpu", metrics_port=0, http_port=0, api_keys_file=str(keys))
    with caplog.at_level(logging.INFO), ServerThread(config) as server:
        with grpc.insecure_channel(server.target) as channel:
            keys.write_text(f"alice:{KEYS['alice']}\nbob:{KEYS['bob']}\n")
            assert server.reload()
            compute(channel, "bob", small_request())
            keys.unlink()
            assert not server.reload()
            compute(channel, "bob", small_request())
    failed = [r for r in caplog.records if "event=reload what=api_keys status=failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].levelno == logging.ERROR and "No such file" in failed[0].getMessage()


def test_a_reload_without_keys_or_tls_says_so(caplog: pytest.LogCaptureFixture) -> None:
    config: Any = ServerConfig(port=0, host="127.0.0.1", device="cpu", metrics_port=0, http_port=0, tenant_weights=(("alice", 2.0),))
    with caplog.at_level(logging.INFO), ServerThread(config) as server:
        assert server.reload()
    messages = [r.getMessage() for r in caplog.records]
    assert any("event=reload what=nothing" in m for m in messages)
    assert any(m.startswith("event=tenant_weights_unknown tenants=alice ") for m in messages)
