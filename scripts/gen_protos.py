#!/usr/bin/env python3
"""Regenerate the gRPC stubs: client/remoteloss/v1/*_pb2*.py[i] from protos/remoteloss/v1/*.proto,
and server/remoteloss_server/inference/*_pb2.py[i] (the Open Inference Protocol's messages, which
only the server uses; no grpc stubs: the server registers its handlers itself) from
protos/inference/*.proto."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
WELL_KNOWN = Path(grpc_tools.__file__).resolve().parent / "_proto"  # google/protobuf/*.proto


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "client", help="output root (default: %(default)s)")
    parser.add_argument(
        "--server-out", type=Path, default=ROOT / "server" / "remoteloss_server",
        help="output root of the inference stubs (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    status = _native(args.out)
    return status or _inference(args.server_out)


def _native(out: Path) -> int:
    sources = sorted(str(p) for p in (PROTOS / "remoteloss" / "v1").glob("*.proto"))
    if not sources:
        print(f"gen_protos: no .proto files under {PROTOS / 'remoteloss' / 'v1'}", file=sys.stderr)
        return 1
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    return protoc.main([
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{WELL_KNOWN}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *sources,
    ])


def _inference(out: Path) -> int:
    sources = sorted(str(p) for p in (PROTOS / "inference").glob("*.proto"))
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    return protoc.main([
        "grpc_tools.protoc", f"-I{PROTOS}", f"--python_out={out}", f"--pyi_out={out}", *sources,
    ])


if __name__ == "__main__":
    sys.exit(main())
