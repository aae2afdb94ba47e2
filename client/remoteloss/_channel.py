"""The client's gRPC channel: TLS, API keys, message-size limits, load balancing and retries."""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from remoteloss.v1 import loss_pb2 as pb

__all__ = [
    "API_KEY_ENV",
    "MAX_MESSAGE_BYTES",
    "SERVICE_CONFIG",
    "api_key_metadata",
    "create_aio_channel",
    "create_channel",
    "is_loopback",
    "tls_credentials",
]

API_KEY_ENV = "REMOTELOSS_API_KEY"  # the key a client sends when none is given
Pem = bytes | str | os.PathLike[str]  # PEM bytes, or the path of a PEM file

MAX_MESSAGE_BYTES = 512 * 1024 * 1024

_SERVICE = pb.DESCRIPTOR.services_by_name["LossService"].full_name

# round_robin spreads calls over every address a target resolves to. Compute is a pure
# function, so gRPC may retry it; UNAVAILABLE covers a restarting or draining server, and
# CANCELLED the calls a stopping server received but never handed to a handler, which gRPC's
# core cancels (grpc/grpc#41785). A cancel of the caller's own is never retried.
# RESOURCE_EXHAUSTED covers the call a server's gRPC core sheds when requests still arriving
# fill its memory quota (it may be anyone's); the server's own refusals (a budget or a queue
# full) carry a pushback that tells gRPC not to retry them.
# ComputeStream is left out: a stream's requests are sent again by the SDK itself
# (_stream_base), and gRPC's retry of a stream that a draining server ended before answering,
# with more requests still to come, could wait forever once that server had gone.
SERVICE_CONFIG: dict[str, Any] = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": _SERVICE}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.05s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED", "RESOURCE_EXHAUSTED"],
            },
        },
        {"name": [{"service": _SERVICE, "method": "ComputeStream"}]},  # no retryPolicy: see above
    ],
}

_DEFAULT_OPTIONS: dict[str, Any] = {
    "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
    "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
    "grpc.service_config": json.dumps(SERVICE_CONFIG),
    "grpc.enable_retries": 1,
    # gRPC stops retrying a call once it has sent more than this (default 256 KiB);
    # tensors are larger, so keep every request retryable.
    "grpc.per_rpc_retry_buffer_size": MAX_MESSAGE_BYTES,
}


def create_channel(
    target: str,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A channel to ``target``, TLS when ``credentials`` are given.

    ``options`` are gRPC channel arguments; one named like a default replaces it.
    """
    arguments = _merge(options)
    if credentials is None:
        return grpc.insecure_channel(target, options=arguments)
    return grpc.secure_channel(target, credentials, options=arguments)


def create_aio_channel(
    target: str,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """The ``grpc.aio`` twin of ``create_channel``, with the same defaults; create it inside the
    event loop that will use it."""
    arguments = _merge(options)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=arguments)
    return grpc.aio.secure_channel(target, credentials, options=arguments)


def _merge(options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return list({**_DEFAULT_OPTIONS, **dict(options)}.items())


def tls_credentials(
    *,
    tls: bool = False,
    root_certificates: Pem | None = None,
    client_cert: Pem | None = None,
    client_key: Pem | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> grpc.ChannelCredentials | None:
    """The channel credentials for a client's TLS settings; None for plaintext.

    ``tls=True`` trusts the system's root certificates; ``root_certificates`` (a CA bundle) also
    turns TLS on, and ``client_cert`` with ``client_key`` present a client certificate (mutual
    TLS). Each is PEM bytes or a file's path. ``credentials`` (ready-made) excludes the others.
    """
    if credentials is not None:
        if tls or root_certificates is not None or client_cert is not None or client_key is not None:
            raise ValueError("credentials excludes tls, root_certificates, client_cert and client_key")
        return credentials
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key go together")
    if not (tls or root_certificates is not None or client_cert is not None):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(root_certificates, "root_certificates"),
        private_key=_pem(client_key, "client_key"),
        certificate_chain=_pem(client_cert, "client_cert"),
    )


def _pem(value: Pem | None, name: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str | os.PathLike):
        return Path(value).read_bytes()
    raise TypeError(f"{name} must be PEM bytes or a file path, got {type(value).__name__}")


_API_KEY = re.compile(r"[!-~]+")  # a metadata value: printable ASCII; no spaces, as in "Bearer <key>"


def api_key_metadata(target: str, api_key: str | None, *, secure: bool) -> tuple[tuple[str, str], ...]:
    """``(("authorization", "Bearer <key>"),)`` for ``api_key``, else for ``$REMOTELOSS_API_KEY``;
    ``()`` when neither is set.

    A key goes as metadata on each call. Over plaintext that is allowed only to a loopback or
    local-socket target, as gRPC allows call credentials only on secure channels: anywhere else
    it raises ValueError rather than send the key where anyone on the path can read it.
    """
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    if key is None:
        return ()
    if not isinstance(key, str) or not _API_KEY.fullmatch(key):
        raise ValueError("api_key must be printable ASCII without spaces")
    if not secure and not is_loopback(target):
        raise ValueError(
            f"an API key would travel in plaintext to {target}: use TLS (tls=True, root_certificates=... or "
            "credentials=...), or a loopback target"
        )
    return (("authorization", f"Bearer {key}"),)


_SCHEME = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*):(?://(?P<authority>[^/]*)/)?(?P<rest>.*)", re.IGNORECASE)


def is_loopback(target: str) -> bool:
    """True when every address ``target`` names is on this machine: ``localhost``, a loopback IP
    (``127.0.0.0/8``, ``::1``) or a Unix socket, with or without gRPC's ``dns:``, ``ipv4:``,
    ``ipv6:`` and ``unix:`` schemes. A DNS name is not resolved: only ``localhost`` counts (and not
    when the target names its own DNS server)."""
    found = _SCHEME.fullmatch(target)
    scheme, rest = (found["scheme"].lower(), found["rest"]) if found else ("", target)
    if scheme in ("unix", "unix-abstract"):
        return True
    if found and scheme not in ("dns", "ipv4", "ipv6"):  # "localhost:50051" parses as scheme "localhost"
        scheme, rest = "", target
    addresses = rest.split(",") if scheme in ("ipv4", "ipv6") else [rest]
    by_name = not (found and found["authority"])  # a DNS server of the target's choosing may say anything
    return all(_is_loopback_host(_host(address), by_name=by_name) for address in addresses)


def _host(address: str) -> str:
    if address.startswith("["):
        return address[1 : address.find("]")] if "]" in address else address
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


def _is_loopback_host(host: str, *, by_name: bool) -> bool:
    if host.lower() == "localhost":
        return by_name
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
