"""A tenant's load in a process of its own: ``callers`` concurrent ``l1_loss`` calls (with the
gradient of ``input``; not ``mse_loss``, the bystander's loss, so that the metrics tell them
apart) of about ``elements`` float32 elements per tensor, sent again as each answers, until
stdin closes or SIGTERM; it then prints ``calls=N errors=M`` and exits. Caller ``i`` sends rows
of ``1000 + i`` columns (with ``distinct``; else 1000 for all), so each has a batch key of its
own, as callers with varied shapes would.

A process of its own, on one grpc.aio event loop with the request's bytes made once: a caller
measuring latency in the test process then competes with no load thread for its GIL, and the
load costs the machine as little CPU as it can.

    python -m tests.integration.tenant_load TARGET KEY CALLERS ELEMENTS [distinct]
"""

from __future__ import annotations

import asyncio
import signal
import sys

import grpc
import numpy as np
from remoteloss import codec
from remoteloss.v1 import loss_pb2 as pb

COMPUTE = "/remoteloss.v1.LossService/Compute"
_UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def request_bytes(elements: int, columns: int) -> bytes:
    x = np.random.default_rng(0).standard_normal((elements // columns, columns)).astype(np.float32)
    message = pb.L1Loss(input=codec.encode(x), target=codec.encode(x * 0.5))
    message.input.requires_grad = True
    return pb.ComputeRequest(l1_loss=message).SerializeToString()


async def main(target: str, key: str, callers: int, elements: int, distinct: bool) -> None:
    bodies = [request_bytes(elements, 1000 + (i if distinct else 0)) for i in range(callers)]
    metadata = (("authorization", f"Bearer {key}"),)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(sys.stdin.fileno(), stop.set)  # the test closes our stdin (or dies)
    calls = errors = 0
    async with grpc.aio.insecure_channel(target, options=_UNLIMITED) as channel:
        compute = channel.unary_unary(COMPUTE)

        async def caller(body: bytes) -> None:
            nonlocal calls, errors
            while not stop.is_set():
                try:
                    await compute(body, metadata=metadata, timeout=120)
                    calls += 1
                except grpc.aio.AioRpcError:
                    errors += 1

        tasks = [asyncio.create_task(caller(body)) for body in bodies]
        print("ready", flush=True)
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    print(f"calls={calls} errors={errors}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:] == ["distinct"]))
