"""`buf curl` calls the test server knowing nothing but its address: the schema comes from
server reflection. This is what a person with no .proto file and no SDK can do, and
examples/grpcurl.md shows the same calls.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests import tools
from tests.catalog import LOSS_NAMES

SERVICE = "remoteloss.v1.LossService"


@pytest.fixture(scope="module")
def buf() -> str:
    return tools.find("buf", "pip install buf-bin, part of the test extra")


def curl(buf: str, server: Any, method: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Exit status and the JSON answer (the error document on failure) of one buf curl call."""
    result = tools.run([
        buf, "curl", "--protocol", "grpc", "--http2-prior-knowledge",
        "--data", json.dumps(body), f"http://{server.target}/{SERVICE}/{method}",
    ])
    text = result.stdout if result.returncode == 0 else result.stderr
    return result.returncode, json.loads(text)


def tensor(array: np.ndarray[Any, Any], dtype: str, *, requires_grad: bool = False) -> dict[str, Any]:
    """The Tensor message as protobuf JSON: bytes are base64, int64 shape entries may be numbers."""
    body = {"dtype": dtype, "shape": list(array.shape), "data": base64.b64encode(array.tobytes()).decode()}
    if requires_grad:
        body["requiresGrad"] = True
    return body


def decode(message: dict[str, Any], dtype: str) -> np.ndarray[Any, Any]:
    shape = [int(size) for size in message.get("shape", [])]  # int64 comes back as strings
    return np.frombuffer(base64.b64decode(message.get("data", "")), dtype=dtype).reshape(shape)


def test_list_losses_through_reflection(buf: str, server: Any) -> None:
    status, answer = curl(buf, server, "ListLosses", {})
    assert status == 0
    names = [loss["name"] for loss in answer["losses"]]
    assert names == list(LOSS_NAMES)
    mse = answer["losses"][1]
    assert mse["messageType"] == "remoteloss.v1.MseLoss" and mse["module"] == "MSELoss"


def test_mse_loss_and_gradient_match_torch(buf: str, server: Any) -> None:
    generator = np.random.default_rng(0)
    x = generator.standard_normal((2, 3)).astype("<f4")
    y = generator.standard_normal((2, 3)).astype("<f4")
    body = {"mse_loss": {
        "input": tensor(x, "DTYPE_FLOAT32", requires_grad=True),
        "target": tensor(y, "DTYPE_FLOAT32"),
        "reduction": "REDUCTION_SUM",
    }}
    status, answer = curl(buf, server, "Compute", body)
    assert status == 0, answer
    expected_input = torch.from_numpy(x.copy()).requires_grad_()
    expected = F.mse_loss(expected_input, torch.from_numpy(y), reduction="sum")
    expected.backward()
    assert answer["loss"]["dtype"] == "DTYPE_FLOAT32"
    torch.testing.assert_close(torch.from_numpy(decode(answer["loss"], "<f4").copy()), expected.detach())
    assert list(answer["gradients"]) == ["input"]
    torch.testing.assert_close(torch.from_numpy(decode(answer["gradients"]["input"], "<f4").copy()), expected_input.grad)


def test_a_bad_request_gets_the_servers_message(buf: str, server: Any) -> None:
    x = np.zeros(3, "<f4")
    body = {"mse_loss": {"input": tensor(x, "DTYPE_FLOAT32"), "target": {**tensor(x, "DTYPE_FLOAT32"), "shape": [4]}}}
    status, error = curl(buf, server, "Compute", body)
    assert status != 0
    assert error["code"] == "invalid_argument"
    assert "target" in error["message"] and "12 bytes" in error["message"]
