"""Where a small request's latency goes between a bare echo and a loss server, one step at a time.

    python bench/request_steps.py [--rounds 2] [--duration 3]

One grpc.aio server per step, each a generic bytes handler as ``bench/echo_server.py`` is, each
doing one step more than the one before: ``echo`` answers the request; ``parse`` parses it as a
``ComputeRequest`` (and answers a few bytes); ``decode`` also decodes its two tensors;
``mse_loss`` also computes ``F.mse_loss`` (one torch thread); ``mse_loss-twice`` computes it
twice; ``answer`` computes it once and encodes the loss as a ``ComputeResponse`` (what
``bench/floor_server.py`` does). One caller (``remoteloss bench --raw-response``, 1,000 float32
forward), p50 per step, the steps interleaved round by round. A step whose cost inside the server
is far above its cost in a hot loop (``F.mse_loss``: about 10 us) is paying for cold caches, not
for its work.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

from servers import BENCH_DIR, Client, Fleet, Server, free_port

STEPS = ("echo", "parse", "decode", "mse_loss", "mse_loss-twice", "answer")
_SMALL = b"\x0a\x12" + bytes(18)  # a few bytes of answer, as a loss value's message is


def _serve(step: str, port: int) -> None:
    import grpc

    if step != "echo":
        import torch
        import torch.nn.functional as F
        from remoteloss import codec
        from remoteloss.v1 import loss_pb2 as pb

        torch.set_num_threads(1)

    async def handle(request: bytes, context: Any) -> bytes:
        if step == "echo" or request == b"ping":  # the bench's readiness probe wants its bytes back
            return request
        message = pb.ComputeRequest.FromString(request)
        if step == "parse":
            return _SMALL
        x = codec.decode_torch(message.mse_loss.input, "input")
        y = codec.decode_torch(message.mse_loss.target, "target")
        if step == "decode":
            return _SMALL
        loss = F.mse_loss(x, y)
        if step == "mse_loss-twice":
            F.mse_loss(x, y)
        if step != "answer":
            return _SMALL
        return bytes(pb.ComputeResponse(loss=codec.encode(loss, name="loss", requires_grad=False)).SerializeToString())

    class Handler(grpc.GenericRpcHandler):
        def service(self, handler_call_details: Any) -> Any:
            return grpc.unary_unary_rpc_method_handler(handle)

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((Handler(),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--serve", nargs=2, metavar=("STEP", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve(args.serve[0], int(args.serve[1]))
        return
    client = Client()
    with tempfile.TemporaryDirectory(prefix="remoteloss-steps-") as folder, Fleet() as fleet:
        servers = []
        for step in STEPS:
            port = free_port()
            argv = [sys.executable, str(BENCH_DIR / "request_steps.py"), "--serve", step, str(port)]
            servers.append(Server(step, argv, port=port, kind="echo", logs=Path(folder)))
        fleet.start(*servers)
        print("round  step              p50 ms   req/s")
        for round_ in range(1, args.rounds + 1):
            for server in servers:
                level = client.bench(server, duration_s=args.duration)["level"]
                print(f"{round_:5d}  {server.name:16s} {level['latency_s']['p50'] * 1e3:7.3f}  "
                      f"{level['throughput_rps']:6.0f}")


if __name__ == "__main__":
    main()
