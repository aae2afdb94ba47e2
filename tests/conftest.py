"""Shared fixtures: one real server per test session, on loopback, and clients for it.

Integration tests never mock the transport: the server runs in-process on its own event loop
(``ServerThread``) and is reached through the real SDK or the raw generated stub.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch

# One thread: the suite runs on small tensors, and intra-op threads only add contention (the
# in-process server shares this setting).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def server() -> Iterator[Any]:
    """A running server on 127.0.0.1 and a free port; ``server.target`` is its address.

    It computes on the CPU even where CUDA is present: the expected values come from torch on
    this process's CPU, and some expectations are CPU facts (torch's CPU kernels of a few losses
    take no float16). GPU checks live in tests/gpu/.
    """
    from remoteloss_server.app import ServerThread
    from remoteloss_server.config import ServerConfig

    with ServerThread(ServerConfig(port=0, host="127.0.0.1", device="cpu", metrics_port=0, http_port=0)) as running:
        yield running


@pytest.fixture(scope="session")
def client(server: Any) -> Iterator[Any]:
    """The SDK's synchronous client, connected to the session's server."""
    import remoteloss

    with remoteloss.Client(server.target) as sdk:
        yield sdk


@pytest.fixture(scope="session")
def channel(server: Any) -> Iterator[grpc.Channel]:
    """A plain gRPC channel to the server, for hand-built requests."""
    with grpc.insecure_channel(server.target) as plain:
        yield plain


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel) -> Any:
    """The raw generated ``LossService`` stub: requests bypass the SDK's own checks."""
    from remoteloss.v1 import loss_pb2_grpc

    return loss_pb2_grpc.LossServiceStub(channel)
