"""``Call``: one validated torch call, as ``LossSpec.prepare`` makes it and the batch rules,
the batcher and the executor take it. Its own module so that ``spec`` (which makes calls) and
``batching`` (which groups them) both import it and neither imports the other at run time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Call"]


@dataclass(frozen=True)
class Call:
    """One validated torch call: ``function(**tensors, **options)`` on the device."""

    loss: str
    function: Callable[..., torch.Tensor]
    tensors: dict[str, torch.Tensor]
    options: dict[str, Any]
    requires_grad: tuple[str, ...]  # names of the tensors to differentiate with respect to
    # The largest tensor the call makes beyond its arguments (a broadcast, logits, CTC's alignment
    # table), in elements; 0 when none. What it costs is sized by this, not by what was sent.
    implied_elements: int = 0

    @property
    def elements(self) -> int:
        """The elements the call holds at most at once: its arguments, or what they imply."""
        return max(sum(t.numel() for t in self.tensors.values()), self.implied_elements)

    def __call__(self) -> torch.Tensor:
        return self.function(**self.tensors, **self.options)
