"""The Open Inference Protocol's HTTP/JSON bodies <-> ``oip`` requests and outputs (no HTTP here).

A request body is JSON, or, with the binary tensor data extension, JSON of
``Inference-Header-Content-Length`` bytes followed by the inputs' bytes, each input that travels
so naming its size in the parameter ``binary_data_size`` (in the order of ``inputs``). An output
travels as bytes after the JSON when asked (``binary_data: true`` in its parameters, or
``binary_data_output: true`` in the request's), else as a flat JSON list in ``data``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from remoteloss_server import oip
from remoteloss_server.errors import InvalidArgumentError
from remoteloss_server.losses.spec import MAX_DIMS

__all__ = ["BINARY_SIZE", "Body", "infer_request", "response"]

BINARY_SIZE = "binary_data_size"
BINARY_OUTPUT = "binary_data_output"
BINARY = "binary_data"
# JSON data: the numpy dtype each datatype's list is read into (BF16 through torch).
_NUMPY = {
    "BOOL": "|b1", "UINT8": "|u1", "INT8": "|i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}

Body = tuple[bytes | memoryview, dict[str, str]]  # the bytes to send and their headers


def infer_request(model: str, version: str, body: bytes, header_length: int | None) -> oip.InferRequest:
    """The request in ``body`` (its JSON the first ``header_length`` bytes when given); raises
    InvalidArgumentError naming what is wrong."""
    view = memoryview(body)
    size = len(body) if header_length is None else header_length
    if not 0 <= size <= len(body):
        raise InvalidArgumentError(
            f"{model}: Inference-Header-Content-Length is {size}, but the body has {len(body)} bytes"
        )
    text = bytes(view[:size])
    bools = b"true" in text or b"false" in text  # cheap, in C: most bodies need no look for them
    try:
        header = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"{model}: the request body is not JSON: {exc}") from None
    except RecursionError:  # json's scanner counts its depth against Python's recursion limit
        raise InvalidArgumentError(f"{model}: the request body's JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise InvalidArgumentError(f"{model}: the request body must be a JSON object")
    inputs, offset = [], size
    for sent in _list(model, header, "inputs"):
        name, datatype, shape, parameters = _head(model, sent)
        binary = parameters.pop(BINARY_SIZE, None)
        if binary is not None:
            if not isinstance(binary, int) or isinstance(binary, bool) or binary < 0 or offset + binary > len(body):
                raise InvalidArgumentError(f"{model}: input {name}: {BINARY_SIZE} {binary!r} does not fit the body")
            data: bytes | memoryview = view[offset:offset + binary]
            offset += binary
        else:
            data = _from_json(model, name, datatype, sent.get("data"), bools)
        inputs.append(oip.InferInput(name, datatype, shape, data, parameters))
    if offset != len(body):
        raise InvalidArgumentError(f"{model}: the body has {len(body) - offset} bytes that no input's {BINARY_SIZE} claims")
    outputs = [(_string(model, o, "name"), _parameters(model, o)) for o in _list(model, header, "outputs")]
    parameters = _parameters(model, header)
    return oip.InferRequest(model, version, str(header.get("id", "")), parameters, inputs, outputs or None)


def _list(model: str, header: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    value = header.get(key, [])
    if isinstance(value, list):
        oip.check_listed(model, key, len(value), oip.MAX_LISTED_TENSORS)
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise InvalidArgumentError(f"{model}: {key} must be a list of objects")
    return value


def _string(model: str, sent: Mapping[str, Any], key: str) -> str:
    value = sent.get(key)
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{model}: each input and output needs a string {key!r}, got {value!r}")
    return value


def _parameters(model: str, sent: Mapping[str, Any]) -> dict[str, Any]:
    value = sent.get("parameters", {})
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"{model}: parameters must be an object")
    oip.check_listed(model, "parameters", len(value), oip.MAX_LISTED_PARAMETERS)
    return dict(value)


def _head(model: str, sent: Mapping[str, Any]) -> tuple[str, str, tuple[int, ...], dict[str, Any]]:
    name, datatype = _string(model, sent, "name"), _string(model, sent, "datatype")
    shape = sent.get("shape")
    if isinstance(shape, list) and len(shape) > MAX_DIMS:  # before a look at each entry
        raise InvalidArgumentError(f"{model}: input {name}: shape has {len(shape)} dimensions, more than the limit of {MAX_DIMS}")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise InvalidArgumentError(f"{model}: input {name}: shape must be a list of integers, got {shape!r}")
    return name, datatype, tuple(shape), _parameters(model, sent)


def _from_json(model: str, name: str, datatype: str, data: Any, bools: bool) -> bytes:
    """An input's JSON ``data`` (nested or flat, row-major) as bytes; a datatype this server does
    not take gives no bytes, and the intake refuses it in the native words. ``bools``: whether
    the JSON may hold true or false anywhere (numpy would read them among numbers as 1 and 0)."""
    if data is None:
        raise InvalidArgumentError(f"{model}: input {name} has neither data nor {BINARY_SIZE}")
    try:
        if bools and datatype != "BOOL" and isinstance(data, list) and _holds_bool(data):
            raise ValueError(f"values of bool in {datatype} data")
        if datatype == "BF16":
            return torch.tensor(data, dtype=torch.bfloat16).flatten().view(torch.int16).numpy().tobytes()
        dtype = _NUMPY.get(datatype)
        if dtype is None:
            return b""
        array = np.asarray(data)
        kind = array.dtype.kind
        if array.size and (kind not in "biuf" or (kind == "f" and datatype not in ("FP16", "FP32", "FP64"))
                           or (kind == "b") != (datatype == "BOOL")):  # true and false are BOOL's values, only theirs
            raise ValueError(f"values of {array.dtype} in {datatype} data")
        if array.size and kind in "iu" and np.dtype(dtype).kind in "iu":  # a cast would wrap them around
            limits = np.iinfo(dtype)
            if array.min() < limits.min or array.max() > limits.max:
                raise ValueError(f"values outside [{limits.min}, {limits.max}]")
        with np.errstate(over="ignore", invalid="ignore"):  # past the datatype's range: inf, as a C cast; no warning
            return array.astype(dtype, casting="unsafe").tobytes()
    except (ValueError, TypeError, OverflowError, RuntimeError) as exc:
        raise InvalidArgumentError(f"{model}: input {name}: its data is not a list of {datatype} values: {exc}") from None


def _holds_bool(data: list[Any]) -> bool:
    """Whether ``data`` holds true or false at any depth: a type per element, in C (about 30 ns
    each; JSON is at most 1 MiB)."""
    try:
        values = np.asarray(data, dtype=object).ravel()
    except ValueError:  # ragged: refused below, as numpy reads it
        return False
    return bool in set(map(type, values))


def check_outputs(request: oip.InferRequest, sizes: Mapping[str, int]) -> None:
    """InvalidArgumentError where the outputs of ``sizes`` (name: its elements, or at least that
    many) would write over ``oip.MAX_LISTED_ELEMENTS`` as JSON."""
    as_json = [name for name in sizes if not _binary(request, name)]
    if sum(sizes[name] for name in as_json) > oip.MAX_LISTED_ELEMENTS:
        raise InvalidArgumentError(
            f"{request.model}: the outputs {', '.join(as_json)} have over {oip.MAX_LISTED_ELEMENTS} "
            f"elements to write as JSON; ask for them as binary data ({BINARY}: true, or {BINARY_OUTPUT}: true)"
        )


def _binary(request: oip.InferRequest, name: str) -> bool:
    """Whether the output ``name`` travels as bytes after the JSON."""
    asked = dict(request.outputs or ()).get(name, {})
    return asked.get(BINARY, request.parameters.get(BINARY_OUTPUT) is True) is True


def response(request: oip.InferRequest, answer_outputs: list[oip.Output], warnings: dict[str, Any]) -> Body:
    """The answer's body and headers: JSON, then the binary outputs' bytes (``check_outputs`` first)."""
    outputs, tail = [], []
    for output in answer_outputs:
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": list(output.shape)}
        if _binary(request, output.name):
            entry["parameters"] = {BINARY_SIZE: output.data.nbytes}
            tail.append(output.data)
        else:
            entry["data"] = output.tensor.detach().double().flatten().tolist() if output.tensor.is_floating_point() \
                else output.tensor.flatten().tolist()
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": request.model, "model_version": oip.VERSION, "outputs": outputs}
    if request.id:
        body["id"] = request.id
    if warnings:
        body["parameters"] = warnings
    header = json.dumps(body, allow_nan=True).encode()
    if not tail:
        return header, {"Content-Type": "application/json"}
    return b"".join((header, *tail)), {
        "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header)),
    }
