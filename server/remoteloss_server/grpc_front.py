"""The gRPC port's server: grpc.aio's (``--front python``) or gRPC's C++ core (``--front native``,
``native_front``), built with the same limits; the servicers register on either alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import grpc

from remoteloss_server import auth, native_front
from remoteloss_server.config import ServerConfig
from remoteloss_server.tls_copy import TlsCopy

__all__ = ["Server", "arriving", "kind", "server"]

Server = Union[grpc.aio.Server, native_front.NativeServer]

_HANDSHAKE_TIMEOUT_MS = 10_000  # a new connection's TLS and HTTP/2 handshakes
_IDENTITY_ONLY = 1  # a bit set of gRPC's compression algorithms: bit 0, identity, alone


def kind(config: ServerConfig) -> str:
    """The front ``config`` runs: "native" or "python" ("auto" resolved)."""
    if config.front != "auto":
        return config.front
    return "native" if native_front.available() else "python"


def server(
    config: ServerConfig, interceptor: auth.ApiKeyInterceptor | None, certificates: auth.ServerCertificates | None = None
) -> Server:
    """The gRPC server ``config.front`` names, with ``interceptor`` (the API keys' check, if any);
    the native one serves TLS from a copy of ``certificates``' files (see ``tls_copy``)."""
    limit = config.max_message_bytes
    options = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        # One process: a port already taken is an error. --workers N: N processes share it.
        ("grpc.so_reuseport", 1 if config.workers > 1 else 0),
        # No compression, either way: gRPC refuses a compressed request before inflating it
        # (UNIMPLEMENTED), so a few KiB on the wire cannot become gigabytes in the server.
        ("grpc.compression_enabled_algorithms_bitset", _IDENTITY_ONLY),
        # Connections: a bounded number (one more is closed at once; the native front's core, 1.51,
        # ignores this argument, and the front counts what it accepts), each given 10 s to finish
        # its handshake (gRPC's default is 120 s), and closed once idle.
        ("grpc.max_allowed_incoming_connections", config.max_connections),
        ("grpc.max_concurrent_streams", config.max_connection_in_flight),  # gRPC's default: unbounded
        ("grpc.server_handshake_timeout_ms", _HANDSHAKE_TIMEOUT_MS),
        *([("grpc.max_connection_idle_ms", round(config.connection_idle_s * 1000))]
          if config.connection_idle_s > 0 else []),
    ]
    interceptors = [] if interceptor is None else [interceptor]
    if kind(config) == "native":
        # gRPC's core holds what arrives for calls not yet whole; its resource quota bounds that
        # memory, which grpc.aio cannot (the Python wheel does not expose the quota). Once full,
        # the core sheds calls (RESOURCE_EXHAUSTED, which the SDK retries), whoever's they are, so
        # the quota leaves room for one whole request beside a full budget: a single request,
        # however large, is refused by the budgets, not shed with a bystander's call.
        tls = None
        if certificates is not None:
            tls = TlsCopy(client_ca=config.tls_client_ca is not None)
            certificates.follow(tls.write)
        return native_front.NativeServer(
            interceptors, options, max_connections=config.max_connections, reuse_port=config.workers > 1,
            memory_bytes=config.max_in_flight_bytes + config.max_message_bytes, tls=tls,
            busy_poll_s=config.busy_poll_us / 1e6,
        )
    return grpc.aio.server(interceptors=interceptors, options=options)


def arriving(server: Server) -> Callable[[], int]:
    """How many requests have reached ``server`` without reaching their handlers yet. The native
    front hands out what arrived in batches, and its handlers run one after another, so a call
    alone in the admission budgets may have others right behind it (``NativeServer.arriving``);
    grpc.aio starts each call as a task of its own, and a call alone in the budgets is alone."""
    if isinstance(server, native_front.NativeServer):
        return lambda: server.arriving
    return lambda: 0
