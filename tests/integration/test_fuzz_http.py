"""Property-based fuzzing of the HTTP door's JSON (the Open Inference Protocol's REST binding),
against an in-process server: a good inference of a few losses, broken by hypothesis (any field of
the request or of an input replaced by any JSON value, nesting included, keys added, the binary
extension's header set to any length, or a body that is no request at all).

The answer must be 200, or 400 with an ``error`` that is a string, or 404 (an unknown model or
version), or 413 (past a size): never a 500, and never a missed timeout. The same
``REMOTELOSS_FUZZ_EXAMPLES`` as ``test_fuzz.py`` runs more random examples; CI runs a fixed set.
"""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from remoteloss_server.app import ServerThread
from remoteloss_server.config import ServerConfig

from .deploy_files import free_port

EXAMPLES = int(os.environ.get("REMOTELOSS_FUZZ_EXAMPLES") or 0)
PROFILE = settings(
    max_examples=EXAMPLES or 150, derandomize=not EXAMPLES, deadline=None, database=None,
    suppress_health_check=list(HealthCheck),
)
ALLOWED = {200, 400, 404, 413}

GOOD = {
    "mse_loss": [("input", "FP32", [2, 3], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), ("target", "FP32", [2, 3], [0.0] * 6)],
    "cross_entropy": [("input", "FP32", [2, 3], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]), ("target", "INT64", [2], [0, 2])],
    "ctc_loss": [("log_probs", "FP32", [2, 1, 3], [-1.0] * 6), ("targets", "INT64", [1, 1], [1]),
                 ("input_lengths", "INT64", [1], [2]), ("target_lengths", "INT64", [1], [1])],
}
DATATYPES = ["FP32", "FP64", "FP16", "BF16", "INT64", "INT32", "INT8", "UINT8", "BOOL", "BYTES", "FP8", ""]

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
# What a near-miss client sends where a field belongs: the field's own kind of value, or anything.
field_values = {
    "name": st.sampled_from(["input", "target", "weight", "", "x" * 300]) | values,
    "datatype": st.sampled_from(DATATYPES) | values,
    "shape": st.lists(st.integers(-3, 2**62) | st.sampled_from([0, 1, 2, 3]), max_size=6) | values,
    "data": st.lists(st.floats() | st.integers(-(2**70), 2**70) | st.booleans(), max_size=8) | values,
    "parameters": st.dictionaries(st.sampled_from(["binary_data_size", "binary_data", "x"]), values, max_size=2) | values,
}
top_values = {
    "inputs": values, "outputs": st.lists(st.fixed_dictionaries({"name": values}), max_size=3) | values,
    "parameters": st.dictionaries(st.sampled_from(["timeout", "binary_data_output", "reduction", "x"]), values, max_size=3)
    | values,
    "id": values,
}


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    model = draw(st.sampled_from([*GOOD, "no_such_loss"]))
    inputs = [{"name": n, "datatype": d, "shape": s, "data": v} for n, d, s, v in GOOD.get(model, GOOD["mse_loss"])]
    request: dict[str, Any] = {"inputs": inputs}
    for sent in inputs:
        for field in draw(st.lists(st.sampled_from(sorted(field_values)), max_size=2, unique=True)):
            sent[field] = draw(field_values[field])
    for field in draw(st.lists(st.sampled_from(sorted(top_values)), max_size=2, unique=True)):
        request[field] = draw(top_values[field])
    shape = draw(st.sampled_from(["request", "request", "request", "any json", "bytes"]))
    if shape == "any json":
        body = json.dumps(draw(values)).encode()
    elif shape == "bytes":
        body = draw(st.binary(max_size=64))
    else:
        body = json.dumps(request).encode()
    headers = {}
    if draw(st.booleans()) and draw(st.integers(0, 3)) == 0:  # the binary extension's header, sometimes wrong
        headers["Inference-Header-Content-Length"] = str(draw(st.integers(-5, len(body) + 5)))
    return model, body, headers


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    config = ServerConfig(host="127.0.0.1", port=0, device="cpu", metrics_port=0, http_port=free_port(),
                          shutdown_grace_s=0.5)
    with ServerThread(config):
        yield config.http_port


@PROFILE
@given(case=bodies())
def test_fuzzed_json_inferences(port: int, case: tuple[str, bytes, dict[str, str]]) -> None:
    model, body, headers = case
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", f"/v2/models/{model}/infer", body=body, headers=headers)
        answer = connection.getresponse()
        status, text = answer.status, answer.read()
    finally:
        connection.close()
    assert status in ALLOWED, (status, text[:500], body[:500])
    if status != 200:
        assert isinstance(json.loads(text).get("error"), str), text[:500]
