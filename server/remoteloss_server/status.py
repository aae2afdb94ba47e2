"""gRPC statuses from the domain errors of ``errors``, and the call metadata every protocol's
servicer reads and writes: the only place a ``ServiceError`` becomes a status.

``status_of(exc, where)`` gives a ``ServiceError`` its own code and message (cut to
``MAX_DETAILS``) and turns anything else into an opaque INTERNAL, logged with its traceback;
``translate_errors`` wraps a unary handler with it, so no exception ever escapes a handler.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from remoteloss_server.errors import ServiceError
from remoteloss_server.intake import UndecodableRequest
from remoteloss_server.telemetry import REQUEST_ID_KEY, request_id

__all__ = ["MAX_DETAILS", "add_trailing_metadata", "caller_request_id", "status_of", "translate_errors"]

logger = logging.getLogger(__name__)

# A status message's characters at most: gRPC refuses a status past 16 KiB of metadata (the
# caller then sees RESOURCE_EXHAUSTED "Stream removed"), and the message is logged too.
MAX_DETAILS = 2048

_S = TypeVar("_S")
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_Handler = Callable[[_S, _Req, grpc.aio.ServicerContext[_Req, _Resp]], Awaitable[_Resp]]


def status_of(exc: Exception, where: str) -> tuple[grpc.StatusCode, str]:
    """The status for an exception: a ``ServiceError``'s own code and message; anything else is
    logged with its traceback and becomes an opaque INTERNAL."""
    if isinstance(exc, ServiceError):
        message = str(exc)  # torch's text may quote a request's string option, of any length
        if len(message) > MAX_DETAILS:
            message = f"{message[:MAX_DETAILS]}... ({len(message) - MAX_DETAILS} more characters)"
        return grpc.StatusCode[exc.code], message
    logger.error("%s failed", where, exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error"


def translate_errors(handler: _Handler[_S, _Req, _Resp]) -> _Handler[_S, _Req, _Resp]:
    """Abort with the status of a ``ServiceError`` (an ``UndecodableRequest`` included); log
    anything else and abort with INTERNAL."""

    @functools.wraps(handler)
    async def wrapper(self: _S, request: _Req, context: grpc.aio.ServicerContext[_Req, _Resp]) -> _Resp:
        try:
            if isinstance(request, UndecodableRequest):
                raise request.error()
            return await handler(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await context.abort(*status_of(exc, handler.__name__))
        raise AssertionError("context.abort returned")  # pragma: no cover

    return wrapper


def caller_request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's ``x-request-id`` when well formed, else a new one."""
    sent = next((v for k, v in context.invocation_metadata() or () if k == REQUEST_ID_KEY), None)
    return request_id(sent if isinstance(sent, str) else None)


def add_trailing_metadata(context: grpc.aio.ServicerContext[Any, Any], pairs: tuple[tuple[str, str], ...]) -> None:
    """Add ``pairs`` to the trailing metadata set so far (``set_trailing_metadata`` replaces it)."""
    if pairs:
        context.set_trailing_metadata((*(context.trailing_metadata() or ()), *pairs))
