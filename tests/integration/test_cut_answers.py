"""A server that dies while its answer is on the way loses no call.

gRPC's retry policy sends a call again only until the server's answer has begun (its headers
commit the call), and a large answer takes many round trips of flow control. A replica killed in
that window (SIGKILL, the OOM killer) leaves the call UNAVAILABLE, or, behind nginx, INTERNAL
with a reset stream, and gRPC gives it up; the SDK sends such a call once more itself
(``_transport.Resend``; streams send their unanswered requests again). The death is made exact here: ``CuttingProxy`` forwards a
connection to the session's server and resets it once part of an answer has passed, the way the
kernel resets the sockets of a killed process.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import remoteloss
import torch
import torch.nn.functional as F
from remoteloss._transport import UNARY_RESENDS, UNREACHED

from .deploy_files import free_port, running_nginx

# An answer of 4 MiB: gRPC's flow control sends it in many pieces, its headers first.
X = np.random.default_rng(5).standard_normal(1 << 20).astype(np.float32)
Y = np.random.default_rng(6).standard_normal(1 << 20).astype(np.float32)
CUT_AFTER = 256 * 1024  # server bytes passed before the reset: the answer has begun, and not ended


class CuttingProxy:
    """Forwards loopback connections to ``target``; each of the first ``cut`` connections is reset
    (RST, both ways) once ``CUT_AFTER`` bytes from the server have passed through it."""

    def __init__(self, target: str, cut: int) -> None:
        host, port = target.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._cut = cut
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.connections = 0
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self._listener.accept()
            except OSError:  # closed
                return
            up = socket.create_connection(self._upstream)
            self.connections += 1
            cut = self.connections <= self._cut
            threading.Thread(target=self._pipe, args=(down, up, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, down, cut), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, cut: bool) -> None:
        passed = 0
        try:
            while data := source.recv(65536):
                sink.sendall(data)
                passed += len(data)
                if cut and passed >= CUT_AFTER:
                    self.cuts += 1
                    for end in (source, sink):  # RST on close; SHUT_RD wakes the other direction's recv
                        end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        end.shutdown(socket.SHUT_RD)
                    break
        except OSError:
            pass
        for end in (source, sink):
            end.close()


@pytest.fixture
def cut_once(server: Any) -> Iterator[CuttingProxy]:
    proxy = CuttingProxy(server.target, cut=1)
    yield proxy
    proxy.close()


@pytest.fixture
def cut_always(server: Any) -> Iterator[CuttingProxy]:
    proxy = CuttingProxy(server.target, cut=1 << 30)
    yield proxy
    proxy.close()


def expected() -> torch.Tensor:
    return F.mse_loss(torch.from_numpy(X), torch.from_numpy(Y), reduction="none")


def assert_cut_then_answered(proxy: CuttingProxy, answer: Any) -> None:
    assert proxy.cuts == 1  # the first answer was cut mid-way: without a resend, the call was lost
    assert torch.equal(torch.as_tensor(answer), expected())


def test_a_unary_call_whose_answer_was_cut_is_sent_again(cut_once: CuttingProxy) -> None:
    with remoteloss.Client(cut_once.target) as client:
        assert_cut_then_answered(cut_once, client.mse_loss(X, Y, reduction="none"))


def test_the_autograd_path_rides_out_a_cut_answer(cut_once: CuttingProxy) -> None:
    x = torch.from_numpy(X).requires_grad_()
    with remoteloss.Client(cut_once.target) as client:
        loss = client.mse_loss(x, torch.from_numpy(Y), reduction="none")
        loss.sum().backward()
    assert_cut_then_answered(cut_once, loss.detach())
    local = torch.from_numpy(X).requires_grad_()
    F.mse_loss(local, torch.from_numpy(Y), reduction="none").sum().backward()
    assert x.grad is not None and torch.equal(x.grad, local.grad)


def test_an_async_call_whose_answer_was_cut_is_sent_again(cut_once: CuttingProxy) -> None:
    async def call() -> Any:
        async with remoteloss.AsyncClient(cut_once.target) as client:
            return await client.mse_loss(X, Y, reduction="none")

    assert_cut_then_answered(cut_once, asyncio.run(call()))


def test_a_stream_whose_answer_was_cut_sends_its_requests_again(cut_once: CuttingProxy) -> None:
    with remoteloss.Client(cut_once.target) as client, client.stream() as stream:
        futures = [stream.mse_loss(X, Y, reduction="none") for _ in range(3)]
        answers = [future.result(timeout=60) for future in futures]
    assert cut_once.cuts == 1
    assert all(torch.equal(torch.as_tensor(answer), expected()) for answer in answers)


def test_a_call_is_sent_once_more_not_again_and_again(cut_always: CuttingProxy) -> None:
    """A server that cuts every answer: the call fails UNAVAILABLE after one resend."""
    with remoteloss.Client(cut_always.target) as client, pytest.raises(remoteloss.ServiceUnavailableError):
        client.mse_loss(X, Y, reduction="none")
    assert cut_always.cuts == 1 + UNARY_RESENDS


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["unary", "stream"])
def test_behind_nginx_a_cut_answer_is_sent_again(cut_once: CuttingProxy, tmp_path: Path, how: str) -> None:
    """nginx resets the caller's stream (INTERNAL, RST_STREAM) when its upstream dies mid-answer;
    the SDK takes that as a lost connection. (Before, such a call failed INTERNAL.)"""
    with running_nginx([cut_once.target], tmp_path) as nginx, remoteloss.Client(nginx.target) as client:
        if how == "unary":
            answer = client.mse_loss(X, Y, reduction="none")
        else:
            with client.stream() as stream:
                answer = stream.mse_loss(X, Y, reduction="none").result(timeout=60)
    assert_cut_then_answered(cut_once, answer)


def test_gRPCs_words_for_a_call_that_reached_no_server_are_known() -> None:
    """``Resend`` does not send again a call that reached no server: it tells them by gRPC's
    words (``UNREACHED``). If a gRPC release changes them, this fails, rather than every call to
    a server that is down taking twice as long to fail."""
    with remoteloss.Client(f"127.0.0.1:{free_port()}") as client:
        with pytest.raises(remoteloss.ServiceUnavailableError) as info:
            client.mse_loss(X[:4], Y[:4])
    assert info.value.details.startswith(UNREACHED), info.value.details
