"""Exceptions of the client: one class per gRPC status code, found through one table."""

from __future__ import annotations

from typing import ClassVar

import grpc

__all__ = [
    "LOST_STATUS",
    "RESET_STATUS",
    "CancelledError",
    "DeadlineExceededError",
    "InternalServerError",
    "InvalidArgumentError",
    "LossServiceError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "ServiceUnavailableError",
    "UnauthenticatedError",
    "UnimplementedError",
]


class LossServiceError(Exception):
    """A call to the loss service failed.

    ``code`` is the gRPC status code and ``details`` the server's message, which is
    also the exception's message.
    """

    default_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        self.code = type(self).default_code if code is None else code

    def __reduce__(self) -> tuple[type[LossServiceError], tuple[str, grpc.StatusCode]]:
        return type(self), (self.details, self.code)


class InvalidArgumentError(LossServiceError, ValueError):
    """The request was rejected: a bad argument, dtype or shape (INVALID_ARGUMENT)."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(LossServiceError, TimeoutError):
    """The call's deadline passed before the answer came (DEADLINE_EXCEEDED)."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnimplementedError(LossServiceError):
    """The server does not offer this loss or RPC (UNIMPLEMENTED)."""

    default_code = grpc.StatusCode.UNIMPLEMENTED


class ResourceExhaustedError(LossServiceError):
    """The server's queue is full, or a message exceeds a size limit (RESOURCE_EXHAUSTED)."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ServiceUnavailableError(LossServiceError):
    """No server could take the call, even after gRPC's retries (UNAVAILABLE)."""

    default_code = grpc.StatusCode.UNAVAILABLE


class InternalServerError(LossServiceError):
    """The server failed, or sent an answer the client cannot read (INTERNAL)."""

    default_code = grpc.StatusCode.INTERNAL


class UnauthenticatedError(LossServiceError):
    """The call carried no valid credentials (UNAUTHENTICATED)."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(LossServiceError):
    """The credentials do not allow this call (PERMISSION_DENIED)."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class CancelledError(LossServiceError):
    """The call was cancelled (CANCELLED)."""

    default_code = grpc.StatusCode.CANCELLED


_ERRORS: dict[grpc.StatusCode, type[LossServiceError]] = {
    cls.default_code: cls
    for cls in (
        InvalidArgumentError,
        DeadlineExceededError,
        UnimplementedError,
        ResourceExhaustedError,
        ServiceUnavailableError,
        InternalServerError,
        UnauthenticatedError,
        PermissionDeniedError,
        CancelledError,
    )
}


# What grpc.aio reports, as INTERNAL, when a write fails because the server has just ended the call
# (a drain ends streams while their clients still write): the call's own status is then lost.
# No server sends it (ours says "internal error"), so it is taken as the end of a connection.
LOST_STATUS = "Internal error from Core"
# What gRPC reports, as INTERNAL, for a call its peer reset (HTTP/2 RST_STREAM). No server of
# ours resets a call; a proxy does: nginx, when the replica behind it dies mid-answer.
RESET_STATUS = "Received RST_STREAM"


def _connection_lost(code: grpc.StatusCode, details: str) -> bool:
    """Whether a call that ended with this status lost its connection (or a proxy lost its own
    to the server), maybe while its answer was on the way: UNAVAILABLE, or gRPC's INTERNAL for a
    write to a call that has ended or for a reset."""
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    return code == grpc.StatusCode.INTERNAL and (details == LOST_STATUS or RESET_STATUS in details)


def _error_from_code(code: grpc.StatusCode, details: str) -> LossServiceError:
    """The exception for a status code; codes outside the table give the base class. gRPC's
    INTERNAL for a lost connection (``_connection_lost``) is what it stands for: UNAVAILABLE,
    which a caller may try again, as for any other lost connection; its words are kept."""
    if code == grpc.StatusCode.INTERNAL and _connection_lost(code, details):
        return ServiceUnavailableError(f"the connection to the server was lost (gRPC: INTERNAL {details!r})")
    return _ERRORS.get(code, LossServiceError)(details or code.name, code)


def _error_from_rpc(exc: grpc.RpcError) -> LossServiceError:
    """The exception for a failed call: ``raise _error_from_rpc(exc) from exc``."""
    code, details = getattr(exc, "code", None), getattr(exc, "details", None)
    if callable(code) and callable(details):  # a failed call's error (sync or grpc.aio)
        return _error_from_code(code(), details() or "")
    return _error_from_code(grpc.StatusCode.UNKNOWN, str(exc))
