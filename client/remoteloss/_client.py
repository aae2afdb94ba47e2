"""``Client`` and ``AsyncClient``: the losses of ``torch.nn.functional``, computed by a remoteloss server.

Both get the 22 loss methods from ``LossMethods``, whose methods hand their arguments to
``_compute``: ``Client._compute`` returns the result, ``AsyncClient._compute`` is a coroutine,
so ``await aclient.mse_loss(x, y)`` works with the same signatures. What a call sends and how
its answer becomes a result is in ``_calls``; this module only moves requests.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Literal, TypeVar

import grpc

from remoteloss._calls import plan_loss, plan_value_and_grad, warn
from remoteloss._channel import Pem, api_key_metadata, tls_credentials
from remoteloss._losses import LossMethods
from remoteloss._stream import AsyncStream, Stream
from remoteloss._transport import Channels, Transport
from remoteloss.v1 import loss_pb2 as pb

__all__ = ["AsyncClient", "Client"]

_C = TypeVar("_C", bound="_ClientBase")


class _Unset(enum.Enum):
    UNSET = enum.auto()


_UNSET = _Unset.UNSET
DEFAULT_STREAM_WINDOW = 64  # requests a stream keeps unanswered before a new one waits


class _ClientBase(LossMethods):
    """What ``Client`` and ``AsyncClient`` share: settings, the ``Transport``, ``with_options``."""

    _eager_channel = False  # open the blocking channel at construction

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float | None = 30.0,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        metadata: Sequence[tuple[str, str | bytes]] = (),
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: Pem | None = None,
        client_cert: Pem | None = None,
        client_key: Pem | None = None,
    ) -> None:
        self._target = target
        credentials = tls_credentials(
            tls=tls,
            root_certificates=root_certificates,
            client_cert=client_cert,
            client_key=client_key,
            credentials=credentials,
        )
        # Sent first with every call, also by with_options copies; never shown by repr.
        self._auth_metadata = api_key_metadata(target, api_key, secure=credentials is not None)
        timeout = _check_timeout(timeout)
        self._transport = Transport(
            Channels(target, credentials, options),
            timeout,
            (*self._auth_metadata, *metadata),
            name=_describe(type(self), target, timeout),
        )
        self._owns_channels = True
        if self._eager_channel:
            self._transport.channels.stub()  # the channel exists from the start, as with grpc's own clients

    @property
    def target(self) -> str:
        return self._target

    @property
    def timeout(self) -> float | None:
        return self._transport.timeout

    def with_options(
        self: _C,
        *,
        timeout: float | None | Literal[_Unset.UNSET] = _UNSET,
        metadata: Sequence[tuple[str, str | bytes]] | Literal[_Unset.UNSET] = _UNSET,
    ) -> _C:
        """A copy with another deadline or metadata, sharing this client's channel.

        Closing the copy does nothing; closing this client closes the channel for both.
        """
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone._owns_channels = False
        transport = self._transport
        if timeout is not _UNSET:
            transport = dataclasses.replace(transport, timeout=_check_timeout(timeout))
        if metadata is not _UNSET:
            transport = dataclasses.replace(transport, metadata=(*self._auth_metadata, *metadata))
        clone._transport = dataclasses.replace(transport, name=_describe(type(self), self._target, transport.timeout))
        return clone

    def __repr__(self) -> str:
        return _describe(type(self), self._target, self._transport.timeout)


class Client(_ClientBase):
    """A client of a remoteloss server; one method per ``torch.nn.functional`` loss.

    Each loss method has torch's exact signature. numpy arrays or Python numbers in give
    numpy arrays out; any torch tensor in gives a torch tensor out, on the first tensor's
    device, with a ``grad_fn`` when an input requires grad. Every call has a deadline of
    ``timeout`` seconds (None: none); ``with_options`` makes a copy with another.
    TLS: ``tls=True`` (the system's root certificates), or ``root_certificates`` (a CA bundle),
    plus ``client_cert`` and ``client_key`` for mutual TLS, each PEM bytes or a file's path; or
    ready-made ``credentials`` (``grpc.ChannelCredentials``). ``api_key`` (default:
    ``$REMOTELOSS_API_KEY``) is sent as ``authorization: Bearer <key>`` with every call; without
    TLS only to a loopback target (ValueError otherwise). ``options`` are extra gRPC channel
    arguments; ``metadata`` is sent with every call. Thread-safe. ``stream()`` sends many calls
    at once on one ``ComputeStream``.
    """

    _eager_channel = True

    def close(self) -> None:
        """Close the channel (a ``with_options`` copy leaves it open). Idempotent."""
        if self._owns_channels:
            self._transport.channels.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def list_losses(self) -> pb.ListLossesResponse:
        """What the server offers: every loss with its arguments, options and dtypes."""
        response: pb.ListLossesResponse = self._transport.unary("ListLosses", pb.ListLossesRequest())
        return response

    def value_and_grad(
        self,
        loss_name: str,
        /,
        *args: Any,
        wrt: str | Sequence[str] = ("input",),
        grad_output: Any = None,
        **kwargs: Any,
    ) -> tuple[Any, dict[str, Any]]:
        """The loss and its gradients with respect to the arguments named in ``wrt``, in one call.

        Arguments are those of the loss method ``loss_name``. The gradients are of
        ``sum(loss * grad_output)``; ``grad_output`` None means ones. Results are numpy
        arrays, or torch tensors (without ``grad_fn``) when any tensor argument is one.
        """
        plan = plan_value_and_grad(loss_name, args, kwargs, wrt, grad_output)
        answer = self._transport.compute(plan.request)
        result: tuple[Any, dict[str, Any]] = plan.finish(answer, self._transport.compute)
        warn(answer.message.warnings, stacklevel=2)  # value_and_grad's caller
        return result

    def stream(self, *, timeout: float | None = None, window: int = DEFAULT_STREAM_WINDOW) -> Stream:
        """Many calls on one ``ComputeStream``: each loss method of the stream returns a
        ``concurrent.futures.Future`` at once. See ``remoteloss.Stream``."""
        return Stream(self._transport, timeout=_check_timeout(timeout), window=window)

    def _compute(self, loss: str, arguments: dict[str, Any]) -> Any:
        plan = plan_loss(loss, arguments)
        answer = self._transport.compute(plan.request)
        result = plan.finish(answer, self._transport.compute)
        warn(answer.message.warnings, stacklevel=3)  # _compute, the loss method, its caller
        return result


class AsyncClient(_ClientBase):
    """The ``grpc.aio`` twin of ``Client``: the same methods and arguments, each a coroutine.

    >>> async with remoteloss.AsyncClient("localhost:50051") as client:  # doctest: +SKIP
    ...     loss = await client.mse_loss(x, y)

    Use it from one event loop (its channel is made there on the first call); it is not
    thread-safe. Autograd works as with ``Client``: the forward call awaits the loss and the
    gradients of ``sum(loss)``, and ``backward`` needs no call for a uniform ``grad_output``.
    Any other ``grad_output`` needs a second call, which ``backward`` (synchronous in torch)
    makes on a blocking channel to the same target, made when first needed; called from a
    coroutine, that call blocks the event loop while it runs.
    """

    async def aclose(self) -> None:
        """Close the channels (a ``with_options`` copy leaves them open). Idempotent."""
        if self._owns_channels:
            await self._transport.channels.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def list_losses(self) -> pb.ListLossesResponse:
        """What the server offers: every loss with its arguments, options and dtypes."""
        response: pb.ListLossesResponse = await self._transport.aunary("ListLosses", pb.ListLossesRequest())
        return response

    async def value_and_grad(
        self,
        loss_name: str,
        /,
        *args: Any,
        wrt: str | Sequence[str] = ("input",),
        grad_output: Any = None,
        **kwargs: Any,
    ) -> tuple[Any, dict[str, Any]]:
        """The loss and its gradients with respect to ``wrt``, in one call; see ``Client.value_and_grad``."""
        plan = plan_value_and_grad(loss_name, args, kwargs, wrt, grad_output)
        answer = await self._transport.acompute(plan.request)
        result: tuple[Any, dict[str, Any]] = plan.finish(answer, self._transport.compute)
        warn(answer.message.warnings, stacklevel=2)  # the coroutine awaiting value_and_grad
        return result

    def stream(self, *, timeout: float | None = None, window: int = DEFAULT_STREAM_WINDOW) -> AsyncStream:
        """Many calls on one ``ComputeStream``; see ``remoteloss.AsyncStream``."""
        return AsyncStream(self._transport, timeout=_check_timeout(timeout), window=window)

    async def _compute(self, loss: str, arguments: dict[str, Any]) -> Any:
        plan = plan_loss(loss, arguments)
        answer = await self._transport.acompute(plan.request)
        result = plan.finish(answer, self._transport.compute)  # backward's second call, if any, blocks
        warn(answer.message.warnings, stacklevel=2)  # _compute, the coroutine awaiting the loss method
        return result


def _describe(cls: type, target: str, timeout: float | None) -> str:
    return f"{cls.__name__}(target={target!r}, timeout={timeout!r})"


def _check_timeout(timeout: float | None) -> float | None:
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be None or a positive number of seconds, got {timeout!r}")
    return timeout
