"""The server's default address is loopback: reachable from this machine, with no open-access
warning. Deployments that must be reached from elsewhere set the host (tests/integration/test_deploy.py,
tests/unit/test_deploy_kubernetes.py check that they do)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import remoteloss
from remoteloss_server.app import ServerThread
from remoteloss_server.config import ServerConfig


def test_the_default_host_is_loopback_and_answers_there(caplog: pytest.LogCaptureFixture) -> None:
    assert ServerConfig().host == "localhost"
    with caplog.at_level(logging.INFO, logger="remoteloss_server.app"), ServerThread(
        ServerConfig(port=0, device="cpu", metrics_port=0, http_port=0)
    ) as server:
        with remoteloss.Client(f"localhost:{server.port}") as client:
            assert client.mse_loss(np.ones(3), np.zeros(3)) == 1.0
    messages = [r.getMessage() for r in caplog.records]
    (ready,) = [m for m in messages if m.startswith("event=ready")]
    assert f"address=localhost:{server.port} " in ready
    assert not [m for m in messages if "event=open_access" in m]
