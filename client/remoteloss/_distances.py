"""Distance functions that ``triplet_margin_with_distance_loss`` can send to the server.

A Python callable cannot travel over the wire, so the server offers named distances.
These classes name them and, called on torch tensors, compute them locally too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["CosineDistance", "PairwiseDistance"]


@dataclass(frozen=True)
class PairwiseDistance:
    """``torch.nn.functional.pairwise_distance(x1, x2, p, eps, keepdim)``."""

    p: float = 2.0
    eps: float = 1e-6
    keepdim: bool = False

    def __call__(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.nn.functional.pairwise_distance(x1, x2, self.p, self.eps, self.keepdim)


@dataclass(frozen=True)
class CosineDistance:
    """``1 - torch.nn.functional.cosine_similarity(x1, x2, dim, eps)``."""

    dim: int = 1
    eps: float = 1e-8

    def __call__(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        import torch

        return 1.0 - torch.nn.functional.cosine_similarity(x1, x2, self.dim, self.eps)
