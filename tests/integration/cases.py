"""The case table: every loss x option set x reduction x dtype, drawn from the sample entries.

The arguments of each loss come from its sample entry (``remoteloss._samples``: a maker of valid
arguments, the shapes and the option sets to cover, the reductions). :func:`cases` expands them
into :class:`Case` objects:

* float64: every option set x every reduction, batched (and unbatched where the option set
  allows it);
* float32: every option set with the default reduction, plus the default options with every
  reduction;
* float16 and bfloat16: the default options with every reduction, batched.

Values are drawn in float64 from a generator seeded by the case's id and then cast, so a case
is reproducible and the same across runs. Nothing here talks to a server.
"""

from __future__ import annotations

import functools
import inspect
import warnings
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from remoteloss._samples import ENTRIES, OMIT, Entry, RemoteOnly
from remoteloss._samples import Options as OptionSet

from tests.catalog import LOSS_NAMES

# torch 2.13 reduces these losses' empty batch (sum or mean) to memory it never wrote; the server
# answers what torch's other losses do, 0 and NaN, and so does the local reference (``Call.local``).
EMPTY_BATCH_UNWRITTEN = frozenset({"multi_margin_loss", "multilabel_margin_loss"})

__all__ = [
    "CPU_NO_LOW_PRECISION",
    "FLOAT_DTYPES",
    "LOSS_NAMES",
    "LOW_PRECISION",
    "OMIT",
    "Call",
    "Case",
    "OptionSet",
    "all_cases",
    "arg_names",
    "cases",
    "differentiable",
    "probe",
    "reductions",
    "tolerance",
    "with_grad",
]

# torch's CPU kernels of these losses take no float16/bfloat16: torch raises, so the server must
# answer INVALID_ARGUMENT (a server on a GPU may accept them; this suite runs on a CPU server).
CPU_NO_LOW_PRECISION = frozenset({"ctc_loss", "multilabel_margin_loss", "multi_margin_loss"})
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)


@functools.cache
def arg_names(loss: str) -> tuple[str, ...]:
    """The loss's positional arguments: torch's parameters without a default, in its order."""
    parameters = inspect.signature(getattr(F, loss)).parameters.values()
    return tuple(p.name for p in parameters if p.default is inspect.Parameter.empty)


def reductions(loss: str) -> tuple[str, ...]:
    return ENTRIES[loss].reductions


def _torch(value: Any, dtype: torch.dtype) -> Any:
    """A sample's numpy array as a torch tensor: floating ones in ``dtype``, integers as they are."""
    if not isinstance(value, np.ndarray):
        return value
    tensor = torch.from_numpy(value)
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def build(loss: str, seed: int, dtype: torch.dtype, batched: bool, opts: Mapping[str, Any], reduction: str) -> Call:
    """One call of ``loss``: its sample entry's arguments as torch tensors of ``dtype``."""
    values = {k: _torch(v, dtype) for k, v in ENTRIES[loss].arguments(seed, batched=batched, opts=opts).items()}
    positional = tuple(name for name in arg_names(loss) if name in values)
    kwargs = {k: v for k, v in values.items() if k not in positional}
    if reduction != OMIT:
        kwargs["reduction"] = reduction
    return Call(loss, tuple(values[n] for n in positional), kwargs, positional)


@dataclass
class Call:
    """The built arguments of one case."""

    loss: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    arg_names: tuple[str, ...]

    def local_kwargs(self) -> dict[str, Any]:
        return {k: (v.local if isinstance(v, RemoteOnly) else v) for k, v in self.kwargs.items()}

    def remote_kwargs(self) -> dict[str, Any]:
        return {k: (v.remote() if isinstance(v, RemoteOnly) else v) for k, v in self.kwargs.items()}

    def local(self) -> Any:
        out = getattr(F, self.loss)(*self.args, **self.local_kwargs())
        x = self.args[0] if self.args else None
        if self.loss in EMPTY_BATCH_UNWRITTEN and out.dim() == 0 and isinstance(x, torch.Tensor) and x.numel() == 0:
            # torch 2.13 answers an empty batch's sum or mean with memory it never wrote (a random
            # value); the server answers what torch's other losses do: 0 and NaN (losses.spec).
            return x.sum() if self.local_kwargs().get("reduction", "mean") == "sum" else x.mean()
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor argument by torch's name."""
        named = dict(zip(self.arg_names, self.args, strict=True))
        named.update(self.kwargs)
        return {k: v for k, v in named.items() if isinstance(v, torch.Tensor)}

    def replace(self, values: Mapping[str, Any]) -> Call:
        """A copy with some arguments (by name) replaced."""
        args = tuple(values.get(n, a) for n, a in zip(self.arg_names, self.args, strict=True))
        kwargs = {k: values.get(k, v) for k, v in self.kwargs.items()}
        return Call(self.loss, args, kwargs, self.arg_names)


@dataclass(frozen=True)
class Case:
    loss: str
    dtype: torch.dtype
    batched: bool
    option_set: OptionSet
    reduction: str  # or OMIT

    @property
    def id(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return f"{self.loss}-{dt}-{'batched' if self.batched else 'unbatched'}-{self.option_set.name}-{self.reduction}"

    @property
    def torch_raises(self) -> bool:
        """Whether torch itself rejects this case on the CPU (see CPU_NO_LOW_PRECISION)."""
        return self.dtype in LOW_PRECISION and self.loss in CPU_NO_LOW_PRECISION

    @property
    def scalar_output(self) -> bool:
        """Whether the loss is a scalar whatever the shapes (a reducing reduction)."""
        deprecated = self.option_set.opts.get("torch", {})
        if "size_average" in deprecated or "reduce" in deprecated:
            return deprecated.get("reduce", True) is not False
        return self.reduction != "none"

    def build(self, seed: int = 0) -> Call:
        """The case's arguments; another ``seed`` draws other values of the same shapes."""
        return build(self.loss, zlib.crc32(self.id.encode()) ^ seed, self.dtype, self.batched,
                     self.option_set.opts, self.reduction)


def _reductions(entry: Entry, option_set: OptionSet) -> tuple[str, ...]:
    if option_set.reductions is not None:
        return option_set.reductions
    if option_set.name == "default":
        return (*entry.reductions, OMIT)
    return entry.reductions


def _dtypes(option_set: OptionSet) -> tuple[torch.dtype, ...]:
    return tuple(getattr(torch, name) for name in option_set.dtypes or ())


def cases(loss: str | None = None) -> Iterator[Case]:
    """Every case of the table (of one loss, if given), float64 first."""
    for entry in ENTRIES.values():
        if loss is not None and entry.loss != loss:
            continue
        name = entry.loss
        default = entry.option_sets[0]
        planned = [o for o in entry.option_sets if o.dtypes is None]
        for option_set in planned:  # float64: everything
            for batched in option_set.batched:
                for reduction in _reductions(entry, option_set):
                    yield Case(name, torch.float64, batched, option_set, reduction)
        for option_set in planned:  # float32: every option set once, every reduction once
            if option_set is default:
                chosen = _reductions(entry, option_set)
            else:
                options = _reductions(entry, option_set)
                chosen = ("mean",) if "mean" in options else options[:1]
            for reduction in chosen:
                yield Case(name, torch.float32, option_set.batched[0], option_set, reduction)
        for dtype in LOW_PRECISION:  # the default options, every reduction
            for reduction in entry.reductions:
                yield Case(name, dtype, True, default, reduction)
        for option_set in entry.option_sets:  # option sets for particular dtypes
            for dtype in _dtypes(option_set):
                for reduction in _reductions(entry, option_set):
                    yield Case(name, dtype, option_set.batched[0], option_set, reduction)


def all_cases() -> list[Case]:
    return list(cases())


TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"rtol": 1e-7, "atol": 1e-9},
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.float16: {"rtol": 1e-2, "atol": 1e-3},
    torch.bfloat16: {"rtol": 2e-2, "atol": 1e-2},
}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return TOLERANCES.get(dtype, TOLERANCES[torch.float64])


def with_grad(call: Call, names: tuple[str, ...] | list[str]) -> tuple[Call, dict[str, torch.Tensor]]:
    """A copy of `call` whose named tensors are fresh leaves that require grad."""
    leaves = {n: call.tensors()[n].detach().clone().requires_grad_() for n in names}
    return call.replace(leaves), leaves


def probe(call: Call) -> dict[str, str]:
    """How torch treats requires_grad on each tensor argument, set one at a time.

    "yes": backward leaves a gradient on it; "raises": torch refuses it (in forward or backward);
    "unused": torch accepts it, but the loss does not depend on it through autograd (the gradient
    stays None); "integer": an integer tensor, which cannot require grad at all.
    """
    found: dict[str, str] = {}
    for name, tensor in call.tensors().items():
        if not tensor.is_floating_point():
            found[name] = "integer"
            continue
        attempt, leaves = with_grad(call, (name,))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = attempt.local()
                if out.requires_grad:
                    out.sum().backward()
        except (RuntimeError, NotImplementedError):
            found[name] = "raises"
            continue
        found[name] = "yes" if leaves[name].grad is not None else "unused"
    return found


def differentiable(call: Call) -> tuple[str, ...]:
    """The tensor arguments torch differentiates the loss for (see :func:`probe`)."""
    return tuple(name for name, kind in probe(call).items() if kind == "yes")
