"""On CUDA: remoteloss_gpu_memory_bytes reports what torch's caching allocator holds, at each scrape."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import remoteloss
from remoteloss_server.app import ServerThread
from remoteloss_server.config import ServerConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_gpu_memory_gauge_follows_the_allocator() -> None:
    config = ServerConfig(host="127.0.0.1", port=0, device="cuda", metrics_port=0, http_port=0, shutdown_grace_s=0.5)
    with ServerThread(config) as server, remoteloss.Client(server.target) as client:
        client.mse_loss(np.zeros((256, 1024), np.float32), np.ones((256, 1024), np.float32))
        held = server.metrics.registry.get_sample_value("remoteloss_gpu_memory_bytes", {"device": "cuda:0"})
        assert held is not None and held == torch.cuda.memory_reserved(torch.device("cuda", 0)) and held > 0
