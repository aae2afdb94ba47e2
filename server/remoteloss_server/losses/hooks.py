"""Option hooks: the few request fields that are not a tensor, a reduction or a plain scalar.

Each hook takes the loss name and its request message and returns torch keyword arguments.
Defaults missing from the message come from torch's own signatures.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F

from remoteloss import codec
from remoteloss_server.errors import InvalidArgumentError

__all__ = ["distance_function", "linear_cross_entropy_options", "var_float"]


def _present(message: Any) -> dict[str, Any]:
    """The fields set in a message of optional scalars, by name."""
    return {f.name: value for f, value in message.ListFields()}


def var_float(loss: str, message: Any) -> dict[str, Any]:
    """``gaussian_nll_loss``: torch's ``var`` is either the Tensor field ``var`` or ``var_float``."""
    has_tensor, has_float = message.HasField("var"), message.HasField("var_float")
    if has_tensor and has_float:
        raise InvalidArgumentError(f"{loss}: set either var or var_float, not both")
    if not (has_tensor or has_float):
        raise InvalidArgumentError(f"{loss}: var is required (a tensor in var, or a float in var_float)")
    if has_float and message.var_float < 0:  # torch's own message would say "var"
        raise InvalidArgumentError(f"{loss}: var_float is {message.var_float}, but must be >= 0")
    return {"var": message.var_float} if has_float else {}


class CosineDistance:
    """``1 - cosine_similarity(x1, x2, dim, eps)``: a named, printable distance function."""

    def __init__(self, dim: int, eps: float) -> None:
        self.dim, self.eps = dim, eps

    def __call__(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return 1.0 - F.cosine_similarity(x1, x2, dim=self.dim, eps=self.eps)

    def __repr__(self) -> str:
        return f"CosineDistance(dim={self.dim}, eps={self.eps})"


# F.cosine_similarity is a builtin without a signature; its module twin has the same defaults.
_COSINE_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(torch.nn.CosineSimilarity).parameters.items()
    if name in ("dim", "eps")
}


def distance_function(loss: str, message: Any) -> dict[str, Any]:
    """``triplet_margin_with_distance_loss``: the ``DistanceFunction`` message -> a callable."""
    if not message.HasField("distance_function"):
        return {}
    choice = message.distance_function
    kind = choice.WhichOneof("kind")
    if kind == "pairwise_distance":
        return {"distance_function": functools.partial(F.pairwise_distance, **_present(choice.pairwise_distance))}
    if kind == "cosine_distance":
        return {"distance_function": CosineDistance(**{**_COSINE_DEFAULTS, **_present(choice.cosine_distance)})}
    return {}  # an empty DistanceFunction: torch's default, as when unset


def linear_cross_entropy_options(loss: str, message: Any) -> dict[str, Any]:
    """``linear_cross_entropy``: the ``options`` message -> ``torch.nn.LinearCrossEntropyOptions``."""
    if not message.HasField("options"):
        return {}
    fields = _present(message.options)
    if fields.get("chunking_method") == "none":
        fields["chunking_method"] = None
    if "acc_dtype" in fields:
        info = codec.DTYPES.get(fields["acc_dtype"])
        if info is None:
            raise InvalidArgumentError(f"{loss}: options.acc_dtype has an unknown value {fields['acc_dtype']}")
        fields["acc_dtype"] = getattr(torch, info.name)
    try:
        return {"options": torch.nn.LinearCrossEntropyOptions(**fields)}
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"{loss}: options: {exc}") from None
