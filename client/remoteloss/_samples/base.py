"""The machinery of the sample entries: seeded draws, option sets and one ``Entry`` per loss."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "OMIT",
    "STD",
    "Array",
    "Draw",
    "Entry",
    "Maker",
    "Options",
    "RemoteOnly",
    "Shape",
    "class_layout",
    "options",
    "t",
    "torch_options",
]

OMIT = "omit"  # an option set's reduction: the argument is left out (torch's default, "mean")
STD = ("none", "mean", "sum")

Array = np.ndarray[Any, Any]
Shape = tuple[int, ...]


class Draw:
    """Values from a seeded generator, always float64 (or int64 class indices): the caller casts
    them to the dtype it tests, so every dtype sees the same values."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def randn(self, *shape: int) -> Array:
        return self.rng.standard_normal(shape)

    def uniform(self, *shape: int, lo: float = 0.0, hi: float = 1.0) -> Array:
        return np.asarray(lo + (hi - lo) * self.rng.random(shape))

    def sign(self, *shape: int) -> Array:
        return np.asarray(self.rng.integers(0, 2, shape).astype(np.float64) * 2 - 1)

    def bits(self, *shape: int) -> Array:
        return np.asarray(self.rng.integers(0, 2, shape).astype(np.float64))

    def classes(self, shape: Shape, high: int, low: int = 0, dtype: str = "int64") -> Array:
        return np.asarray(self.rng.integers(low, max(high, low + 1), shape).astype(dtype))

    def log_softmax(self, *shape: int, dim: int) -> Array:
        x = self.randn(*shape)
        shifted = x - x.max(axis=dim, keepdims=True)
        return np.asarray(shifted - np.log(np.exp(shifted).sum(axis=dim, keepdims=True)))

    def softmax(self, *shape: int, dim: int) -> Array:
        return np.asarray(np.exp(self.log_softmax(*shape, dim=dim)))

    def perm(self, n: int) -> Array:
        return self.rng.permutation(n)

    def scaled(self, *shape: int, fan_in: int) -> Array:
        """Normal values scaled by 1/sqrt(fan_in), as a linear layer's weight."""
        return np.asarray(self.randn(*shape) / math.sqrt(max(fan_in, 1)))


# (draw, the shape of the main argument, options) -> every argument by torch's name: tensors
# (numpy, float64 or integer), torch's keyword options, and hints read by the maker only.
Maker = Callable[[Draw, Shape, Mapping[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Options:
    """One option set of a loss: torch's keyword arguments under ``"torch"``, plus hints to its
    maker (``"weight"``, ``"prob"``, ``"shape"``: the main argument's shape, ...)."""

    name: str
    opts: Mapping[str, Any] = field(default_factory=dict)
    batched: tuple[bool, ...] = (True, False)  # the layouts the set is tested in; the first is its own
    reductions: tuple[str, ...] | None = None  # None: every reduction of the loss
    dtypes: tuple[str, ...] | None = None  # None: the usual plan; else only these dtypes (numpy names)


@dataclass(frozen=True)
class Entry:
    """The sample inputs of one loss (as torch's OpInfo ``sample_inputs``): a maker of valid
    arguments for a main-argument shape, the shapes the tests use, and the option sets to cover."""

    loss: str
    make: Maker
    batched: Shape  # the main argument's shape in the tests, with a batch dimension
    unbatched: Shape  # and without one
    option_sets: tuple[Options, ...]  # the first is the default ("default": no options)
    reductions: tuple[str, ...] = STD

    def arguments(self, seed: int, *, batched: bool = True, opts: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Every argument of one sample: the option set's shape, or the entry's for ``batched``."""
        opts = opts or {}
        shape = opts.get("shape", self.batched if batched else self.unbatched)
        return self.make(Draw(seed), tuple(shape), opts)


@dataclass(frozen=True)
class RemoteOnly:
    """An argument whose remote spelling differs from the local one (``remoteloss.CosineDistance()``
    for a lambda): ``local`` is torch's, ``remote()`` makes the SDK's."""

    local: Any
    remote: Callable[[], Any]


_DEPRECATED = (
    {"size_average": False},
    {"reduce": False},
    {"size_average": True, "reduce": True},
    {"size_average": False, "reduce": False},
)


def options(*sets: Options, deprecated: bool = True) -> tuple[Options, ...]:
    """The default set, ``sets``, and (for losses that take them) torch's deprecated
    ``size_average``/``reduce``, which override ``reduction`` and so run without it."""
    old = tuple(
        Options("-".join(f"{k}={v}" for k, v in o.items()), {"torch": dict(o)}, reductions=(OMIT,))
        for o in _DEPRECATED
    )
    return (Options("default"), *sets, *(old if deprecated else ()))


def torch_options(opts: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The torch keyword arguments of an option set, plus ``extra``."""
    return {**opts.get("torch", {}), **extra}


def t(**torch_kwargs: Any) -> dict[str, Any]:
    """An option set's ``opts`` of torch keyword arguments only."""
    return {"torch": torch_kwargs}


def class_layout(loss: str, s: Shape) -> tuple[int, Shape]:
    """Classes and the class-index target's shape for logits of shape ``s``: classes are
    dimension 1 (dimension 0 of a 1-d input), as torch's class losses take them."""
    if len(s) == 0:
        raise ValueError(f"{loss}: a class loss needs an input of at least 1 dimension, got []")
    if len(s) == 1:
        return s[0], ()
    return s[1], s[:1] + s[2:]
