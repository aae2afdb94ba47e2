"""Requests for ``remoteloss bench``: valid arguments for any loss, from a shape and a dtype.

``--shape`` gives the shape of the loss's main argument (``input``, ``input1``, ``anchor`` or
``log_probs``); the others follow from it as the loss's sample entry (``remoteloss._samples``,
the arguments every test draws from) makes them: class losses take classes from dimension 1
(dimension 0 of a 1-d input), ``ctc_loss`` takes (T, N, C) or (T, C), ``linear_cross_entropy``
(N, F) or (F) with F + 2 classes.

Data are random (seeded), made with numpy; torch is imported only for bfloat16.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from remoteloss._request import LOSS_NAMES, build_request, tensor_names
from remoteloss._samples import ENTRIES, Draw
from remoteloss.v1 import loss_pb2 as pb

__all__ = ["DTYPES", "arguments", "build", "parse_shape"]

DTYPES = ("float32", "float64", "float16", "bfloat16")


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1000"`` -> (1000,); ``"64x1000"`` -> (64, 1000); ``""`` -> () (a scalar)."""
    text = text.strip().lower()
    if not text:
        return ()
    try:
        shape = tuple(int(part) for part in text.replace("*", "x").split("x"))
    except ValueError:
        raise ValueError(f"shape must be sizes joined by 'x', e.g. 64x1000, got {text!r}") from None
    if any(size < 0 for size in shape):
        raise ValueError(f"shape sizes must be >= 0, got {text!r}")
    return shape


def build(loss: str, shape: tuple[int, ...], dtype: str, *, grad: bool, seed: int = 0) -> pb.ComputeRequest:
    """A ``ComputeRequest`` for ``loss`` whose main argument has ``shape`` and ``dtype``;
    with ``grad``, the gradient of the main argument is asked for.

    Raises ValueError for an unknown loss or dtype, or a shape the loss cannot take.
    """
    main = tensor_names(loss)[0]
    return build_request(loss, arguments(loss, shape, dtype, seed=seed), wrt=(main,) if grad else ())


def arguments(loss: str, shape: tuple[int, ...], dtype: str, *, seed: int = 0) -> dict[str, Any]:
    """The arguments of ``build``'s request (floating arrays of bfloat16 are torch tensors).
    Raises as ``build``."""
    if loss not in LOSS_NAMES:
        raise ValueError(f"loss must be one of {', '.join(LOSS_NAMES)}; got {loss!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    arrays = ENTRIES[loss].make(Draw(seed), shape, {})
    return {name: _cast(value, dtype) if _is_float(value) else value for name, value in arrays.items()}


def _is_float(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.dtype.kind == "f"


def _cast(array: np.ndarray[Any, Any], dtype: str) -> Any:
    if dtype != "bfloat16":
        return array.astype(dtype)
    import torch  # numpy has no bfloat16

    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(torch.bfloat16)
