"""``Client`` and ``AsyncClient``: the losses of ``torch.nn.functional``, computed by a remoteloss server.

Both get the 22 loss methods from ``LossMethods``, whose methods hand their arguments to
``_compute``: ``Client._compute`` returns the result, ``AsyncClient._compute`` is a coroutine,
so ``await aclient.mse_loss(x, y)`` works with the same signatures. What a call sends and how
its answer becomes a result is in ``_calls``; this module only moves requests.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import grpc

from remoteloss._calls import plan_loss, plan_value_and_grad, warn
from remoteloss._channel import Pem, api_key_metadata, create_aio_channel, create_channel, tls_credentials
from remoteloss._errors import _error_from_rpc
from remoteloss._losses import LossMethods
from remoteloss._request import Request
from remoteloss._transport import Answer, Stub
from remoteloss.v1 import loss_pb2 as pb

if TYPE_CHECKING:
    from remoteloss._stream import AsyncStream, Stream

__all__ = ["AsyncClient", "Client"]

_C = TypeVar("_C", bound="_ClientBase")


class _Unset(enum.Enum):
    UNSET = enum.auto()


_UNSET = _Unset.UNSET
DEFAULT_STREAM_WINDOW = 64  # requests a stream keeps unanswered before a new one waits


class _Connection:
    """The channels that a client and its ``with_options`` copies share: a blocking one, and for
    ``AsyncClient`` a ``grpc.aio`` one made on first use inside the event loop (the blocking one
    then serves autograd's second calls only, and is made only if one happens)."""

    def __init__(
        self, target: str, credentials: grpc.ChannelCredentials | None, options: Sequence[tuple[str, Any]]
    ) -> None:
        self._target = target
        self._credentials = credentials
        self._options = tuple(options)
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stub: Stub | None = None
        self._aio_channel: grpc.aio.Channel | None = None
        self._aio_stub: Stub | None = None
        self.closed = False

    def stub(self) -> Stub:
        """The ``Stub`` on the blocking channel."""
        with self._lock:
            if self.closed:
                raise RuntimeError("the client is closed")
            if self._stub is None:
                self._channel = create_channel(self._target, credentials=self._credentials, options=self._options)
                self._stub = Stub(self._channel)
            return self._stub

    def aio_stub(self) -> Stub:
        """The ``Stub`` on the ``grpc.aio`` channel; call it from the event loop."""
        if self.closed:
            raise RuntimeError("the client is closed")
        if self._aio_stub is None:
            self._aio_channel = create_aio_channel(self._target, credentials=self._credentials, options=self._options)
            self._aio_stub = Stub(self._aio_channel)
        return self._aio_stub

    def close(self) -> None:
        with self._lock:
            self.closed = True
            channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    async def aclose(self) -> None:
        self.close()
        channel, self._aio_channel = self._aio_channel, None
        if channel is not None:
            await channel.close(None)


class _ClientBase(LossMethods):
    """What ``Client`` and ``AsyncClient`` share: settings, ``with_options``, the blocking path."""

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
        self._timeout = _check_timeout(timeout)
        credentials = tls_credentials(
            tls=tls,
            root_certificates=root_certificates,
            client_cert=client_cert,
            client_key=client_key,
            credentials=credentials,
        )
        # Sent first with every call, also by with_options copies; never shown by repr.
        self._auth_metadata = api_key_metadata(target, api_key, secure=credentials is not None)
        self._metadata: tuple[tuple[str, str | bytes], ...] = (*self._auth_metadata, *metadata)
        self._connection = _Connection(target, credentials, options)
        self._owns_connection = True
        if self._eager_channel:
            self._connection.stub()  # the channel exists from the start, as with grpc's own clients

    @property
    def target(self) -> str:
        return self._target

    @property
    def timeout(self) -> float | None:
        return self._timeout

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
        clone._owns_connection = False
        if timeout is not _UNSET:
            clone._timeout = _check_timeout(timeout)
        if metadata is not _UNSET:
            clone._metadata = (*self._auth_metadata, *metadata)
        return clone

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self._target!r}, timeout={self._timeout!r})"

    def _blocking_unary(self, method: str, request: Any) -> Any:
        if self._connection.closed:
            raise RuntimeError(f"{self!r} is closed")
        try:
            return getattr(self._connection.stub(), method)(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error_from_rpc(exc) from exc


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
        if self._owns_connection:
            self._connection.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def list_losses(self) -> pb.ListLossesResponse:
        """What the server offers: every loss with its arguments, options and dtypes."""
        response: pb.ListLossesResponse = self._blocking_unary("ListLosses", pb.ListLossesRequest())
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
        plan = plan_value_and_grad(self, loss_name, args, kwargs, wrt, grad_output)
        answer = self._compute_rpc(plan.request)
        result: tuple[Any, dict[str, Any]] = plan.finish(answer, self._compute_rpc)
        warn(answer.message.warnings, stacklevel=2)  # value_and_grad's caller
        return result

    def stream(self, *, timeout: float | None = None, window: int = DEFAULT_STREAM_WINDOW) -> Stream:
        """Many calls on one ``ComputeStream``: each loss method of the stream returns a
        ``concurrent.futures.Future`` at once. See ``remoteloss.Stream``."""
        from remoteloss._stream import Stream

        return Stream(self, timeout=_check_timeout(timeout), window=window)

    def _compute(self, loss: str, arguments: dict[str, Any]) -> Any:
        plan = plan_loss(loss, arguments)
        answer = self._compute_rpc(plan.request)
        result = plan.finish(answer, self._compute_rpc)
        warn(answer.message.warnings, stacklevel=3)  # _compute, the loss method, its caller
        return result

    def _compute_rpc(self, request: Request) -> Answer:
        answer: Answer = self._blocking_unary("Compute", request.serialize())
        return answer


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
        if self._owns_connection:
            await self._connection.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def list_losses(self) -> pb.ListLossesResponse:
        """What the server offers: every loss with its arguments, options and dtypes."""
        response: pb.ListLossesResponse = await self._unary("ListLosses", pb.ListLossesRequest())
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
        plan = plan_value_and_grad(self, loss_name, args, kwargs, wrt, grad_output)
        answer = await self._compute_rpc(plan.request)
        result: tuple[Any, dict[str, Any]] = plan.finish(answer, self._backward_rpc)
        warn(answer.message.warnings, stacklevel=2)  # the coroutine awaiting value_and_grad
        return result

    def stream(self, *, timeout: float | None = None, window: int = DEFAULT_STREAM_WINDOW) -> AsyncStream:
        """Many calls on one ``ComputeStream``; see ``remoteloss.AsyncStream``."""
        from remoteloss._stream import AsyncStream

        return AsyncStream(self, timeout=_check_timeout(timeout), window=window)

    async def _compute(self, loss: str, arguments: dict[str, Any]) -> Any:
        plan = plan_loss(loss, arguments)
        answer = await self._compute_rpc(plan.request)
        result = plan.finish(answer, self._backward_rpc)
        warn(answer.message.warnings, stacklevel=2)  # _compute, the coroutine awaiting the loss method
        return result

    async def _compute_rpc(self, request: Request) -> Answer:
        answer: Answer = await self._unary("Compute", request.serialize())  # serialized now, not when sent
        return answer

    def _backward_rpc(self, request: Request) -> Answer:
        answer: Answer = self._blocking_unary("Compute", request.serialize())
        return answer

    async def _unary(self, method: str, request: Any) -> Any:
        if self._connection.closed:
            raise RuntimeError(f"{self!r} is closed")
        try:
            return await getattr(self._connection.aio_stub(), method)(
                request, timeout=self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise _error_from_rpc(exc) from exc


def _check_timeout(timeout: float | None) -> float | None:
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be None or a positive number of seconds, got {timeout!r}")
    return timeout
