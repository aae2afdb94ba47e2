"""``remoteloss compute LOSS --arg NAME=FILE.npy --opt NAME=VALUE [--grad [NAME ...]]``.

The request is built from the loss's message descriptor: each ``--arg`` names a Tensor field
(torch's tensor argument), each ``--opt`` any other field, its text read by the field's type
(bool, integer, float, string, enum by name, or a message as protobuf JSON). The loss is
printed; each gradient is written to ``OUT_DIR/grad_<name>.npy``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from remoteloss import codec
from remoteloss._client import Client
from remoteloss._errors import InternalServerError
from remoteloss._request import LOSS_NAMES, Request, tensor_names
from remoteloss.cli import UsageError, connection
from remoteloss.v1 import loss_pb2 as pb

__all__ = ["add_arguments", "build_request", "parse_option", "run"]

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_INTEGERS = frozenset({
    FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SINT32,
})
_FLOATS = frozenset({FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Compute one loss. Tensors come from .npy files (numpy.save); options are read by their "
        "type in the .proto: --opt reduction=sum, --opt ignore_index=-1, --opt log_target=true, "
        "--opt 'distance_function={\"cosine_distance\": {\"dim\": 1}}'. "
        "`remoteloss losses LOSS` lists a loss's arguments."
    )
    parser.usage = (
        "%(prog)s LOSS [--arg NAME=FILE.npy ...] [--opt NAME=VALUE ...] [--grad [NAME ...]] "
        "[--grad-output FILE.npy] [--out-dir DIR] [--json]"
    )
    # Optional to argparse only so that `--grad NAME... LOSS` works (see _Grad); run requires it.
    parser.add_argument("loss", nargs="?", default=argparse.SUPPRESS, metavar="LOSS",
                        help="the torch.nn.functional name, e.g. mse_loss")
    parser.add_argument("--arg", action="append", default=[], metavar="NAME=FILE.npy",
                        help="a tensor argument (repeatable)")
    parser.add_argument("--opt", action="append", default=[], metavar="NAME=VALUE",
                        help="a non-tensor argument (repeatable)")
    parser.add_argument("--grad", nargs="*", action=_Grad, metavar="NAME",
                        help="write the gradients with respect to these tensors (none named: the first one)")
    parser.add_argument("--grad-output", metavar="FILE.npy",
                        help="the gradient flowing into the loss (default: ones)")
    parser.add_argument("--out-dir", type=Path, default=Path("."), metavar="DIR",
                        help="where grad_<name>.npy files go (default: the current directory)")
    parser.add_argument("--json", action="store_true",
                        help="print {loss, dtype, shape, gradients: {name: file}, warnings} as JSON")


class _Grad(argparse.Action):
    """``--grad [NAME ...]``: argparse gives it every word up to the next option, the loss name
    too when ``--grad`` comes before it (``compute --grad input mse_loss``). A loss name is never
    a tensor's name, so the first one goes to LOSS when LOSS is still unset."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        names = list(values)
        if not hasattr(namespace, "loss"):
            for name in names:
                if name in LOSS_NAMES:
                    namespace.loss = name
                    names.remove(name)
                    break
        setattr(namespace, self.dest, names)


def run(args: argparse.Namespace) -> int:
    if not hasattr(args, "loss"):
        raise UsageError("compute: LOSS is required, e.g. `remoteloss compute mse_loss --arg input=x.npy ...`")
    request, wrt = build_request(args.loss, args.arg, args.opt, args.grad, args.grad_output)
    with Client(args.target, timeout=args.timeout, **connection(args)) as client:
        answer = client._transport.compute(Request(request))
    response = answer.message
    for text in response.warnings:
        print(f"remoteloss: warning: {text}", file=sys.stderr)
    loss = codec.decode_numpy(response.loss, "loss", data=answer.data(response.loss))
    written: dict[str, str] = {}
    if wrt:
        args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in wrt:
        if name not in response.gradients:
            raise InternalServerError(f"{args.loss}: the server's answer lacks the gradient of {name!r}")
        path = args.out_dir / f"grad_{name}.npy"
        gradient = response.gradients[name]
        np.save(path, codec.decode_numpy(gradient, f"gradients[{name}]", data=answer.data(gradient)))
        written[name] = str(path)
        if not args.json:
            print(f"remoteloss: wrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps({
            "loss": loss.tolist(),
            "dtype": codec.DTYPES[response.loss.dtype].name,
            "shape": list(loss.shape),
            "gradients": written,
            "warnings": list(response.warnings),
        }))
    elif loss.ndim == 0:
        print(loss.item())
    else:
        print(np.array2string(loss, threshold=sys.maxsize, separator=", "))
    return 0


def build_request(
    loss: str,
    tensors: list[str],
    options: list[str],
    grad: list[str] | None,
    grad_output: str | None = None,
) -> tuple[pb.ComputeRequest, tuple[str, ...]]:
    """The request and the names whose gradients it asks for; UsageError for anything wrong."""
    if loss not in LOSS_NAMES:
        raise UsageError(f"unknown loss {loss!r}; one of: {', '.join(LOSS_NAMES)}")
    names = tensor_names(loss)
    request = pb.ComputeRequest()
    message = getattr(request, loss)
    message.SetInParent()
    arrays = {name: _load(name, path) for name, path in _pairs("--arg", tensors, names).items()}
    wrt = tuple(dict.fromkeys(names[:1] if grad == [] else (grad or ())))
    for name in wrt:
        if name not in names:
            raise UsageError(f"--grad: {loss} has no tensor argument {name!r}; tensors: {', '.join(names)}")
        if name not in arrays:
            raise UsageError(f"--grad {name}: give {name} with --arg {name}=FILE.npy")
    try:
        for name, array in arrays.items():
            getattr(message, name).CopyFrom(codec.encode(array, name=name, requires_grad=name in wrt))
            codec.check_tensor(getattr(message, name), name)
        if grad_output is not None:
            request.grad_output.CopyFrom(codec.encode(_load("grad_output", grad_output), name="grad_output"))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    fields = message.DESCRIPTOR.fields_by_name
    scalars = tuple(name for name in fields if name not in names)
    for name, text in _pairs("--opt", options, scalars).items():
        parse_option(message, fields[name], text)
    return request, wrt


def parse_option(message: Message, field: FieldDescriptor, text: str) -> None:
    """Set ``field`` of ``message`` from its command-line text, read by the field's type."""
    name = field.name
    if field.message_type is not None:
        try:
            json_format.Parse(text, getattr(message, name))
        except json_format.ParseError as exc:
            raise UsageError(f"--opt {name}: expected {field.message_type.name} as JSON: {exc}") from None
        return
    value: Any
    if field.enum_type is not None:
        value = _enum(field.enum_type, name, text)
    elif field.type == FieldDescriptor.TYPE_BOOL:
        if text.lower() not in _TRUE | _FALSE:
            raise UsageError(f"--opt {name}: expected true or false, got {text!r}")
        value = text.lower() in _TRUE
    elif field.type in _INTEGERS:
        try:
            value = int(text)
        except ValueError:
            raise UsageError(f"--opt {name}: expected an integer, got {text!r}") from None
    elif field.type in _FLOATS:
        try:
            value = float(text)
        except ValueError:
            raise UsageError(f"--opt {name}: expected a number, got {text!r}") from None
    else:
        value = text
    try:
        setattr(message, name, value)
    except ValueError as exc:  # out of the field's range
        raise UsageError(f"--opt {name}: {exc}") from None


def _enum(enum: EnumDescriptor, name: str, text: str) -> int:
    """An enum value by its name, with or without the enum's prefix, in any case."""
    prefix = enum.values[0].name.removesuffix("UNSPECIFIED")  # "REDUCTION_"
    wanted = text.upper()
    for value in enum.values:
        if value.number != 0 and value.name in (wanted, prefix + wanted):
            return int(value.number)
    choices = [value.name.removeprefix(prefix).lower() for value in enum.values if value.number != 0]
    raise UsageError(f"--opt {name}: expected one of {', '.join(choices)}, got {text!r}")


def _pairs(flag: str, items: list[str], allowed: tuple[str, ...]) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"{flag}: expected NAME=VALUE, got {item!r}")
        if name not in allowed:
            raise UsageError(f"{flag}: no argument {name!r} here; expected one of: {', '.join(allowed)}")
        if name in pairs:
            raise UsageError(f"{flag}: {name} is given twice")
        pairs[name] = value
    return pairs


def _load(name: str, path: str) -> np.ndarray[Any, Any]:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{name}: cannot read {path}: {exc}") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        array.close()
        raise UsageError(f"{name}: {path} holds several arrays; give one .npy file per tensor")
    return array
