"""``remoteloss losses [NAME] [--json]``: what the server offers, from ListLosses."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from google.protobuf import json_format

from remoteloss._client import Client
from remoteloss.cli import UsageError, connection
from remoteloss.v1 import loss_pb2 as pb

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", metavar="LOSS", help="describe only this loss, in full")
    parser.add_argument("--json", action="store_true", help="print ListLosses' answer as JSON")


def run(args: argparse.Namespace) -> int:
    with Client(args.target, timeout=args.timeout, **connection(args)) as client:
        losses = list(client.list_losses().losses)
    if args.name is not None:
        losses = [info for info in losses if info.name == args.name]
        if not losses:
            raise UsageError(f"the server has no loss {args.name!r}; `remoteloss losses` lists them")
    if args.json:
        document = [json_format.MessageToDict(info, preserving_proto_field_name=True) for info in losses]
        print(json.dumps(document if args.name is None else document[0], indent=2))
    elif args.name is not None:
        print(_details(losses[0]))
    else:
        print(_table(losses))
    return 0


def _table(losses: Sequence[pb.LossInfo]) -> str:
    """One row per loss; [optional] tensors; deprecated options left out."""
    rows = [("LOSS", "TORCH.NN", "TENSORS ([optional])", "OPTIONS")]
    for info in losses:
        tensors = ", ".join(t.name if t.required else f"[{t.name}]" for t in info.tensors)
        options = ", ".join(o.name for o in info.options if not o.deprecated)
        rows.append((info.name, info.module, tensors, options))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3] for row in rows
    ).rstrip()


def _details(info: pb.LossInfo) -> str:
    dtype_names = {value.number: value.name.removeprefix("DTYPE_").lower() for value in pb.DType.DESCRIPTOR.values}
    lines = [f"{info.name} (torch.nn.{info.module}): {info.summary}", "", "tensors (--arg NAME=FILE.npy):"]
    for tensor in info.tensors:
        notes = ["required" if tensor.required else "optional"]
        if tensor.differentiable:
            notes.append("differentiable")
        lines.append(f"  {tensor.name}: {tensor.shape} [{', '.join(notes)}]")
        lines.append(f"      dtypes: {', '.join(dtype_names.get(d, str(d)) for d in tensor.dtypes)}")
    lines += ["", "options (--opt NAME=VALUE):"]
    for option in info.options:
        allowed = f", one of {', '.join(option.allowed_values)}" if option.allowed_values else ""
        deprecated = " (deprecated)" if option.deprecated else ""
        lines.append(f"  {option.name}: {option.type}, default {option.default_value}{allowed}{deprecated}")
    return "\n".join(lines)
