"""``Client``: the losses of ``torch.nn.functional``, computed by a remoteloss server."""

from __future__ import annotations

import enum
import functools
import inspect
import warnings
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import grpc
import numpy as np

from remoteloss import codec
from remoteloss._channel import create_channel
from remoteloss._errors import InternalServerError, InvalidArgumentError, _error_from_rpc
from remoteloss._losses import LossMethods
from remoteloss._request import LOSS_NAMES, build_request, tensor_names
from remoteloss.v1 import loss_pb2 as pb
from remoteloss.v1 import loss_pb2_grpc

if TYPE_CHECKING:
    import torch

__all__ = ["Client"]


class _Unset(enum.Enum):
    UNSET = enum.auto()


_UNSET = _Unset.UNSET


class _Connection:
    """The channel that a client and its ``with_options`` copies share."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.stub = loss_pb2_grpc.LossServiceStub(channel)  # type: ignore[no-untyped-call]
        self.closed = False


class Client(LossMethods):
    """A client of a remoteloss server; one method per ``torch.nn.functional`` loss.

    Each loss method has torch's exact signature. numpy arrays or Python numbers in give
    numpy arrays out; any torch tensor in gives a torch tensor out, on the first tensor's
    device, with a ``grad_fn`` when an input requires grad. Every call has a deadline of
    ``timeout`` seconds (None: none); ``with_options`` makes a copy with another.
    ``credentials`` (``grpc.ChannelCredentials``) select TLS; ``options`` are extra gRPC
    channel arguments; ``metadata`` is sent with every call. Thread-safe.
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float | None = 30.0,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        metadata: Sequence[tuple[str, str | bytes]] = (),
    ) -> None:
        self._target = target
        self._timeout = _check_timeout(timeout)
        self._metadata = tuple(metadata)
        self._connection = _Connection(create_channel(target, credentials=credentials, options=options))
        self._owns_connection = True

    @property
    def target(self) -> str:
        return self._target

    @property
    def timeout(self) -> float | None:
        return self._timeout

    def with_options(
        self,
        *,
        timeout: float | None | Literal[_Unset.UNSET] = _UNSET,
        metadata: Sequence[tuple[str, str | bytes]] | Literal[_Unset.UNSET] = _UNSET,
    ) -> Client:
        """A copy with another deadline or metadata, sharing this client's channel.

        Closing the copy does nothing; closing this client closes the channel for both.
        """
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone._owns_connection = False
        if timeout is not _UNSET:
            clone._timeout = _check_timeout(timeout)
        if metadata is not _UNSET:
            clone._metadata = tuple(metadata)
        return clone

    def close(self) -> None:
        """Close the channel (a ``with_options`` copy leaves it open). Idempotent."""
        if self._owns_connection and not self._connection.closed:
            self._connection.closed = True
            self._connection.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self._target!r}, timeout={self._timeout!r})"

    def list_losses(self) -> pb.ListLossesResponse:
        """What the server offers: every loss with its arguments, options and dtypes."""
        response: pb.ListLossesResponse = self._unary("ListLosses", pb.ListLossesRequest())
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
        if loss_name not in LOSS_NAMES:
            raise InvalidArgumentError(f"loss_name must be one of {sorted(LOSS_NAMES)}, got {loss_name!r}")
        bound = _signature(loss_name).bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = {name: value for name, value in bound.arguments.items() if name != "self"}
        names = (wrt,) if isinstance(wrt, str) else tuple(wrt)
        request = build_request(loss_name, arguments, wrt=names, grad_output=grad_output)
        message = getattr(request, loss_name)
        for name in names:
            if name not in tensor_names(loss_name) or not message.HasField(name):
                raise InvalidArgumentError(
                    f"{loss_name}: wrt names {name!r}, which is not a tensor argument of this call; "
                    f"tensor arguments: {list(tensor_names(loss_name))}"
                )
        response = self._compute_rpc(request)
        results = _results(response, loss_name, arguments, names)
        _warn(response.warnings, stacklevel=3)  # _warn, value_and_grad, its caller
        return results

    def _compute(self, loss: str, arguments: dict[str, Any]) -> Any:
        arguments.pop("self", None)
        result, texts = self._run(loss, arguments)
        _warn(texts, stacklevel=4)  # _warn, _compute, the loss method, its caller
        return result

    def _run(self, loss: str, arguments: dict[str, Any]) -> tuple[Any, Sequence[str]]:
        """The loss and the server's warnings; through autograd when a torch input requires grad."""
        tensors = _torch_arguments(loss, arguments)
        if tensors and any(t.requires_grad for t in tensors.values()):
            import torch

            if torch.is_grad_enabled():
                from remoteloss import _autograd

                call = _Call(self, loss, arguments, tensors)
                return _autograd.apply(call, list(tensors.values())), call.warnings
        response = self._compute_rpc(build_request(loss, arguments))
        return _results(response, loss, arguments, ())[0], response.warnings

    def _compute_rpc(self, request: pb.ComputeRequest) -> pb.ComputeResponse:
        response: pb.ComputeResponse = self._unary("Compute", request)
        return response

    def _unary(self, method: str, request: Any) -> Any:
        if self._connection.closed:
            raise RuntimeError(f"{self!r} is closed")
        try:
            return getattr(self._connection.stub, method)(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error_from_rpc(exc) from exc


class _Call:
    """One loss call on torch tensors that require grad: the ``RemoteCall`` of ``_autograd``."""

    def __init__(self, client: Client, loss: str, arguments: dict[str, Any], tensors: dict[str, torch.Tensor]):
        self.client = client
        self.loss = loss
        self.arguments = arguments
        self.names = tuple(tensors)
        self.wrt = tuple(name for name, tensor in tensors.items() if tensor.requires_grad)
        self.warnings: list[str] = []

    def forward(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        response = self.client._compute_rpc(build_request(self.loss, self.arguments, wrt=self.wrt))
        self.warnings = list(response.warnings)
        return _results(response, self.loss, self.arguments, self.wrt)

    def backward(
        self, tensors: Sequence[torch.Tensor], grad_output: torch.Tensor, wrt: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        arguments = {**self.arguments, **dict(zip(self.names, tensors, strict=True))}
        request = build_request(self.loss, arguments, wrt=wrt, grad_output=grad_output)
        response = self.client._compute_rpc(request)
        _warn((text for text in response.warnings if text not in self.warnings), stacklevel=2)
        return _results(response, self.loss, arguments, wrt)[1]


@functools.cache
def _signature(loss: str) -> inspect.Signature:
    return inspect.signature(getattr(LossMethods, loss))


def _check_timeout(timeout: float | None) -> float | None:
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be None or a positive number of seconds, got {timeout!r}")
    return timeout


def _torch_arguments(loss: str, arguments: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensor arguments that are torch tensors, in torch's order."""
    return {name: arguments[name] for name in tensor_names(loss) if codec.is_torch_tensor(arguments.get(name))}


def _results(
    response: pb.ComputeResponse, loss: str, arguments: dict[str, Any], wrt: Iterable[str]
) -> tuple[Any, dict[str, Any]]:
    """The loss and the gradients for ``wrt``: numpy arrays, or torch tensors when any tensor
    argument is one (the loss on the first one's device, each gradient on its argument's)."""
    tensors = _torch_arguments(loss, arguments)
    gradients = {name: response.gradients[name] for name in wrt if name in response.gradients}
    missing = [name for name in wrt if name not in gradients]
    if missing:
        raise InternalServerError(f"{loss}: the server's answer lacks the gradients of {missing}")
    if not tensors:
        return _numpy(response.loss, loss, "loss"), {n: _numpy(g, loss, n) for n, g in gradients.items()}
    first = next(iter(tensors.values()))
    placements = {n: (t.device, t.dtype) for n, t in tensors.items()}
    return _torch(response.loss, loss, "loss", first.device), {
        n: _torch(g, loss, n, *placements.get(n, (first.device, None))) for n, g in gradients.items()
    }


def _numpy(message: pb.Tensor, loss: str, name: str) -> np.ndarray[Any, Any]:
    try:
        return codec.decode_numpy(message, name).copy()  # writable, like torch's results
    except ValueError as exc:
        raise InternalServerError(f"{loss}: the server's answer is malformed: {exc}") from exc


def _torch(
    message: pb.Tensor, loss: str, name: str, device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    try:
        tensor = codec.decode_torch(message, name)
    except ValueError as exc:
        raise InternalServerError(f"{loss}: the server's answer is malformed: {exc}") from exc
    return tensor.to(device=device, dtype=dtype)


def _warn(texts: Iterable[str], *, stacklevel: int) -> None:
    """Re-raise the server's torch warnings, attributed ``stacklevel`` frames up."""
    for text in texts:
        warnings.warn(text, UserWarning, stacklevel=stacklevel)
