"""Where a small request's time goes inside the server: each stage of its path, in this process.

    python bench/stages.py [--loss mse_loss] [--shape 1000] [--grad] [--device cpu]

No transport: the real ``LossServicer.Compute`` is called with the request's bytes and a minimal
stand-in for gRPC's context, one request at a time (the path a lone caller takes) and 64 at once
(the path that batches), then each stage alone on the same request. Prints microseconds per
request (the best of three repeats): a profile in numbers, to set beside the echo and floor
servers of ``bench/run.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import timeit
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from remoteloss import codec
from remoteloss_bench.payload import build, parse_shape
from remoteloss.v1 import loss_pb2 as pb
from remoteloss_server import framing
from remoteloss_server.app import admission, scheduling_policy
from remoteloss_server.batcher import Batcher
from remoteloss_server.config import ServerConfig
from remoteloss_server.executor import Executor
from remoteloss_server.intake import Intake, prepare, receive
from remoteloss_server.limits import request_elements
from remoteloss_server.metrics import Metrics
from remoteloss_server.servicer import LossServicer
from remoteloss_server.telemetry import RequestRecord


class _Context:
    """What the servicer reads of grpc.aio's ServicerContext."""

    def __init__(self) -> None:
        self._done: list[Callable[[Any], None]] = []

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    def time_remaining(self) -> float | None:
        return None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._done.append(callback)

    def finish(self) -> None:
        """The calls' answers have left: their budgets are released, as gRPC's done callbacks do."""
        done, self._done = self._done, []
        for callback in done:
            callback(self)

    async def abort(self, code: Any, details: str = "") -> None:
        raise RuntimeError(f"{code}: {details}")


def _per_call(function: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(function, number=number, repeat=3)) / number * 1e6


async def handler_microseconds(data: bytes, device: str, rounds: int, together: int) -> float:
    """Microseconds per request through ``Compute``, ``together`` requests at a time."""
    defaults = ServerConfig()
    executor = Executor(device, defaults.torch_threads)
    metrics = Metrics()
    with ThreadPoolExecutor(defaults.compute_threads) as pool:
        policy = scheduling_policy(defaults, executor.device.type)
        budgets = admission(defaults)
        batcher = Batcher(executor, pool, metrics, policy, alone=lambda: budgets.pending == 1)
        intake = Intake(policy, max_elements=defaults.max_elements, max_request_elements=defaults.max_request_elements)
        servicer = LossServicer(executor, pool, metrics, intake=intake, batcher=batcher, admission=budgets)
        await batcher.start()
        context: Any = _Context()
        best = float("inf")
        for _ in range(3):
            begin = time.perf_counter()
            for _ in range(rounds):
                await asyncio.gather(*(servicer.Compute(data, context) for _ in range(together)))
                context.finish()
            best = min(best, (time.perf_counter() - begin) / (rounds * together) * 1e6)
        await batcher.close()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--loss", default="mse_loss")
    parser.add_argument("--shape", type=parse_shape, default=(1000,))
    parser.add_argument("--grad", action="store_true")
    parser.add_argument("--device", default="cpu", help="as the server's --device (default: cpu)")
    args = parser.parse_args()
    torch.set_num_threads(ServerConfig().torch_threads)
    data = build(args.loss, args.shape, "float32", grad=args.grad).SerializeToString()
    request = pb.ComputeRequest.FromString(data)
    executor = Executor(args.device, 1)
    call, grad_output = prepare(args.loss, request)
    result = executor.run(call, grad_output)
    metrics = Metrics()

    def record() -> None:
        entry = RequestRecord(metrics, args.loss, "id", len(data))
        entry.elements = request_elements(getattr(request, args.loss))
        entry.finish("OK", 16)

    n = 5000
    rows = {
        "Compute, one request at a time (handler to answer bytes)": asyncio.run(
            handler_microseconds(data, args.device, n // 10, 1)),
        "Compute, 64 requests at a time (batched), per request": asyncio.run(handler_microseconds(data, args.device, n // 640, 64)),
        "parse and unknown-field check": _per_call(lambda: receive(data, pb.ComputeRequest), n),
        "decode and validate (prepare, fresh message)": _per_call(
            lambda: prepare(args.loss, pb.ComputeRequest.FromString(data)), n),
        "compute (Executor.run)": _per_call(lambda: executor.run(call, grad_output), n),
        "  of which torch's loss function alone (on the host)": _per_call(
            lambda: call.function(**call.tensors, **call.options), n),
        "serialize the answer": _per_call(lambda: framing.answer(result), n),
        "  of which encoding the loss value": _per_call(
            lambda: codec.encode(result.loss, name="loss", requires_grad=False), n),
        "metrics and log record": _per_call(record, n),
    }
    grad = " + gradient" if args.grad else ""
    print(f"{args.loss} {'x'.join(map(str, args.shape))} float32{grad} on {executor.device}, {len(data)} B: "
          "us per request")
    for name, value in rows.items():
        print(f"{value:9.1f}  {name}")


if __name__ == "__main__":
    main()
