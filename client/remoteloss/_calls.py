"""One call, without its transport: arguments -> request (a ``Plan``), response -> result.

``Client``, ``AsyncClient`` and their streams differ only in how a request travels; everything
else (which gradients to ask for, numpy or torch out, the autograd node, the server's warnings)
is here, once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from remoteloss import codec
from remoteloss._errors import InternalServerError, InvalidArgumentError
from remoteloss._losses import LossMethods
from remoteloss._request import LOSS_NAMES, Request, prepare_request, tensor_names
from remoteloss._transport import Answer
from remoteloss.v1 import loss_pb2 as pb

if TYPE_CHECKING:
    import torch

__all__ = ["Backward", "Plan", "plan_loss", "plan_value_and_grad", "warn"]

# A blocking Compute: what autograd's backward uses when it needs a second call.
Backward = Callable[[Request], Answer]


@dataclass(frozen=True)
class Plan:
    """A loss call ready to send: its request, and how its response becomes the caller's result."""

    loss: str
    arguments: dict[str, Any]
    request: Request
    wrt: tuple[str, ...]  # the gradients the request asks for
    autograd: bool  # the result is a torch tensor with a grad_fn over the torch arguments
    value_and_grad: bool  # the result is (loss, {name: gradient})

    def finish(self, answer: Answer, backward: Backward) -> Any:
        """The result of ``answer``; ``backward`` serves autograd's second call, if one is needed.

        The server's warnings are the caller's to re-raise (``warn``), where the user called.
        """
        if self.value_and_grad:
            return results(answer, self.loss, self.arguments, self.wrt)
        if not self.autograd:
            return results(answer, self.loss, self.arguments, ())[0]
        import torch

        from remoteloss import _autograd

        tensors = torch_arguments(self.loss, self.arguments)
        call = _RemoteCall(self, answer, backward, tuple(tensors))
        with torch.enable_grad():  # the request was planned with grad enabled; keep it for the node
            return _autograd.apply(call, list(tensors.values()))


def plan_loss(loss: str, arguments: dict[str, Any]) -> Plan:
    """The plan of a loss method's call; through autograd when grad is enabled and a torch
    tensor argument requires grad (the request then asks for those gradients)."""
    arguments.pop("self", None)
    wrt: tuple[str, ...] = ()
    tensors = torch_arguments(loss, arguments)
    if any(t.requires_grad for t in tensors.values()):
        import torch

        if torch.is_grad_enabled():
            wrt = tuple(name for name, tensor in tensors.items() if tensor.requires_grad)
    request = prepare_request(loss, arguments, wrt=wrt)
    return Plan(loss, arguments, request, wrt, autograd=bool(wrt), value_and_grad=False)


def plan_value_and_grad(
    loss_name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    wrt: str | Sequence[str],
    grad_output: Any,
) -> Plan:
    """The plan of ``value_and_grad(loss_name, *args, wrt=wrt, grad_output=grad_output, **kwargs)``."""
    if loss_name not in LOSS_NAMES:
        raise InvalidArgumentError(f"loss_name must be one of {sorted(LOSS_NAMES)}, got {loss_name!r}")
    arguments = _bind(loss_name, args, kwargs)
    names = (wrt,) if isinstance(wrt, str) else tuple(wrt)
    request = prepare_request(loss_name, arguments, wrt=names, grad_output=grad_output)
    message = getattr(request.message, loss_name)
    for name in names:
        if name not in tensor_names(loss_name) or not message.HasField(name):
            raise InvalidArgumentError(
                f"{loss_name}: wrt names {name!r}, which is not a tensor argument of this call; "
                f"tensor arguments: {list(tensor_names(loss_name))}"
            )
    return Plan(loss_name, arguments, request, names, autograd=False, value_and_grad=True)


class _RemoteCall:
    """The ``RemoteCall`` of ``_autograd``: forward is the answer already received."""

    def __init__(self, plan: Plan, answer: Answer, backward: Backward, names: tuple[str, ...]):
        self.plan = plan
        self.answer = answer
        self.send = backward
        self.names = names

    def forward(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, gradients = results(self.answer, self.plan.loss, self.plan.arguments, self.plan.wrt)
        return loss, gradients

    def backward(
        self, tensors: Sequence[torch.Tensor], grad_output: torch.Tensor, wrt: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        loss = self.plan.loss
        arguments = {**self.plan.arguments, **dict(zip(self.names, tensors, strict=True))}
        answer = self.send(prepare_request(loss, arguments, wrt=wrt, grad_output=grad_output))
        seen = self.answer.message.warnings
        warn((text for text in answer.message.warnings if text not in seen), stacklevel=1)
        gradients: dict[str, torch.Tensor] = results(answer, loss, arguments, wrt)[1]
        return gradients


class _Arguments(LossMethods):
    """Each loss method returns its arguments by name, defaults included: binding by a plain call,
    which raises the TypeError of a wrong call as the method itself would, and costs far less
    than ``inspect.Signature.bind``."""

    def _compute(self, loss: str, arguments: dict[str, Any]) -> dict[str, Any]:
        return arguments


_ARGUMENTS = _Arguments()


def _bind(loss: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of ``loss(*args, **kwargs)`` by name, defaults included."""
    arguments: dict[str, Any] = getattr(_ARGUMENTS, loss)(*args, **kwargs)
    arguments.pop("self", None)
    return arguments


def torch_arguments(loss: str, arguments: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensor arguments that are torch tensors, in torch's order."""
    return {name: arguments[name] for name in tensor_names(loss) if codec.is_torch_tensor(arguments.get(name))}


def results(
    answer: Answer, loss: str, arguments: dict[str, Any], wrt: Iterable[str]
) -> tuple[Any, dict[str, Any]]:
    """The loss and the gradients for ``wrt``: numpy arrays, or torch tensors when any tensor
    argument is one (the loss on the first one's device, each gradient on its argument's). Each
    owns its memory (one copy of the answer's bytes) and is writable."""
    response = answer.message
    tensors = torch_arguments(loss, arguments)
    gradients = {name: response.gradients[name] for name in wrt if name in response.gradients}
    missing = [name for name in wrt if name not in gradients]
    if missing:
        raise InternalServerError(f"{loss}: the server's answer lacks the gradients of {missing}")
    if not tensors:
        return _numpy(answer, response.loss, loss, "loss"), {
            n: _numpy(answer, g, loss, n) for n, g in gradients.items()
        }
    first = next(iter(tensors.values()))
    return _torch(answer, response.loss, loss, "loss", first.device), {
        n: _torch(answer, g, loss, n, *_placement(tensors.get(n), first)) for n, g in gradients.items()
    }


def _placement(tensor: torch.Tensor | None, first: torch.Tensor) -> tuple[torch.device, torch.dtype | None]:
    """Where a gradient goes: its argument's device and dtype (the first tensor's device, any dtype)."""
    return (first.device, None) if tensor is None else (tensor.device, tensor.dtype)


def _numpy(answer: Answer, message: pb.Tensor, loss: str, name: str) -> np.ndarray[Any, Any]:
    try:
        return codec.decode_numpy(message, name, data=answer.data(message)).copy()  # writable, like torch's results
    except ValueError as exc:
        raise InternalServerError(f"{loss}: the server's answer is malformed: {exc}") from exc


def _torch(
    answer: Answer, message: pb.Tensor, loss: str, name: str, device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    try:
        view = answer.data(message)
        # A view of the received bytes becomes memory of the tensor's own: writable, one copy, made
        # by numpy, which asks for huge pages for a large block (fewer page faults than a bytearray's).
        tensor = codec.decode_torch(message, name, data=None if view is None else _owned(view))
    except ValueError as exc:
        raise InternalServerError(f"{loss}: the server's answer is malformed: {exc}") from exc
    if device.type == "cpu" and (dtype is None or dtype == tensor.dtype):
        return tensor  # where torch would put it already: no call to .to()
    return tensor.to(device=device, dtype=dtype)


def _owned(view: memoryview) -> memoryview:
    """A writable copy of ``view``'s bytes."""
    return np.frombuffer(view, dtype=np.uint8).copy().data


def warn(texts: Iterable[str], *, stacklevel: int) -> None:
    """Re-raise the server's torch warnings, attributed ``stacklevel`` frames up (1: ``warn``'s caller)."""
    for text in texts:
        warnings.warn(text, UserWarning, stacklevel=stacklevel + 1)
