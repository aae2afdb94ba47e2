"""Attacks on a shared server, each while a bystander measures its slowest call and the server's
RSS is sampled (``attack.Watch``): callers without a key, compressed bombs, callers that never read
their answers, tenants over their budgets, many connections and slow senders.

The server runs with API keys for two tenants, ``heavy`` and ``light``, and in-flight budgets
small enough for the attacks to meet them on a 2-core CI machine.
"""

from __future__ import annotations

import gzip
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import h2.settings
import numpy as np
import pytest
from remoteloss import codec
from remoteloss.v1 import loss_pb2 as pb
from remoteloss_server import native_front
from remoteloss_server.servicer import LossServicer

from tests import tools

from .attack import BYSTANDER_REQUEST, MiB, Watch, is_open
from .deploy_files import free_port
from .raw_http2 import RawConnection, frame
from .server_process import ServerProcess

HEAVY = "heavy-key-0123456789abcdef"
LIGHT = "light-key-0123456789abcdef"
COMPUTE = "/remoteloss.v1.LossService/Compute"
STREAM = "/remoteloss.v1.LossService/ComputeStream"
MAX_IN_FLIGHT_BYTES = 256 * MiB
TENANT_IN_FLIGHT_BYTES = 128 * MiB
CONNECTION_IN_FLIGHT_BYTES = 128 * MiB
MAX_MESSAGE_BYTES = 256 * MiB
BYSTANDER_BODY = BYSTANDER_REQUEST.SerializeToString()


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("attacks")
    keys = folder / "api-keys"
    keys.write_text(f"heavy:{HEAVY}\nlight:{LIGHT}\n")
    yield from warmed_up(
        folder, "--api-keys-file", str(keys), "--max-message-bytes", str(MAX_MESSAGE_BYTES),
        "--max-in-flight-bytes", str(MAX_IN_FLIGHT_BYTES), "--max-tenant-in-flight-bytes", str(TENANT_IN_FLIGHT_BYTES),
    )


def warmed_up(folder: Path, *flags: str) -> Iterator[ServerProcess]:
    """A server process with ``flags``, warmed up, stopped after the module's tests."""
    process = ServerProcess(folder, "--grace-period", "5", *flags)
    process.start()
    try:
        warm_up(process)
        yield process
    finally:
        process.stop()


def warm_up(server: ServerProcess) -> None:
    """Large calls on every path once (compute threads, helper threads, torch's kernels), so that
    what a server keeps after its first large call (thread arenas and stacks: about 80 MiB here,
    once) is not counted against the first attack."""
    with grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", -1)]) as channel:
        for body in (broadcast_request(3000), mse_request(4 * MiB)):
            raw_compute(channel)(body, timeout=120, metadata=bearer(LIGHT), wait_for_ready=True)


def mse_request(elements: int) -> bytes:
    """A serialized mse_loss request of two float32 tensors of ``elements`` each, built without numpy."""
    data = bytes(4 * elements)
    tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[elements], data=data, requires_grad=True)
    return pb.ComputeRequest(mse_loss=pb.MseLoss(input=tensor, target=tensor)).SerializeToString()


def raw_compute(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(COMPUTE)  # bytes in, bytes out


# Four callers without a key, each sending a 200 MiB request, from a process of their own: in the
# bystander's process their copies of 200 MiB hold its gRPC client back (its slowest call 0.5-0.7 s,
# against 6-10 ms from another process), which would measure the harness, not the server.
_UNKEYED = """
import sys
from concurrent.futures import ThreadPoolExecutor
import grpc
from remoteloss.v1 import loss_pb2 as pb
target, elements = sys.argv[1], int(sys.argv[2])
tensor = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[elements], data=bytes(4 * elements), requires_grad=True)
request = pb.ComputeRequest(mse_loss=pb.MseLoss(input=tensor, target=tensor)).SerializeToString()
def call(_):
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", -1)]) as channel:
        try:
            channel.unary_unary("%s")(request, timeout=60)
        except grpc.RpcError as exc:
            return exc.code().name
        return "OK"
with ThreadPoolExecutor(4) as pool:
    print(" ".join(pool.map(call, range(4))))
""" % COMPUTE


def test_callers_without_a_key_cost_no_more_than_their_headers(server: ServerProcess) -> None:
    """Four 200 MiB calls without a key: refused UNAUTHENTICATED from their headers, unread."""
    with Watch(server, "4 x 200 MiB without a key", metadata=bearer(LIGHT)) as watch:
        began = time.perf_counter()
        attackers = subprocess.run([sys.executable, "-c", _UNKEYED, server.target, str(25 * MiB)],
                                   capture_output=True, text=True, timeout=120, check=False)
        watch.figures.notes.append(f"refused in {time.perf_counter() - began:.2f} s")
    assert attackers.stdout.split() == ["UNAUTHENTICATED"] * 4, attackers.stderr[-2000:]
    assert watch.figures.rss_peak - watch.figures.rss_before < 64 * MiB


def test_a_flood_of_calls_without_a_key_is_not_a_flood_of_log_lines(server: ServerProcess) -> None:
    """2,000 small calls without a key and 2,000 with a bad argument, as fast as they go: each is
    refused (and counted in the metrics), but the server logs at most ``LOG_LINES_PER_S`` lines a
    second of each kind, and the first line after held-back ones says how many it held."""
    from remoteloss_server.log_sampling import LOG_LINES_PER_S

    bad = pb.ComputeRequest(mse_loss=pb.MseLoss(input=codec.encode(np.zeros(3, np.float32)))).SerializeToString()
    start = server.log.stat().st_size
    with Watch(server, "2,000 unkeyed and 2,000 bad calls", metadata=bearer(LIGHT)) as watch:
        with grpc.insecure_channel(server.target) as channel:
            def call(metadata: tuple[tuple[str, str], ...]) -> str:
                try:
                    raw_compute(channel)(bad, timeout=30, metadata=metadata)
                except grpc.RpcError as exc:
                    return exc.code().name  # type: ignore[no-any-return]
                return "OK"

            began = time.monotonic()
            with ThreadPoolExecutor(8) as callers:
                codes = list(callers.map(call, [()] * 2000 + [bearer(HEAVY)] * 2000))
            seconds = time.monotonic() - began
            time.sleep(1.5)  # a second later: the next line would report what was held back
            call_codes = [call(()), call(bearer(HEAVY))]
    with server.log.open("rb") as log:
        log.seek(start)
        lines = log.read().decode(errors="replace").splitlines()
    unauthenticated = [line for line in lines if "event=unauthenticated" in line]
    failed = [line for line in lines if "event=request_failed" in line and "code=INVALID_ARGUMENT" in line]
    watch.figures.notes.append(f"{len(unauthenticated)} + {len(failed)} lines for 4,000 calls in {seconds:.1f} s")
    assert codes.count("UNAUTHENTICATED") == 2000 and codes.count("INVALID_ARGUMENT") == 2000, set(codes)
    assert call_codes == ["UNAUTHENTICATED", "INVALID_ARGUMENT"]
    allowed = LOG_LINES_PER_S * (int(seconds) + 3)  # each second the flood touched, and the last calls'
    assert len(unauthenticated) <= allowed and len(failed) <= allowed, (len(unauthenticated), len(failed), allowed)
    assert any("suppressed=" in line for line in unauthenticated) and any("suppressed=" in line for line in failed)


def test_a_compressed_request_is_refused_before_it_inflates(server: ServerProcess) -> None:
    """Eight gzip bombs (100 MB of zeros each, about 100 KiB on the wire), sent compressed as
    gRPC frames them: refused from their headers, never inflated. The server accepts no
    compression (README, Security)."""
    bomb = gzip.compress(mse_request(50 * 1000 * 1000 // 4), compresslevel=9)  # 2 x 50 MB of zeros
    assert len(bomb) < 256 * 1024
    statuses = []
    with Watch(server, "8 gzip bombs of 100 MB", metadata=bearer(LIGHT)):
        with RawConnection(server.target) as attacker:
            metadata = (*bearer(HEAVY), ("grpc-encoding", "gzip"))
            streams = [attacker.call(COMPUTE, frame(bomb, compressed=True), metadata=metadata) for _ in range(8)]
            statuses = [(attacker.status(stream), attacker.message(stream)) for stream in streams]
    unimplemented = str(grpc.StatusCode.UNIMPLEMENTED.value[0])
    assert all(code == unimplemented and "gzip" in message for code, message in statuses), statuses


def broadcast_request(side: int) -> bytes:
    """16 KiB for ``side=2048``: mse_loss of a (1, side) input and a (side, 1) target with
    reduction "none", whose answer is side * side float32 (16 MiB)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, side)).astype(np.float32)
    y = rng.standard_normal((side, 1)).astype(np.float32)
    message = pb.MseLoss(input=codec.encode(x), target=codec.encode(y), reduction=pb.REDUCTION_NONE)
    return pb.ComputeRequest(mse_loss=message).SerializeToString()


def test_a_caller_that_never_reads_waits_alone(server: ServerProcess) -> None:
    """100 calls of 16 KiB asking for 16 MiB answers, on one connection that never opens its
    window: the answers count against the tenant's budget until gRPC has sent them, so the caller
    gets RESOURCE_EXHAUSTED for its new calls once it holds the tenant's bytes, and no one else
    notices."""
    body = frame(broadcast_request(2048))
    calls = 100
    with Watch(server, "100 x 16 MiB answers never read", metadata=bearer(LIGHT),
               peak_over_bytes=TENANT_IN_FLIGHT_BYTES + 256 * MiB) as watch:
        with RawConnection(server.target, window=0) as attacker:
            streams = [attacker.call(COMPUTE, body, metadata=bearer(HEAVY)) for _ in range(calls)]
            statuses = [attacker.status(stream, timeout_s=0.2) for stream in streams]
            time.sleep(2)  # the answers computed meanwhile wait, unsent
            statuses = [attacker.status(stream, timeout_s=0.05) if s is None else s for s, stream in zip(statuses, streams)]
            refused = [attacker.message(s) for s, code in zip(streams, statuses) if code == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])]
            held = statuses.count(None)
            watch.figures.notes.append(f"{held} answers held unsent, {len(refused)} calls refused")
        time.sleep(1)  # the connection is gone: its held answers go with it
    assert len(refused) + held == calls, statuses
    assert 1 <= held <= TENANT_IN_FLIGHT_BYTES // (16 * MiB) + 1
    assert all("heavy" in message and "max_tenant_in_flight_bytes" in message for message in refused), refused[:3]


def test_a_stream_whose_caller_never_reads_stops_being_computed(server: ServerProcess) -> None:
    """One ComputeStream of 400 requests for 128 KiB answers, on a connection that never opens its
    window. A stream reads requests only while fewer than 64 are unanswered, and an answer counts
    as sent once gRPC has it or, on the native front, once it waits in its call's queue there (16
    answers and 256 KiB at most): the server computes the window and a few more, then waits, and
    no one else notices."""
    x, y = np.ones((1, 181), np.float32), np.ones((181, 1), np.float32)  # "none": 181 x 181 float32, 128 KiB
    loss = pb.L1Loss(input=codec.encode(x), target=codec.encode(y), reduction=pb.REDUCTION_NONE)  # not the bystander's
    body = b"".join(
        frame(pb.ComputeStreamRequest(id=i, request=pb.ComputeRequest(l1_loss=loss)).SerializeToString())
        for i in range(1, 401)
    )
    before = server.metric("remoteloss_requests_total", loss="l1_loss", code="OK")
    with Watch(server, "a stream of 400 x 128 KiB answers never read", metadata=bearer(LIGHT)) as watch:
        attacker = RawConnection(server.target, window=0)
        with ThreadPoolExecutor(1) as pool:
            pool.submit(attacker.call, STREAM, body, metadata=bearer(HEAVY), end=False)
            time.sleep(3)  # as many as the server will compute
            computed = server.metric("remoteloss_requests_total", loss="l1_loss", code="OK") - before
            watch.figures.notes.append(f"{computed:.0f} of 400 computed")
            attacker.close()  # the pending send fails: the server took no more
    window = LossServicer.stream_window
    assert window <= computed <= window + 16 + 1  # the window, front.h's kQueued and the write under way


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """No API keys: a caller is its connection."""
    yield from warmed_up(
        tmp_path_factory.mktemp("open"), "--max-connection-in-flight-bytes", str(CONNECTION_IN_FLIGHT_BYTES)
    )


def test_without_keys_a_caller_that_never_reads_waits_alone_on_its_connection(open_server: ServerProcess) -> None:
    """As above, on a server without keys: the connection's budget is the one that runs out."""
    body = frame(broadcast_request(2048))
    with Watch(open_server, "100 x 16 MiB answers never read, no keys",
               peak_over_bytes=CONNECTION_IN_FLIGHT_BYTES + 256 * MiB) as watch:
        with RawConnection(open_server.target, window=0) as attacker:
            streams = [attacker.call(COMPUTE, body) for _ in range(100)]
            time.sleep(2)
            statuses = [attacker.status(stream, timeout_s=0.05) for stream in streams]
            refused = [attacker.message(s) for s, code in zip(streams, statuses) if code is not None]
            watch.figures.notes.append(f"{statuses.count(None)} answers held unsent, {len(refused)} calls refused")
        time.sleep(1)
    assert refused and all("this connection is saturated" in m for m in refused), refused[:3]
    assert statuses.count(None) <= CONNECTION_IN_FLIGHT_BYTES // (16 * MiB) + 1


def test_slow_senders_hold_little_and_no_one_waits_for_them(server: ServerProcess) -> None:
    """1,000 calls that send 60 KiB of a 1 MiB request and stall (a slowloris), on 10 connections:
    gRPC holds each call's received bytes within its flow-control window, nothing reaches a handler,
    and the bystander does not notice."""
    body = frame(mse_request(128 * 1024))  # 1 MiB
    with Watch(server, "1,000 calls stalled mid-request", metadata=bearer(LIGHT)) as watch:
        connections = [RawConnection(server.target) for _ in range(10)]
        try:
            for connection in connections:
                for _ in range(100):
                    connection.call(COMPUTE, body[: 60 * 1024], metadata=bearer(HEAVY), end=False)
            time.sleep(2)
            watch.figures.notes.append(f"RSS with the calls open {server.rss_bytes() / MiB:.0f} MiB")
        finally:
            for connection in connections:
                connection.close()


def test_large_requests_stalled_near_their_end_hold_at_most_the_quota(tmp_path: Path) -> None:
    """Four calls that send 90% of a 96 MiB request and stall. Nothing reaches a handler or a
    budget before a request is whole; the native front bounds what gRPC's core holds of them by
    its resource quota, ``--max-in-flight-bytes`` plus ``--max-message-bytes`` (64 + 128 MiB
    here). Once it is full the core sheds calls, the bystander's among them when its call is
    open at that moment (in one run of eight without a retry): RESOURCE_EXHAUSTED, which a caller
    with the SDK's retry policy, as the bystander here, sends again. grpc.aio's front has no quota
    (Python's gRPC does not expose it): 4 x 86 MiB, +347 MiB."""
    if not native_front.available():
        tools.missing("the native front was not built: gRPC's C++ library (libgrpc++-dev, pkg-config) was missing")
    budget, largest = 64 * MiB, 128 * MiB
    server = ServerProcess(tmp_path, "--max-message-bytes", str(largest), "--max-in-flight-bytes", str(budget))
    server.start()
    body = frame(mse_request(12 * MiB))  # 96 MiB
    attackers = [RawConnection(server.target) for _ in range(4)]
    try:
        with Watch(server, "4 x 96 MiB requests stalled at 90%", peak_over_bytes=budget + largest + 64 * MiB,
                   retries=True) as watch:
            with ThreadPoolExecutor(len(attackers)) as pool:  # each send waits for window it may never get
                for attacker in attackers:
                    attacker.sock.settimeout(10)
                    pool.submit(attacker.call, COMPUTE, body[: len(body) * 9 // 10], end=False)
                time.sleep(8)
                watch.figures.notes.append(f"RSS with the calls open {server.rss_bytes() / MiB:.0f} MiB")
                for attacker in attackers:
                    attacker.close()  # the pending sends fail: the server took no more
    finally:
        server.stop()


def test_one_connection_opens_at_most_max_connection_in_flight_calls(server: ServerProcess) -> None:
    """A slowloris on one connection: 2,000 calls that each send 60 KiB of a 1 MiB request and
    stall, from a client that ignores the server's SETTINGS. The server advertises
    ``--max-connection-in-flight`` (512) concurrent streams and refuses the calls past them, so one
    connection holds at most 512 stalled calls' bytes (gRPC's default let it open any number:
    3,000 took 240 MiB). grpc.aio's core refuses each call past the bound (RST_STREAM); the native
    front's (gRPC 1.51) closes the offending connection, which ends them all."""
    body = frame(mse_request(128 * 1024))  # 1 MiB
    sent, closed = 0, False
    with Watch(server, "2,000 calls stalled on one connection", metadata=bearer(LIGHT)) as watch:
        with RawConnection(server.target) as attacker:
            attacker.call(COMPUTE, body[: 60 * 1024], metadata=bearer(HEAVY), end=False)
            deadline = time.monotonic() + 5
            while attacker.conn.remote_settings.max_concurrent_streams > 2**20 and time.monotonic() < deadline:
                attacker.receive(0.1)  # until the server's SETTINGS bound the streams (h2 assumes none)
            advertised = attacker.conn.remote_settings.max_concurrent_streams
            attacker.conn.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 10**6  # ignore them
            attacker.conn.remote_settings.acknowledge()
            try:
                for sent in range(2, 2001):
                    attacker.call(COMPUTE, body[: 60 * 1024], metadata=bearer(HEAVY), end=False)
                deadline = time.monotonic() + 20
                while (refused := sum(s.ended for s in attacker.streams.values())) < 2000 - advertised:
                    if time.monotonic() > deadline:
                        break
                    attacker.receive(0.2)  # the refusals (RST_STREAM) as they come
            except OSError:  # the server closed the connection: every call on it is gone
                closed, refused = True, 2000
            watch.figures.notes.append(
                f"{advertised} streams advertised, {refused} of 2000 calls refused"
                + (f" (the connection closed after {sent} calls)" if closed else "")
            )
    assert advertised == 512
    assert refused >= 2000 - advertised
    assert not closed or sent > advertised, "the connection closed before the calls past the bound"


def test_a_caller_who_never_sends_the_same_structure_twice_only_churns_templates(server: ServerProcess) -> None:
    """3,000 small calls, each of a size no other has (``mse_loss`` of 1 to 3,000 elements), from
    8 threads: none becomes a request template (a size is kept on its second miss), so none pushes
    out the bystander's. Then 1,000 of them twice in a row: each becomes a template and pushes an
    older one out (README, "Request templates"), so the bystander's own template comes and goes.
    What that costs anyone is the full path, which every call took before templates: the
    bystander's slowest call and the server's memory stay within the watch's bounds (the templates
    hold at most 64 sizes x 4 x 4 KiB)."""
    bodies = [pb.ComputeRequest(mse_loss=pb.MseLoss(input=codec.encode(np.ones(n, np.float32)),
                                                    target=codec.encode(np.zeros(n, np.float32)))).SerializeToString()
              for n in range(1, 3001)]
    assert len({len(body) for body in bodies}) == len(bodies)
    twice = [body for body in bodies[:1000] for _ in range(2)]
    with Watch(server, "3,000 calls of 3,000 structures, 1,000 twice", metadata=bearer(LIGHT),
               peak_over_bytes=64 * MiB) as watch:
        learned = []
        with grpc.insecure_channel(server.target) as channel, ThreadPoolExecutor(8) as callers:
            answers = []
            for sent in (bodies, twice):
                before = server.metric("remoteloss_request_templates_total", result="learned")
                compute = raw_compute(channel)
                answers += callers.map(lambda body: compute(body, timeout=60, metadata=bearer(HEAVY)), sent)
                learned.append(server.metric("remoteloss_request_templates_total", result="learned") - before)
        watch.figures.notes.append(f"templates learned: {learned[0]:.0f} of the first, {learned[1]:.0f} of the second")
    assert [pb.ComputeResponse.FromString(answer).loss.data for answer in answers] == [
        np.float32(1).tobytes()] * len(bodies + twice)
    assert learned[0] <= 1  # the bystander's one structure, if no template of it was kept yet
    assert learned[1] >= 1000


def test_a_small_request_that_implies_a_large_tensor_is_sized_by_what_it_implies(server: ServerProcess) -> None:
    """Small requests asking for large broadcasts: one whose answer alone passes the tenant's
    budget is INVALID_ARGUMENT before anything is computed; one within it (a 36 MB answer from
    12 KiB) is computed and encoded on a compute thread, not on the event loop every caller shares."""
    with Watch(server, "12 KiB implying a 36 MB answer, 28 KiB implying 196 MB", metadata=bearer(LIGHT),
               peak_over_bytes=TENANT_IN_FLIGHT_BYTES + 256 * MiB) as watch:
        with grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", -1)]) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                raw_compute(channel)(broadcast_request(7000), timeout=120, metadata=bearer(HEAVY))
            begin = time.perf_counter()
            answer = raw_compute(channel)(broadcast_request(3000), timeout=120, metadata=bearer(HEAVY))
            watch.figures.notes.append(f"the 36 MB answer took {time.perf_counter() - begin:.2f} s")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "mse_loss: the call would hold about" in refused.value.details()  # type: ignore[attr-defined]
    assert "tenant heavy's max_tenant_in_flight_bytes" in refused.value.details()  # type: ignore[attr-defined]
    assert list(pb.ComputeResponse.FromString(answer).loss.shape) == [3000, 3000]


def test_rapid_resets_and_many_connections_disturb_no_one(server: ServerProcess) -> None:
    """HTTP/2 abuse: 5,000 calls each started and reset at once (the "rapid reset" flood), and
    300 connections opened and left idle: gRPC's own defences hold, nothing reaches the batcher,
    and the bystander does not notice."""
    body = frame(BYSTANDER_BODY)
    resets = 0
    with Watch(server, "5,000 rapid resets, 300 idle connections", metadata=bearer(LIGHT)) as watch:
        idle = []
        try:
            for _ in range(300):
                idle.append(RawConnection(server.target))
            with RawConnection(server.target) as attacker:
                try:
                    for _ in range(5000):
                        stream = attacker.call(COMPUTE, body, metadata=bearer(HEAVY))
                        attacker.reset(stream)
                        resets += 1
                except (ConnectionError, OSError):
                    pass  # gRPC may close a connection that resets too much (its rapid-reset defence)
            watch.figures.notes.append(f"{resets} resets sent, {len(idle)} idle connections")
        finally:
            for connection in idle:
                connection.close()
    assert resets >= 100


# ------------------------------------------------------------------------------ connections


def _answer(sock: socket.socket) -> bytes:
    """What the server wrote on ``sock`` before closing it (b"" while it is open and silent)."""
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return b""
    except OSError:
        pass
    sock.setblocking(True)
    sock.settimeout(5)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except OSError:
        pass
    return received


def _served(check: Callable[[], object], timeout_s: float = 10.0) -> None:
    """``check`` succeeds within ``timeout_s`` (the server notices closed connections in its time)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            check()
            return
        except (grpc.RpcError, OSError):
            assert time.monotonic() < deadline, "the server did not serve new connections again"
            time.sleep(0.2)


@pytest.mark.parametrize("front", ["auto", "python"])
def test_connections_past_max_connections_are_closed_and_no_one_waits(tmp_path: Path, front: str) -> None:
    """A caller that opens connections and leaves them idle, 40 on each port against
    ``--max-connections 16``: those past the bound are closed at once (HTTP answers 503 first),
    the bystander's connection, opened before, serves on, and once the caller has gone, new
    connections are served. On both gRPC fronts: the native one accepts connections itself and
    counts them, grpc.aio's core has the bound built in."""
    http_port = free_port()
    server = ServerProcess(tmp_path, "--max-connections", "16", "--http-port", str(http_port), "--front", front)
    server.start()
    try:
        with Watch(server, "40 idle connections on each port, max_connections 16") as watch:
            grpc_socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(40)]
            http_socks = [socket.create_connection(("127.0.0.1", http_port)) for _ in range(40)]
            time.sleep(1.5)
            grpc_open = sum(is_open(s) for s in grpc_socks)
            answers = [_answer(s) for s in http_socks]
            http_open = answers.count(b"")
            refusals = [a for a in answers if a]
            watch.figures.notes.append(f"gRPC {grpc_open} of 40 left open, HTTP {http_open} of 40 ({len(refusals)} 503)")
            for sock in grpc_socks + http_socks:
                sock.close()
            _served(lambda: urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/live", timeout=2).close())
            _served(lambda: server.health() == "SERVING" or _raise(OSError()))
    finally:
        server.stop()
    assert grpc_open <= 16 and http_open <= 16, watch.figures.line()
    assert len(refusals) >= 24 and all(a.startswith(b"HTTP/1.1 503") and b"max_connections (16)" in a
                                       for a in refusals), refusals[:2]


def _raise(exc: BaseException) -> None:
    raise exc


def test_an_idle_grpc_connection_is_closed(tmp_path: Path) -> None:
    """``--connection-idle``: a connection without a call (a channel a careless client opened and
    never closed) gets GOAWAY and is closed."""
    server = ServerProcess(tmp_path, "--connection-idle", "0.5")
    server.start()
    try:
        with RawConnection(server.target) as idle:
            begin = time.monotonic()
            idle.sock.settimeout(10)
            while idle.sock.recv(65536):
                pass
            closed_after_s = time.monotonic() - begin
    finally:
        server.stop()
    assert 0.3 <= closed_after_s <= 5, closed_after_s
