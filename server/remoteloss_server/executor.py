"""Runs one prepared ``Call`` on the device: the forward pass and, when asked, the backward pass.

``Executor.run`` blocks; the servicer calls it on a compute thread, never on the event loop.
This is the only module that picks a device or calls CUDA APIs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from remoteloss_server.errors import InvalidArgumentError, ResourceExhaustedError
from remoteloss_server.losses import Call

__all__ = ["Executor", "Result", "resolve_device"]

logger = logging.getLogger(__name__)

# Raised by torch for arguments it rejects, in the loss function or in its backward.
_TORCH_REJECTIONS = (RuntimeError, ValueError, IndexError, TypeError)
_MAX_MESSAGE_CHARS = 1000


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> ``cuda:0`` when CUDA is available, else ``cpu``; ValueError for an unusable one."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name}: CUDA is not available")
        device = torch.device("cuda", device.index or 0)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise ValueError(f"device {name}: only cpu and cuda are supported")
    return device


@dataclass(frozen=True)
class Result:
    """A computed loss, on the host: the value, gradients by argument name, torch's warnings."""

    loss: torch.Tensor
    gradients: dict[str, torch.Tensor]
    warnings: list[str]


class Executor:
    """Computes prepared calls on one device."""

    def __init__(self, device: str, torch_threads: int) -> None:
        self.device = resolve_device(device)
        torch.set_num_threads(torch_threads)
        if self.device.type == "cuda":
            torch.empty(0, device=self.device)  # create the CUDA context now, not on the first request

    def run(self, call: Call, grad_output: torch.Tensor | None = None) -> Result:
        """Compute ``call`` (once: its tensors become autograd leaves) and, for the tensors it
        names in ``requires_grad``, d(sum(loss * grad_output))/d(tensor); grad_output defaults
        to ones, and a 0-d one weighs every element of the loss alike.

        Raises InvalidArgumentError for what torch rejects and ResourceExhaustedError when the
        device runs out of memory; anything else is a bug and propagates.
        """
        with _recorder.record() as texts:
            try:
                if call.requires_grad:
                    loss, gradients = self._differentiate(call, grad_output)
                else:
                    with torch.inference_mode():
                        loss, gradients = call(), {}
                loss, gradients = loss.detach().cpu(), {name: g.cpu() for name, g in gradients.items()}
            except _TORCH_REJECTIONS as exc:
                if _is_out_of_memory(exc):
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    raise ResourceExhaustedError(f"{call.loss}: out of memory on {self.device}") from None
                if _is_device_failure(exc):
                    raise
                raise InvalidArgumentError(f"{call.loss}: {_message(exc, call)}") from exc
        return Result(loss, gradients, list(dict.fromkeys(texts)))

    def _differentiate(
        self, call: Call, grad_output: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        leaves = [call.tensors[name].requires_grad_(True) for name in call.requires_grad]
        with torch.enable_grad():
            loss = call()
            if not loss.requires_grad:  # no gradient flows to any leaf (e.g. only a target asked)
                return loss, {name: torch.zeros_like(t) for name, t in zip(call.requires_grad, leaves, strict=True)}
            seed = self._grad_output(call, grad_output, loss)
            grads = torch.autograd.grad(loss, leaves, grad_outputs=seed, allow_unused=True)
        return loss, {
            name: torch.zeros_like(leaf) if grad is None else grad
            for name, leaf, grad in zip(call.requires_grad, leaves, grads, strict=True)
        }

    def _grad_output(self, call: Call, grad_output: torch.Tensor | None, loss: torch.Tensor) -> torch.Tensor:
        if grad_output is None:
            return torch.ones_like(loss)
        if not grad_output.is_floating_point():
            raise InvalidArgumentError(
                f"{call.loss}: grad_output must be floating, got {str(grad_output.dtype).removeprefix('torch.')}"
            )
        if grad_output.dim() == 0:  # a scalar weighs every element of the loss alike
            return grad_output.to(self.device, loss.dtype).expand(loss.shape)
        if grad_output.shape != loss.shape:
            raise InvalidArgumentError(
                f"{call.loss}: grad_output has shape {list(grad_output.shape)}, but the loss has "
                f"shape {list(loss.shape)}"
            )
        return grad_output.to(self.device, loss.dtype)


def _message(exc: BaseException, call: Call) -> str:
    """torch's message, without a C++ backtrace and bounded; when it names no argument (as in
    "The size of tensor a (4) must match the size of tensor b (5)"), what was sent is appended."""
    text = " ".join(str(exc).split("\nException raised from", 1)[0].split()) or type(exc).__name__
    if len(text) > _MAX_MESSAGE_CHARS:
        text = text[: _MAX_MESSAGE_CHARS - 3] + "..."
    names = [*call.tensors, *call.options]
    if not re.search(r"\b(" + "|".join(map(re.escape, names)) + r")\b", text, re.IGNORECASE):
        sent = ", ".join(
            f"{name} {str(t.dtype).removeprefix('torch.')} {list(t.shape)}" for name, t in call.tensors.items()
        )
        text = f"{text} (arguments: {sent})"
    return text


def _is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's plain RuntimeError."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc)
    )


def _is_device_failure(exc: BaseException) -> bool:
    """A CUDA error is a fault of the device, not of the arguments: it must reach INTERNAL."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and str(exc).startswith("CUDA error")


class _WarningRecorder:
    """Records the warnings each thread raises inside ``record()``.

    Until Python 3.14 the warnings filters and ``showwarning`` are process-wide, so
    ``warnings.catch_warnings`` in two compute threads at once would restore each other's state
    and lose warnings. Instead, while any thread records, one hook with an "always" filter is
    installed, and it files each warning under the thread that raised it; warnings from other
    threads go to the previous hook.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._local = threading.local()
        self._saved: contextlib.AbstractContextManager[Any] | None = None

    @contextlib.contextmanager
    def record(self) -> Iterator[list[str]]:
        texts: list[str] = []
        with self._lock:
            if self._depth == 0:
                saved = warnings.catch_warnings()  # restores filters and showwarning on exit
                saved.__enter__()
                warnings.simplefilter("always")
                warnings.showwarning = functools.partial(self._show, warnings.showwarning)
                self._saved = saved
            self._depth += 1
        self._local.texts = texts
        try:
            yield texts
        finally:
            self._local.texts = None
            with self._lock:
                self._depth -= 1
                if self._depth == 0 and self._saved is not None:
                    self._saved.__exit__(None, None, None)
                    self._saved = None

    def _show(self, previous: Callable[..., None], message: Warning | str, *args: Any, **kwargs: Any) -> None:
        """``warnings.showwarning`` while recording: keep this thread's warning, pass others on."""
        texts: list[str] | None = getattr(self._local, "texts", None)
        if texts is None:
            previous(message, *args, **kwargs)
        else:
            texts.append(str(message))


_recorder = _WarningRecorder()
