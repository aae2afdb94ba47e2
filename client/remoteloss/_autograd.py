"""The autograd node of a remote loss. Imported only once a torch input requires grad.

The forward call asks the server for the loss and the gradients of ``sum(loss)``. The
gradient is linear in ``grad_output``, so when ``grad_output`` holds one value ``c`` (always
for a scalar loss; also after ``loss.sum()`` or ``loss.mean()``) backward returns those
gradients times ``c``, exactly them when ``c == 1``. Any other ``grad_output`` costs a
second call that carries it.

The first backward with ``c == 1`` hands the received gradients over and keeps no reference to
them, so that torch stores them as the inputs' ``.grad`` without a copy, as it does its own
losses' gradients. A later backward of the same graph (``retain_graph=True``) then asks the
server again, as for any other ``grad_output``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch.autograd.function import once_differentiable

__all__ = ["RemoteCall", "apply"]


class RemoteCall(Protocol):
    """One loss call: its tensor arguments' names, and how to run it remotely."""

    @property
    def names(self) -> Sequence[str]:
        """The argument name of each tensor handed to ``apply``, in order."""
        ...

    def forward(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss and the gradients of sum(loss), on the devices and dtypes torch would use."""
        ...

    def backward(
        self, tensors: Sequence[torch.Tensor], grad_output: torch.Tensor, wrt: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """The gradients of sum(loss * grad_output) for ``wrt``, ``tensors`` taking the arguments' place."""
        ...


def apply(call: RemoteCall, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The loss, with a ``grad_fn`` reaching every tensor in ``tensors``."""
    result: torch.Tensor = _RemoteLoss.apply(call, *tensors)  # type: ignore[no-untyped-call]
    return result


class _RemoteLoss(torch.autograd.Function):
    # ctx is typed Any: the attributes set on it are this class's own.
    @staticmethod
    def forward(ctx: Any, call: RemoteCall, *tensors: torch.Tensor) -> torch.Tensor:
        loss, gradients = call.forward()
        ctx.call = call
        ctx.gradients = gradients  # None once handed over
        ctx.save_for_backward(*tensors)  # for a second call; also catches in-place edits
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: a second derivative fails, as once_differentiable says
            return _checked_backward(ctx, grad_output)
        return _backward(ctx, grad_output)


def _backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    call: RemoteCall = ctx.call
    needed = ctx.needs_input_grad[1:]
    gradients: dict[str, torch.Tensor] | None = ctx.gradients
    scale = None if gradients is None else _single_value(grad_output)
    if scale is None:
        wrt = [name for name, need in zip(call.names, needed, strict=True) if need]
        gradients = call.backward(ctx.saved_tensors, grad_output, wrt)
    elif scale == 1.0:
        ctx.gradients = None  # handed over: torch may keep them as .grad, without a copy
    else:
        gradients = {name: grad * scale for name, grad in gradients.items()}  # type: ignore[union-attr]
    pairs = zip(call.names, needed, strict=True)
    return (None, *(gradients.get(name) if need else None for name, need in pairs))  # type: ignore[union-attr]


_checked_backward = once_differentiable(_backward)


def _single_value(grad_output: torch.Tensor) -> float | None:
    """The value every element of ``grad_output`` holds (1.0 when it is empty), else None."""
    numel = grad_output.numel()
    if numel == 1:
        return float(grad_output.item())
    if numel == 0:
        return 1.0  # the gradients of an empty sum are zeros either way
    first = grad_output.reshape(-1)[0]
    if not bool(torch.all(grad_output == first)):
        return None
    return float(first)
