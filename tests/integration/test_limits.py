"""Request limits end to end: gRPC's own message limit and max_request_elements (the error table's
RESOURCE_EXHAUSTED and INVALID_ARGUMENT rows); the in-flight bound is in test_faults.py."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import remoteloss
from remoteloss.v1 import loss_pb2 as pb
from remoteloss.v1 import loss_pb2_grpc
from remoteloss_server.app import ServerThread
from remoteloss_server.config import ServerConfig


@pytest.fixture(scope="module")
def small_server() -> Iterator[ServerThread]:
    config = ServerConfig(
        port=0, host="127.0.0.1", device="cpu", metrics_port=0, http_port=0, max_message_bytes=4096, max_request_elements=500
    )
    with ServerThread(config) as running:
        yield running


def test_an_oversized_message_is_resource_exhausted(small_server: ServerThread) -> None:
    big = np.zeros(2000, np.float32)  # 8000 bytes of data, over the server's 4096
    with remoteloss.Client(small_server.target) as client:
        with pytest.raises(remoteloss.ResourceExhaustedError) as info:
            client.mse_loss(big, big)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert float(client.mse_loss(np.ones(4, np.float32), np.zeros(4, np.float32))) == 1.0


def test_too_many_elements_in_all_is_invalid_argument_naming_the_limit(small_server: ServerThread) -> None:
    with remoteloss.Client(small_server.target) as client:
        x = np.zeros(300, np.int8).astype(np.float32)[:251]  # 251 + 251 elements > 500, in 2 KiB
        with pytest.raises(remoteloss.InvalidArgumentError, match="502 elements in all.*max_request_elements of 500"):
            client.mse_loss(x, x)
        assert float(client.mse_loss(x[:250], x[:250])) == 0.0


def test_the_element_limit_reads_shapes_before_any_data(small_server: ServerThread) -> None:
    # 2**40 elements declared, no data sent: refused by the shapes alone (the codec's own check,
    # data length against shape, never runs).
    request = pb.ComputeRequest(
        mse_loss=pb.MseLoss(input=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2**20, 2**20]),
                            target=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2**20, 2**20]))
    )
    with grpc.insecure_channel(small_server.target) as channel, pytest.raises(grpc.RpcError) as info:
        loss_pb2_grpc.LossServiceStub(channel).Compute(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_request_elements" in info.value.details()
