"""A stream that the SDK sends again never hangs.

The peer is a gRPC server on loopback that answers ComputeStream as a draining remoteloss server
does while its drain lasts (UNAVAILABLE and ``remoteloss-drained: 0`` at once: the stream took
nothing), then goes away. The SDK opens the stream again after each such end (``_stream_base``:
``RESENDS`` times with backoff), so its requests are in flight while the server stops.

- Each call of a ``Stream`` fails ``ServiceUnavailableError``, and each of an ``AsyncStream`` fails,
  within ``BOUND_S``, whenever the server stops. With gRPC's own retry policy also applied to
  ComputeStream (the SDK's service config before ``ComputeStream`` got its own entry), a stream
  that gRPC was retrying when the server went away could wait forever (about one run in three
  here, sync and async), and otherwise failed after 5.5-5.9 s against 1.0-1.4.
- A stream still open when its client is closed fails its calls instead of its reader thread
  dying on the closed client (an unhandled thread exception fails the test).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import numpy as np
import pytest
import remoteloss
from remoteloss_server.servicer import DRAINED_METADATA_KEY, SERVICE_NAME

BOUND_S = 20.0  # measured: 1.1-1.3 s; a hang is forever
X = np.ones(4, np.float32)


class DrainingServer:
    """A grpc.aio server, on a thread of its own, whose ComputeStream ends every stream at once as a
    draining server's does; stopped ``stop_after_s`` after it starts. ``streams``: how many it ended."""

    def __init__(self, stop_after_s: float) -> None:
        self.stop_after_s = stop_after_s
        self.streams = 0
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)

    async def _end(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        """A stream's handler that writes nothing (grpc.aio takes a coroutine for one)."""
        self.streams += 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is draining", ((DRAINED_METADATA_KEY, "0"),))

    async def _serve(self) -> None:
        server = grpc.aio.server()
        handler = grpc.stream_stream_rpc_method_handler(self._end)
        methods = grpc.method_handlers_generic_handler(SERVICE_NAME, {"ComputeStream": handler})
        server.add_generic_rpc_handlers((methods,))
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._ready.set()
        await asyncio.sleep(self.stop_after_s)
        await server.stop(1.0)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> DrainingServer:
        self._thread.start()
        assert self._ready.wait(30), "the server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(timeout=self.stop_after_s + 30)


# Where the server stops among the SDK's resends (0.05 s to about 1.5 s apart): the hang came
# in about one run in three, at moments that vary.
@pytest.fixture(params=[0.05, 0.2, 0.35, 0.5, 0.7, 0.9, 1.2, 1.5], ids=lambda s: f"stops-after-{s}s")
def server(request: pytest.FixtureRequest) -> Iterator[DrainingServer]:
    with DrainingServer(request.param) as running:
        yield running


@pytest.mark.timeout(120)
def test_a_stream_sent_again_to_a_server_that_goes_away_fails_in_bounded_time(server: DrainingServer) -> None:
    with remoteloss.Client(server.target) as client, client.stream() as stream:
        futures = [stream.mse_loss(X, X) for _ in range(4)]
        begin = time.monotonic()
        for future in futures:
            with pytest.raises(remoteloss.ServiceUnavailableError):
                future.result(timeout=BOUND_S)
        failed_s = time.monotonic() - begin
    print(f"\nsync: every call failed after {failed_s:.2f} s; the server ended {server.streams} streams")
    assert server.streams >= 1, "the stream never reached the server"


@pytest.mark.timeout(120)
def test_an_async_stream_sent_again_to_a_server_that_goes_away_fails_in_bounded_time(server: DrainingServer) -> None:
    async def call() -> list[BaseException | object]:
        async with remoteloss.AsyncClient(server.target) as client, client.stream() as stream:
            calls = asyncio.gather(*(stream.mse_loss(X, X) for _ in range(4)), return_exceptions=True)
            return await asyncio.wait_for(calls, BOUND_S)

    begin = time.monotonic()
    outcomes = asyncio.run(call())
    failed_s = time.monotonic() - begin
    print(f"\nasync: every call failed after {failed_s:.2f} s; the server ended {server.streams} streams")
    # ServiceUnavailableError, also when the last new call's write crossed its end and grpc.aio
    # said INTERNAL "Internal error from Core" (the SDK resends after it too; DESIGN.md): failed, not hung.
    assert all(isinstance(outcome, remoteloss.ServiceUnavailableError) for outcome in outcomes), outcomes
    assert server.streams >= 1, "the stream never reached the server"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("close_after_s", [0.0, 0.03, 0.08, 0.15, 0.3])
def test_a_stream_open_when_its_client_closes_fails_its_calls(close_after_s: float) -> None:
    with DrainingServer(stop_after_s=5.0) as server:
        client = remoteloss.Client(server.target)
        stream = client.stream()
        future = stream.mse_loss(X, X)
        time.sleep(close_after_s)  # the stream is ended, sent again, or waiting to be
        client.close()
        with pytest.raises(remoteloss.LossServiceError):
            future.result(timeout=BOUND_S)
        stream.close()
