"""The client's gRPC channel: TLS, message-size limits, load balancing and retries."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import grpc

from remoteloss.v1 import loss_pb2 as pb

__all__ = ["MAX_MESSAGE_BYTES", "SERVICE_CONFIG", "create_aio_channel", "create_channel"]

MAX_MESSAGE_BYTES = 512 * 1024 * 1024

_SERVICE = pb.DESCRIPTOR.services_by_name["LossService"].full_name

# round_robin spreads calls over every address a target resolves to. Compute is a pure
# function, so gRPC may retry it; UNAVAILABLE covers a restarting or draining server.
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
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
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
