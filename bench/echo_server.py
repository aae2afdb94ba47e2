"""A bare gRPC echo server: the transport's limit, against which remoteloss is measured.

    python bench/echo_server.py --port PORT [--malloc-mmap-threshold-bytes N] [--front native]

grpc.aio, one generic handler for every method that answers the request's bytes unchanged (no
protobuf parsing, no thread hop, no compute), with remoteloss-server's message-size limits. With
``--malloc-mmap-threshold-bytes`` it tunes glibc's malloc as remoteloss-server does, so that the
comparison isolates what remoteloss adds. With ``--front native`` the same handler runs on
remoteloss-server's own front (``remoteloss_server.native_front``: gRPC's C++ core, the handler on
the event loop, busy polling as remoteloss-server's default): what the server costs without its
handler, the handler's cost being the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import grpc

_LIMIT = 512 * 1024 * 1024  # remoteloss-server's default max_message_bytes


class _Echo(grpc.GenericRpcHandler):
    def __init__(self) -> None:
        async def echo(request: bytes, context: Any) -> bytes:
            return request

        self._handler = grpc.unary_unary_rpc_method_handler(echo)  # no (de)serializers: bytes in, bytes out

    def service(self, handler_call_details: Any) -> Any:
        return self._handler


async def _serve(port: int, front: str) -> None:
    options = [("grpc.max_receive_message_length", _LIMIT), ("grpc.max_send_message_length", _LIMIT)]
    server: Any
    if front == "native":
        from remoteloss_server.config import ServerConfig
        from remoteloss_server.native_front import NativeServer

        # Polling after its last call as remoteloss-server does by default, for a like-for-like row.
        server = NativeServer([], options, busy_poll_s=ServerConfig().busy_poll_us / 1e6)
    else:
        server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((_Echo(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await server.stop(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--malloc-mmap-threshold-bytes", type=int, default=0)
    parser.add_argument("--front", choices=("python", "native"), default="python",
                        help="grpc.aio (python, the default) or remoteloss-server's native front")
    args = parser.parse_args()
    if args.malloc_mmap_threshold_bytes:
        from remoteloss_server import allocator

        allocator.configure(args.malloc_mmap_threshold_bytes)
    asyncio.run(_serve(args.port, args.front))


if __name__ == "__main__":
    main()
