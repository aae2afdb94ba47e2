"""event_loop: which loop a name stands for, and the server on each of them."""

from __future__ import annotations

import asyncio
import logging
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import remoteloss
from remoteloss_server import event_loop
from remoteloss_server.app import ServerThread
from remoteloss_server.config import EVENT_LOOPS, ServerConfig

torch.set_num_threads(1)

uvloop = pytest.importorskip("uvloop")  # a dependency of the server on every platform CI runs


def _made_by(factory: object) -> str:
    loop = factory()  # type: ignore[operator]
    try:
        return type(loop).__module__.partition(".")[0]
    finally:
        loop.close()


def test_auto_and_uvloop_are_uvloop_where_it_is_installed() -> None:
    for name in ("auto", "uvloop"):
        chosen, factory = event_loop.choose(name)
        assert (chosen, _made_by(factory)) == ("uvloop", "uvloop")
    chosen, factory = event_loop.choose("asyncio")
    assert (chosen, _made_by(factory)) == ("asyncio", "asyncio")


def test_without_uvloop_auto_is_asyncio_and_uvloop_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    chosen, factory = event_loop.choose("auto")
    assert (chosen, _made_by(factory)) == ("asyncio", "asyncio")
    with pytest.raises(ImportError, match="uvloop package is not installed"):
        event_loop.choose("uvloop")


def test_run_returns_what_the_coroutine_returns_on_the_loop_it_was_given() -> None:
    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__.partition(".")[0]

    assert event_loop.run(which(), uvloop.new_event_loop) == "uvloop"
    assert event_loop.run(which(), asyncio.new_event_loop) == "asyncio"


@pytest.mark.parametrize("name", [name for name in EVENT_LOOPS if name != "auto"])
def test_the_server_computes_and_streams_on_each_loop(name: str, caplog: pytest.LogCaptureFixture) -> None:
    """Unary and stream calls, forward and backward, equal local torch on either loop; the start
    line names the loop."""
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, http_port=0, event_loop=name)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((2, 8, 5)).astype(np.float32)
    expected = F.mse_loss(torch.from_numpy(x), torch.from_numpy(y)).item()
    with caplog.at_level(logging.INFO, logger="remoteloss_server.app"), ServerThread(config) as server:
        with remoteloss.Client(server.target) as client:
            assert float(client.mse_loss(x, y)) == expected
            with client.stream() as stream:
                answers = [stream.mse_loss(x, y) for _ in range(3)]
            assert [float(answer.result()) for answer in answers] == [expected] * 3
            source = torch.from_numpy(x).requires_grad_()
            client.mse_loss(source, torch.from_numpy(y)).backward()
            local = torch.from_numpy(x).requires_grad_()
            F.mse_loss(local, torch.from_numpy(y)).backward()
            assert torch.equal(source.grad, local.grad)
    assert any(f"loop={name}" in record.getMessage() for record in caplog.records)
