"""What torch raised, as the service answers it: the arguments' fault (INVALID_ARGUMENT, with
torch's message bounded and naming what was sent), memory (RESOURCE_EXHAUSTED), or the device's
(propagates, to reach INTERNAL). The executor alone calls torch's losses; this is how it reads
their failures."""

from __future__ import annotations

import re

import torch

from remoteloss_server.losses import Call

__all__ = ["REJECTIONS", "is_device_failure", "is_out_of_memory", "message"]

# Raised by torch for arguments it rejects, in the loss function or in its backward.
REJECTIONS = (RuntimeError, ValueError, IndexError, TypeError)
_MAX_MESSAGE_CHARS = 1000


def message(exc: BaseException, call: Call) -> str:
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


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's plain RuntimeError."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc)
    )


def is_device_failure(exc: BaseException) -> bool:
    """A CUDA error is a fault of the device, not of the arguments: it must reach INTERNAL."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and str(exc).startswith("CUDA error")
