"""The losses as the Open Inference Protocol's models, protocol-neutral (no grpc, no HTTP).

One model per loss of the catalog (``LOSSES``, as ListLosses describes it), named after its
``torch.nn.functional`` function, version "1":

- inputs: the loss's tensor arguments, by torch's names, plus ``grad_output``; a gradient is
  asked with the input parameter ``requires_grad: true`` (or by asking its output);
- parameters of the request: the loss's options by torch's names and types (``reduction:
  "sum"``, ``label_smoothing: 0.1``; ``distance_function`` and ``options`` as protobuf JSON, as
  the command line takes them; ``var`` as a number for ``var_float``);
- outputs: ``loss``, and ``grad_<argument>`` for each argument that can require grad.

Metadata and configuration list the *required* inputs only, each with one datatype (FP32 where
the argument takes it, else INT64, else its first) and shape ``[-1]`` (any shape: torch's rule is
in ListLosses and in the configuration's ``parameters``), and the output ``loss`` only; optional
inputs and the gradients' outputs are accepted all the same (the configuration's parameters
``optional_inputs`` and ``gradient_outputs`` name them). perf_analyzer asks a ``--shape`` for
every listed input and asks for every listed output, so ``perf_analyzer --shape input:N --shape
target:N`` needs nothing else and measures the loss alone; every datatype ListLosses gives is
taken. A request becomes a native ``ComputeRequest`` (``to_compute``), checked by ``intake``
exactly as the native API's: the same messages for the same mistakes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from remoteloss import _wire as wire
from remoteloss import codec
from remoteloss.v1 import loss_pb2 as pb
from remoteloss_server import __version__
from remoteloss_server.errors import InvalidArgumentError, NotFoundError
from remoteloss_server.executor import Result
from remoteloss_server.losses import LOSSES, Call, LossSpec, describe

__all__ = [
    "DATATYPES",
    "EXTENSIONS",
    "GRAD_OUTPUT",
    "MODELS",
    "SERVER_NAME",
    "VERSION",
    "InferInput",
    "InferRequest",
    "Model",
    "Output",
    "find",
    "server_metadata",
]

SERVER_NAME = "remoteloss"
VERSION = "1"  # each model's one version
GRAD_OUTPUT = "grad_output"
LOSS_OUTPUT = "loss"
GRAD_PREFIX = "grad_"
REQUIRES_GRAD = "requires_grad"
# Elements a request's typed contents (gRPC) or an answer's JSON lists may hold in all: each one
# is a Python object made or read while holding the GIL, which stalls every other caller (json.dumps
# writes 2**18 floats in about 250 ms on a 2-core Xeon, and a 10 KiB request can ask for that many
# by broadcasting; 2**16 in 43-50 ms). Larger tensors travel as raw bytes (raw_input_contents;
# HTTP's binary data).
MAX_LISTED_ELEMENTS = 2**16
# Tensors (inputs, outputs) and parameters (in each map) a request may list, checked before any
# is read: each is Python work while holding the GIL (70,000 tiny inputs in 4 MiB of JSON took
# oip_json 0.8 s on a loaded 2-core host). No loss has more than 4 tensors, and 5 outputs.
MAX_LISTED_TENSORS = 16
MAX_LISTED_PARAMETERS = 64
EXTENSIONS = ("model_configuration", "statistics", "binary_tensor_data")
# Request parameters that clients send on their own and that change nothing here.
# (binary_data_output and an output's binary_data: how the HTTP answer carries outputs.)
IGNORED_PARAMETERS = frozenset({"priority", "timeout", "triton_enable_empty_final_response", "binary_data_output"})
IGNORED_OUTPUT_PARAMETERS = frozenset({"binary_data"})
# The protocol's datatype names of the native dtypes; UINT16, UINT32, UINT64 and BYTES have none.
DATATYPES: dict[str, pb.DType] = {
    "BOOL": pb.DTYPE_BOOL, "UINT8": pb.DTYPE_UINT8, "INT8": pb.DTYPE_INT8, "INT16": pb.DTYPE_INT16,
    "INT32": pb.DTYPE_INT32, "INT64": pb.DTYPE_INT64, "FP16": pb.DTYPE_FLOAT16, "BF16": pb.DTYPE_BFLOAT16,
    "FP32": pb.DTYPE_FLOAT32, "FP64": pb.DTYPE_FLOAT64,
}
NAMES: dict[int, str] = {int(code): name for name, code in DATATYPES.items()}
_FLOAT_SUFFIX = "_float"  # gaussian_nll_loss: the number form of `var`
_KINDS = {
    FieldDescriptor.TYPE_BOOL: (bool, "a bool"),
    FieldDescriptor.TYPE_INT64: (int, "an int64"),
    FieldDescriptor.TYPE_DOUBLE: (float, "a number"),
    FieldDescriptor.TYPE_STRING: (str, "a string"),
}


@dataclass(frozen=True)
class InferInput:
    """One input tensor as a protocol received it: its bytes are little-endian, row-major."""

    name: str
    datatype: str
    shape: Sequence[int]
    data: bytes | memoryview
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InferRequest:
    """An inference request as a protocol received it; ``outputs`` None: the default outputs."""

    model: str
    version: str
    id: str
    parameters: Mapping[str, Any]
    inputs: Sequence[InferInput]
    outputs: Sequence[tuple[str, Mapping[str, Any]]] | None = None


@dataclass(frozen=True)
class Output:
    """One output tensor: its datatype, shape and bytes (little-endian, row-major)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: memoryview
    tensor: torch.Tensor


def _advertised(dtypes: frozenset[torch.dtype]) -> str:
    codes = {codec.dtype_from_torch(d) for d in dtypes}
    for preferred in (pb.DTYPE_FLOAT32, pb.DTYPE_INT64):
        if preferred in codes:
            return NAMES[preferred]
    return NAMES[min(codes)]


class Model:
    """One loss as a model: its metadata, configuration, and requests to native requests."""

    def __init__(self, spec: LossSpec) -> None:
        self.name = spec.name
        self.info = describe(spec)
        self._descriptor = spec.descriptor
        self.tensors = tuple(t.name for t in self.info.tensors)
        by_name = {t.name: t for t in spec.tensors}
        self.required = tuple((t.name, _advertised(by_name[t.name].dtypes)) for t in self.info.tensors if t.required)
        self.optional = tuple(t.name for t in self.info.tensors if not t.required) + (GRAD_OUTPUT,)
        self.gradients = tuple(t.name for t in self.info.tensors if t.differentiable)
        self.outputs = (LOSS_OUTPUT, *(GRAD_PREFIX + name for name in self.gradients))
        self.options = tuple(o.name for o in self.info.options)

    def metadata(self) -> dict[str, Any]:
        """ModelMetadata, as the protocol's JSON."""
        return {
            "name": self.name,
            "versions": [VERSION],
            "platform": SERVER_NAME,
            "inputs": [{"name": name, "datatype": dt, "shape": [-1]} for name, dt in self.required],
            "outputs": [{"name": LOSS_OUTPUT, "datatype": "FP32", "shape": [-1]}],
        }

    def config(self) -> dict[str, Any]:
        """Triton's ModelConfig, as its JSON (enums by name, sizes as numbers): no batch dimension."""
        shapes = {t.name: t.shape for t in self.info.tensors}
        parameters = {
            "optional_inputs": ", ".join(self.optional),
            "gradient_outputs": ", ".join(self.outputs[1:]),
            "options": ", ".join(self.options),
            "gradients": "set requires_grad: true in an input's parameters; its gradient is output grad_<input>",
            **{f"shape_{name}": shapes[name] for name in self.tensors},
        }
        return {
            "name": self.name,
            "platform": SERVER_NAME,
            "backend": SERVER_NAME,
            "max_batch_size": 0,
            "input": [
                {"name": name, "data_type": f"TYPE_{dt}", "format": "FORMAT_NONE", "dims": [-1], "optional": False}
                for name, dt in self.required
            ],
            "output": [{"name": LOSS_OUTPUT, "data_type": "TYPE_FP32", "dims": [-1]}],
            "parameters": {key: {"string_value": value} for key, value in parameters.items()},
            "model_transaction_policy": {"decoupled": False},
        }

    def to_compute(self, request: InferRequest) -> tuple[pb.ComputeRequest, wire.Payloads, tuple[str, ...]]:
        """The native request (each tensor's data a placeholder of the payloads, not a copy) and the
        outputs to answer, in order; InvalidArgumentError for what only this protocol can get wrong."""
        wanted = self._outputs(request)
        asked = {name.removeprefix(GRAD_PREFIX) for name in wanted if name != LOSS_OUTPUT}
        compute = pb.ComputeRequest()
        message = getattr(compute, self.name)
        message.SetInParent()
        payloads = wire.Payloads()
        seen: set[str] = set()
        for sent in request.inputs:
            target = self._input(compute, message, sent, seen)
            target.dtype = self._datatype(sent)
            target.shape.extend(sent.shape)
            target.data = payloads.add(sent.data)
            target.requires_grad = self._requires_grad(sent) or sent.name in asked
        for name in sorted(asked - seen):
            self._fail(f"output {GRAD_PREFIX}{name} was asked, but no input {name} was sent")
        for name, value in request.parameters.items():
            if name not in IGNORED_PARAMETERS:
                self._option(message, name, value)
        if not request.outputs:
            wanted = (LOSS_OUTPUT, *(GRAD_PREFIX + s.name for s in request.inputs
                                     if s.name != GRAD_OUTPUT and getattr(message, s.name).requires_grad))
        return compute, payloads, wanted

    def _outputs(self, request: InferRequest) -> tuple[str, ...]:
        names = []
        for name, parameters in request.outputs or ():
            if name not in self.outputs:
                self._fail(f"no output {name!r}; outputs: {', '.join(self.outputs)}")
            for key in set(parameters) - IGNORED_OUTPUT_PARAMETERS:
                self._fail(f"output {name} has the parameter {key!r}, which this server does not take")
            names.append(name)
        if len(set(names)) != len(names):
            self._fail("an output is asked twice")
        return tuple(names)

    def _input(self, compute: pb.ComputeRequest, message: Any, sent: InferInput, seen: set[str]) -> pb.Tensor:
        if sent.name != GRAD_OUTPUT and sent.name not in self.tensors:
            self._fail(f"no input {sent.name!r}; inputs: {', '.join((*self.tensors, GRAD_OUTPUT))}")
        if sent.name in seen:
            self._fail(f"input {sent.name} is given twice")
        seen.add(sent.name)
        tensor: pb.Tensor = compute.grad_output if sent.name == GRAD_OUTPUT else getattr(message, sent.name)
        return tensor

    def _datatype(self, sent: InferInput) -> pb.DType:
        code = DATATYPES.get(sent.datatype)
        if code is None:
            self._fail(f"{sent.name} has datatype {sent.datatype!r}; this server takes {', '.join(DATATYPES)}")
        return code

    def _requires_grad(self, sent: InferInput) -> bool:
        for key, value in sent.parameters.items():
            if key != REQUIRES_GRAD:
                self._fail(f"input {sent.name} has the parameter {key!r}; an input takes only {REQUIRES_GRAD}")
            if not isinstance(value, bool):
                self._fail(f"input {sent.name}: {REQUIRES_GRAD} must be a bool, got {_kind(value)}")
        wanted = bool(sent.parameters.get(REQUIRES_GRAD, False))
        if wanted and sent.name == GRAD_OUTPUT:
            self._fail(f"{GRAD_OUTPUT} cannot require grad")
        return wanted

    def _option(self, message: Any, name: str, value: Any) -> None:
        fields = self._descriptor.fields_by_name
        if name in self.tensors and name + _FLOAT_SUFFIX in fields:
            name += _FLOAT_SUFFIX  # gaussian_nll_loss's var=0.5: the float form
        found = fields.get(name)
        if found is None or name in self.tensors:
            self._fail(f"no option {name!r}; options: {', '.join(self.options)}")
        if found.enum_type is pb.Reduction.DESCRIPTOR:
            number = pb.Reduction.DESCRIPTOR.values_by_name.get(f"REDUCTION_{value}".upper()) \
                if isinstance(value, str) else None
            if number is None or number.number == pb.REDUCTION_UNSPECIFIED:
                choices = [v.name.removeprefix("REDUCTION_").lower() for v in pb.Reduction.DESCRIPTOR.values][1:]
                self._fail(f"reduction must be one of {', '.join(choices)}, got {value!r}")
            message.reduction = number.number
        elif found.message_type is not None:
            self._message_option(message, found, value)
        else:
            kind, expected = _KINDS[found.type]
            if isinstance(value, bool) != (kind is bool) or not isinstance(value, (int, float) if kind is float else kind):
                self._fail(f"{name} must be {expected}, got {_kind(value)}")
            try:
                setattr(message, name, kind(value))
            except ValueError as exc:  # out of the field's range
                self._fail(f"{name}: {exc}")

    def _message_option(self, message: Any, found: FieldDescriptor, value: Any) -> None:
        kind = found.message_type.name if found.message_type is not None else found.name
        try:
            if isinstance(value, str):
                json_format.Parse(value, getattr(message, found.name))
            elif isinstance(value, dict):
                json_format.ParseDict(value, getattr(message, found.name))
            else:
                self._fail(f"{found.name} must be {kind} as JSON, got {_kind(value)}")
        except json_format.ParseError as exc:
            self._fail(f"{found.name}: expected {kind} as JSON: {exc}")

    @staticmethod
    def least_sizes(call: Call, wanted: Sequence[str]) -> dict[str, int]:
        """Before computing: at least how many elements each output asked for will hold (a
        gradient: its argument's; the loss: 0, its shape being the loss's own affair)."""
        sizes = {name: tensor.numel() for name, tensor in call.tensors.items()}
        return {name: 0 if name == LOSS_OUTPUT else sizes.get(name.removeprefix(GRAD_PREFIX), 0) for name in wanted}

    def outputs_of(self, result: Result, wanted: Sequence[str]) -> list[Output]:
        """The outputs asked for, from a computed result."""
        outputs = []
        for name in wanted:
            tensor = result.loss if name == LOSS_OUTPUT else result.gradients[name.removeprefix(GRAD_PREFIX)]
            head, data = codec.encode_view(tensor, name=name, requires_grad=False)
            outputs.append(Output(name, NAMES[head.dtype], tuple(head.shape), data, tensor))
        return outputs

    def _fail(self, message: str) -> NoReturn:
        raise InvalidArgumentError(f"{self.name}: {message}")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, int):
        return "an int"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return type(value).__name__


MODELS: dict[str, Model] = {name: Model(spec) for name, spec in LOSSES.items()}


def check_listed(model: str, what: str, count: int, limit: int) -> None:
    """InvalidArgumentError where a request lists more than ``limit`` ``what``."""
    if count > limit:
        raise InvalidArgumentError(f"{model}: the request lists {count} {what}, over the {limit} this server reads")


def find(name: str, version: str = "") -> Model:
    """The model ``name`` at ``version`` ("" or "1"); NotFoundError for another."""
    model = MODELS.get(name)
    if model is None:
        raise NotFoundError(f"no model {name!r}: the models are the losses, e.g. mse_loss (GET /v2/models/mse_loss)")
    if version not in ("", VERSION):
        raise NotFoundError(f"model {name} has no version {version!r}; its one version is {VERSION}")
    return model


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}


def warnings_parameter(result: Result) -> dict[str, Any]:
    """torch's warnings, as the answer's parameter ``warnings`` (a JSON list in a string)."""
    return {"warnings": json.dumps(result.warnings)} if result.warnings else {}
