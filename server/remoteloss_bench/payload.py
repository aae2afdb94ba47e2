"""Requests for ``remoteloss bench``: valid arguments for any loss, from a shape and a dtype.

``--shape`` gives the shape of the loss's main floating argument (``input``, ``input1``,
``anchor`` or ``log_probs``); the other arguments follow from it as torch expects:

- element-wise losses: every tensor has that shape; targets hold what the loss wants
  (probabilities, +-1 labels, 0/1 labels, positive variances);
- class losses (``cross_entropy``, ``nll_loss``, ``multi_margin_loss``): classes are dimension 1
  (dimension 0 of a 1-d input); the target holds class indices in range;
- ``multilabel_margin_loss``: int64 class indices of the input's shape, padded with -1;
- ``cosine_embedding_loss``: one +-1 label per row;
- ``ctc_loss``: the shape is (T, N, C) or (T, C); targets half as long as T;
- ``linear_cross_entropy``: the shape is (N, F) or (F); the weight is (F, F), so F classes.

Data are random (seeded), made with numpy; torch is imported only for bfloat16.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from remoteloss._request import LOSS_NAMES, build_request, tensor_names
from remoteloss.v1 import loss_pb2 as pb

__all__ = ["DTYPES", "arguments", "build", "parse_shape"]

DTYPES = ("float32", "float64", "float16", "bfloat16")

_Arrays = dict[str, Any]
_Maker = Callable[[np.random.Generator, tuple[int, ...]], _Arrays]


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
    rng = np.random.default_rng(seed)
    arrays = _MAKERS.get(loss, _elementwise)(rng, shape)
    return {name: _cast(value, dtype) if _is_float(value) else value for name, value in arrays.items()}


def _is_float(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.dtype.kind == "f"


def _cast(array: np.ndarray[Any, Any], dtype: str) -> Any:
    if dtype != "bfloat16":
        return array.astype(dtype)
    import torch  # numpy has no bfloat16

    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(torch.bfloat16)


def _normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    return rng.standard_normal(shape, dtype=np.float32)


def _uniform(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    return rng.uniform(0.01, 0.99, shape).astype(np.float32)


def _signs(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    return np.where(rng.random(shape) < 0.5, -1.0, 1.0).astype(np.float32)


def _elementwise(rng: np.random.Generator, s: tuple[int, ...]) -> _Arrays:
    return {"input": _normal(rng, s), "target": _normal(rng, s)}


def _classes(s: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """Number of classes and the shape of a class-index target for an input of shape ``s``."""
    if len(s) == 0:
        raise ValueError("a class loss needs an input of at least 1 dimension")
    if len(s) == 1:
        return s[0], ()
    return s[1], s[:1] + s[2:]


def _class_target(rng: np.random.Generator, s: tuple[int, ...]) -> np.ndarray[Any, Any]:
    count, target_shape = _classes(s)
    return rng.integers(0, max(count, 1), target_shape, dtype=np.int64)


def _log_softmax(x: np.ndarray[Any, Any], axis: int) -> np.ndarray[Any, Any]:
    shifted = x - x.max(axis=axis, keepdims=True)
    return np.asarray(shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True)), dtype=np.float32)


def _nll(rng: np.random.Generator, s: tuple[int, ...]) -> _Arrays:
    return {"input": _log_softmax(_normal(rng, s), min(1, len(s) - 1)), "target": _class_target(rng, s)}


def _multilabel_margin(rng: np.random.Generator, s: tuple[int, ...]) -> _Arrays:
    count = s[-1] if s else 1
    target = rng.integers(0, max(count, 1), s, dtype=np.int64)
    if s and count > 1:
        target[..., count // 2] = -1  # the labels end at the first -1
    return {"input": _normal(rng, s), "target": target}


def _row_labels(rng: np.random.Generator, s: tuple[int, ...]) -> np.ndarray[Any, Any]:
    return _signs(rng, s[:1] if len(s) >= 2 else ())


def _ctc(rng: np.random.Generator, s: tuple[int, ...]) -> _Arrays:
    if len(s) not in (2, 3) or s[-1] < 2:
        raise ValueError(f"ctc_loss: shape must be (T, N, C) or (T, C) with C >= 2, got {list(s)}")
    steps, classes = s[0], s[-1]
    batch = s[1:2] if len(s) == 3 else ()
    length = max(1, steps // 2)
    return {
        "log_probs": _log_softmax(_normal(rng, s), len(s) - 1),
        "targets": rng.integers(1, classes, (*batch, length), dtype=np.int64),
        "input_lengths": np.full(batch, steps, dtype=np.int64),
        "target_lengths": np.full(batch, length, dtype=np.int64),
    }


def _linear_cross_entropy(rng: np.random.Generator, s: tuple[int, ...]) -> _Arrays:
    if len(s) not in (1, 2):
        raise ValueError(f"linear_cross_entropy: shape must be (N, F) or (F), got {list(s)}")
    features = s[-1]
    weight = _normal(rng, (features, features)) / np.float32(math.sqrt(max(features, 1)))
    return {
        "input": _normal(rng, s),
        "linear_weight": weight,
        "target": rng.integers(0, max(features, 1), s[:-1], dtype=np.int64),
    }


_MAKERS: dict[str, _Maker] = {
    "cross_entropy": lambda rng, s: {"input": _normal(rng, s), "target": _class_target(rng, s)},
    "nll_loss": _nll,
    "multi_margin_loss": lambda rng, s: {"input": _normal(rng, s), "target": _class_target(rng, s)},
    "ctc_loss": _ctc,
    "poisson_nll_loss": lambda rng, s: {"input": _normal(rng, s), "target": rng.poisson(2.0, s).astype(np.float32)},
    "gaussian_nll_loss": lambda rng, s: {"input": _normal(rng, s), "target": _normal(rng, s), "var": _uniform(rng, s)},
    "kl_div": lambda rng, s: {"input": np.log(_uniform(rng, s)), "target": _uniform(rng, s)},
    "binary_cross_entropy": lambda rng, s: {"input": _uniform(rng, s), "target": _uniform(rng, s)},
    "binary_cross_entropy_with_logits": lambda rng, s: {"input": _normal(rng, s), "target": _uniform(rng, s)},
    "margin_ranking_loss": lambda rng, s: {"input1": _normal(rng, s), "input2": _normal(rng, s), "target": _signs(rng, s)},
    "hinge_embedding_loss": lambda rng, s: {"input": _normal(rng, s), "target": _signs(rng, s)},
    "soft_margin_loss": lambda rng, s: {"input": _normal(rng, s), "target": _signs(rng, s)},
    "multilabel_margin_loss": _multilabel_margin,
    "multilabel_soft_margin_loss": lambda rng, s: {
        "input": _normal(rng, s), "target": (rng.random(s) < 0.5).astype(np.float32),
    },
    "cosine_embedding_loss": lambda rng, s: {
        "input1": _normal(rng, s), "input2": _normal(rng, s), "target": _row_labels(rng, s),
    },
    "triplet_margin_loss": lambda rng, s: {name: _normal(rng, s) for name in ("anchor", "positive", "negative")},
    "triplet_margin_with_distance_loss": lambda rng, s: {
        name: _normal(rng, s) for name in ("anchor", "positive", "negative")
    },
    "linear_cross_entropy": _linear_cross_entropy,
}
