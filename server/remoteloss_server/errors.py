"""Domain errors. Each carries the *name* of its gRPC status code, so that the code below the
servicer never imports grpc; ``servicer.translate_errors`` turns them into statuses.
"""

from __future__ import annotations

__all__ = [
    "DeadlineExceededError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "ResourceExhaustedError",
    "ServiceError",
    "UnavailableError",
    "UnimplementedError",
]


class ServiceError(Exception):
    """Base class: a request failed, and the client gets ``code`` with ``str(self)`` as details."""

    code: str = "UNKNOWN"


class InvalidArgumentError(ServiceError):
    """The request is malformed or torch rejects its arguments."""

    code = "INVALID_ARGUMENT"


class NotFoundError(ServiceError):
    """What the request names does not exist (the Open Inference Protocol's model, or its version)."""

    code = "NOT_FOUND"


class UnimplementedError(ServiceError):
    """The request uses something this server does not know (e.g. a newer client's field)."""

    code = "UNIMPLEMENTED"


class ResourceExhaustedError(ServiceError):
    """The device ran out of memory, or a queue is full."""

    code = "RESOURCE_EXHAUSTED"


class DeadlineExceededError(ServiceError):
    """The deadline passed while the request waited for a batch; it was not computed."""

    code = "DEADLINE_EXCEEDED"


class UnavailableError(ServiceError):
    """The server is draining or shutting down."""

    code = "UNAVAILABLE"


class InternalError(ServiceError):
    """A failure of the server itself; the details are deliberately short."""

    code = "INTERNAL"
