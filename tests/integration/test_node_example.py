"""examples/node (Node.js, @grpc/grpc-js, the .proto file alone) computes cross_entropy and its
input gradient on the test server; both must equal torch's.

It needs `npm ci` in examples/node (.ci/run does it). Without node_modules the tests skip,
except under CI, where they fail.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from tests import tools

EXAMPLE = tools.ROOT / "examples" / "node"


@pytest.fixture(scope="module")
def node() -> str:
    program = tools.find("node", "Node.js runs examples/node")
    if not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        tools.missing("examples/node/node_modules is missing: run `npm ci` in examples/node")
    return program


def run_example(node: str, server: Any, arguments: dict[str, Any]) -> Any:
    result = tools.run([node, str(EXAMPLE / "index.mjs"), "--target", server.target], input=json.dumps(arguments))
    return result


CASES = {
    "class indices, mean": {"input": [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], "target": [0, 2]},
    "probabilities, weight, none, float64": {
        "input": [[1.5, -0.5, 0.25], [0.0, 2.0, -1.0]],
        "target": [[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]],
        "weight": [1.0, 2.0, 0.5],
        "reduction": "none",
        "dtype": "float64",
    },
    "ignore_index and label_smoothing, sum": {
        "input": [[0.3, -0.2, 1.1, 0.0], [1.0, 1.0, -2.0, 0.5], [0.0, 0.1, 0.2, 0.3]],
        "target": [3, -1, 0],
        "ignore_index": -1,
        "label_smoothing": 0.1,
        "reduction": "sum",
    },
}


@pytest.mark.parametrize("arguments", CASES.values(), ids=CASES.keys())
def test_cross_entropy_and_input_gradient_match_torch(node: str, server: Any, arguments: dict[str, Any]) -> None:
    result = run_example(node, server, arguments)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)

    dtype = torch.float64 if arguments.get("dtype") == "float64" else torch.float32
    input = torch.tensor(arguments["input"], dtype=dtype, requires_grad=True)
    probabilities = torch.tensor(arguments["target"]).dim() == input.dim()
    target = torch.tensor(arguments["target"], dtype=dtype if probabilities else torch.int64)
    weight = torch.tensor(arguments["weight"], dtype=dtype) if "weight" in arguments else None
    options = {k: arguments[k] for k in ("reduction", "ignore_index", "label_smoothing") if k in arguments}
    expected = F.cross_entropy(input, target, weight=weight, **options)
    expected.sum().backward()

    torch.testing.assert_close(torch.tensor(answer["loss"], dtype=dtype), expected.detach())
    torch.testing.assert_close(torch.tensor(answer["grad_input"], dtype=dtype), input.grad)
    assert answer["warnings"] == []


def test_a_bad_request_exits_1_with_the_servers_message(node: str, server: Any) -> None:
    result = run_example(node, server, {"input": [[1.0, 2.0, 3.0]], "target": [5]})
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "target holds class 5" in result.stderr


def test_bad_usage_exits_2(node: str, server: Any) -> None:
    result = run_example(node, server, {"input": [[1.0, 2.0], [3.0]], "target": [0, 1]})
    assert result.returncode == 2
    assert "ragged" in result.stderr
