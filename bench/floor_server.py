"""A reference point, not a product: the least a Python gRPC loss server can do per request.

    python bench/floor_server.py --port PORT [--thread]

grpc.aio; Compute parses the ``ComputeRequest``, decodes ``mse_loss``'s input and target with
``remoteloss.codec``, computes ``F.mse_loss`` forward (no validation, no metrics, no batching,
no gradient) and answers the loss. Inline on the event loop, or with ``--thread`` on one
worker thread as remoteloss-server does. The suite runs it beside remoteloss to show how much
of remoteloss's per-request cost is gRPC-in-Python itself and how much is remoteloss's own.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import torch
import torch.nn.functional as F
from remoteloss import codec
from remoteloss.v1 import loss_pb2 as pb


def _compute(request: pb.ComputeRequest) -> pb.ComputeResponse:
    message = request.mse_loss
    inputs = codec.decode_torch(message.input, "input")
    target = codec.decode_torch(message.target, "target")
    with torch.inference_mode():
        loss = F.mse_loss(inputs, target)
    return pb.ComputeResponse(loss=codec.encode(loss, name="loss", requires_grad=False))


async def _serve(port: int, thread: bool) -> None:
    pool = ThreadPoolExecutor(1) if thread else None

    async def compute(request: pb.ComputeRequest, context: Any) -> pb.ComputeResponse:
        if pool is None:
            return _compute(request)
        return await asyncio.get_running_loop().run_in_executor(pool, _compute, request)

    handler = grpc.unary_unary_rpc_method_handler(
        compute, request_deserializer=pb.ComputeRequest.FromString,
        response_serializer=pb.ComputeResponse.SerializeToString,
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("remoteloss.v1.LossService",
                                                                          {"Compute": handler}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await server.stop(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--thread", action="store_true", help="compute on a worker thread, not the event loop")
    args = parser.parse_args()
    torch.set_num_threads(1)
    asyncio.run(_serve(args.port, args.thread))


if __name__ == "__main__":
    main()
