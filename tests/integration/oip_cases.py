"""The Open Inference Protocol's side of the integration tests: a case of the table as a
request tritonclient sends (``oip_client.py`` under .venv-oip), and torch's answer to it.

``request(call, ...)`` turns a built case into the job entry of ``oip_client.py``: each tensor
argument an input (its protocol datatype), each other argument a request parameter by torch's
name (a distance function or ``LinearCrossEntropyOptions`` as protobuf JSON, as the command line
takes it; a list of lengths an INT64 input).
"""

from __future__ import annotations

import base64
import json
import subprocess
import warnings
from typing import Any

import numpy as np
import torch
from google.protobuf import json_format

from remoteloss import _request
from tests import tools

from .cases import Call, differentiable, with_grad

__all__ = ["DATATYPES", "PYTHON", "array", "drive", "encode", "expected", "request"]

PYTHON = tools.ROOT / ".venv-oip" / "bin" / "python"
SCRIPT = tools.ROOT / "tests" / "integration" / "oip_client.py"
DATATYPES = {
    torch.float64: "FP64", torch.float32: "FP32", torch.float16: "FP16", torch.int64: "INT64",
    torch.int32: "INT32", torch.uint8: "UINT8", torch.bool: "BOOL", torch.int16: "INT16", torch.int8: "INT8",
}


def encode(value: Any) -> dict[str, Any]:
    array_ = np.ascontiguousarray(value)
    return {"dtype": array_.dtype.str, "shape": list(array_.shape), "b64": base64.b64encode(array_.tobytes()).decode()}


def array(sent: dict[str, Any]) -> np.ndarray[Any, Any]:
    return np.frombuffer(base64.b64decode(sent["b64"]), dtype=sent["dtype"]).reshape(sent["shape"])


def drive(job: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    """Run ``oip_client.py`` on ``job`` under .venv-oip; skips (fails under CI) without it."""
    if not PYTHON.is_file():
        tools.missing("tritonclient is not installed in .venv-oip (scripts/install_oip_clients.sh)")
    run = subprocess.run(
        [str(PYTHON), str(SCRIPT)], input=json.dumps(job), capture_output=True, text=True, timeout=timeout, check=False
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result: dict[str, Any] = json.loads(run.stdout)
    return result


def _parameter(loss: str, name: str, value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)):
        return value
    converter = {"distance_function": _request._distance_function,
                 "options": _request._linear_cross_entropy_options}[name]
    return json_format.MessageToJson(converter(loss, name, value), preserving_proto_field_name=True)


def request(case_id: str, call: Call, wrt: tuple[str, ...], grad_output: torch.Tensor | None,
            *, binary: bool = True, outputs: list[str] | None = None) -> dict[str, Any]:
    """One call of ``oip_client.py``'s job: ``call`` with gradients asked for ``wrt``."""
    named = dict(zip(call.arg_names, call.args, strict=True))
    named.update(call.remote_kwargs())
    inputs, parameters = [], {}
    for name, value in named.items():
        if isinstance(value, (list, tuple)):
            value = torch.tensor(value, dtype=torch.int64)
        if isinstance(value, torch.Tensor):
            inputs.append({"name": name, "datatype": DATATYPES[value.dtype], "array": encode(value.numpy()),
                           "requires_grad": name in wrt})
        elif value is not None:
            parameters[name] = _parameter(call.loss, name, value)
    if grad_output is not None:
        inputs.append({"name": "grad_output", "datatype": DATATYPES[grad_output.dtype],
                       "array": encode(grad_output.numpy())})
    return {"id": case_id, "model": call.loss, "inputs": inputs, "parameters": parameters, "binary": binary,
            "outputs": outputs}


def expected(call: Call, grad_output: torch.Tensor | None) -> tuple[tuple[str, ...], dict[str, torch.Tensor]]:
    """The tensors torch differentiates, and torch's loss and gradients (``grad_<name>``)."""
    wrt = differentiable(call)
    attempt, leaves = with_grad(call, wrt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = attempt.local()
        if wrt:
            loss.backward(grad_output if grad_output is not None else torch.ones_like(loss))
    answers = {"loss": loss.detach()}
    for name in wrt:
        gradient = leaves[name].grad
        assert gradient is not None
        answers[f"grad_{name}"] = gradient
    return wrt, answers
