"""Batch rules: how calls of one loss share one computation with ``reduction="none"``.

A ``BatchRule`` (a ``LossSpec``'s ``batch``) names the tensor arguments that carry the batch
dimension (and where), those every call of a batch must share byte for byte (class weights),
and how one call's slice of the unreduced loss is reduced exactly as torch reduces it.

- ``rule.plan(call)`` -> ``Plan`` (grouping key, size, the call's own reduction and torch's
  warnings for it), or None where the call must run alone.
- ``rule.stack(plans)`` -> ``Stack``: the batch's arguments, concatenated on the host.
- ``stack.reduce(loss, tensors)``: each call's loss from the batch's unreduced loss;
  ``stack.piece(i, name, tensor)``: call i's share of a batched tensor (e.g. a gradient).

A call without a batch dimension (torch's "unbatched" shapes) joins a batch as one sample: its
tensors are unsqueezed, and its share is squeezed back. Calls run alone where re-reducing
cannot match torch, or would need torch's words for a warning that depends on the reduction
(see ``alone`` in each rule and ``Plan``). Nothing here touches a device.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import types
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn import _reduction

from remoteloss_server.losses.call import Call
from remoteloss_server.losses.hooks import CosineDistance
from remoteloss_server.scheduling import SchedulingPolicy
from remoteloss_server.torch_warnings import record

__all__ = ["BATCHED", "PADDED", "RAGGED", "SHARED", "BatchRule", "Plan", "Stack"]

BATCHED = "batched"  # concatenated along its batch dimension
SHARED = "shared"  # one tensor for the whole batch; identical bytes in every call
PADDED = "padded"  # CTC's padded (N, S) targets: padded to the widest S, then concatenated
RAGGED = "ragged"  # CTC's concatenated targets: concatenated as they are

_LEGACY = ("size_average", "reduce")
_NOT_KEYED = ("reduction", *_LEGACY)  # each call of a batch reduces its own share
_LOW_PRECISION = (torch.float16, torch.bfloat16)

Mean = Callable[[torch.Tensor, Mapping[str, torch.Tensor], Mapping[str, Any]], torch.Tensor]
Empty = Callable[..., torch.Tensor]


class _Unbatchable(Exception):
    pass


@dataclass(frozen=True)
class Plan:
    """How one call joins a batch."""

    key: Hashable  # calls with equal keys can be computed together
    size: int  # samples it adds along the batch dimension (1 for an unbatched call)
    unbatched: bool  # the call had no batch dimension; its tensors were unsqueezed
    reduction: str  # its reduction, after torch's size_average/reduce
    warnings: tuple[str, ...]  # what torch warns for this reduction (the batch runs with "none")
    elements: int  # tensor elements the call adds to a batch
    tensors: Mapping[str, torch.Tensor]  # its arguments, each with a batch dimension where it has one
    roles: Mapping[str, str]  # BATCHED, SHARED, PADDED or RAGGED by argument
    options: Mapping[str, Any]  # the batch's options: the call's, with reduction "none"


def _mean(loss: torch.Tensor, parts: Mapping[str, torch.Tensor], options: Mapping[str, Any]) -> torch.Tensor:
    return loss.mean()


def _never(call: Call) -> bool:
    return False


def always(call: Call) -> bool:
    return True


def _no_warnings(reduction: str, options: Mapping[str, Any]) -> tuple[str, ...]:
    return ()


@dataclass(frozen=True)
class BatchRule:
    """Which arguments carry the batch dimension, and how a call's share is reduced."""

    reference: str = "input"  # the argument whose batch dimension gives a call's size
    unbatched_rank: int = 0  # the reference's rank when a call has no batch dimension
    batch_dims: Mapping[str, int] = field(default_factory=dict)  # the batch dimension, 0 where not named
    shared: frozenset[str] = frozenset()  # never batched: class weights, linear_weight
    broadcast: frozenset[str] = frozenset()  # batched when they carry the batch dimension, else shared
    homoscedastic: frozenset[str] = frozenset()  # gaussian var: may also be the reference's shape minus its last dim
    padded: frozenset[str] = frozenset()  # CTC targets: padded (N, S) or concatenated (sum of lengths)
    same_rank: bool = False  # batched arguments have the reference's rank (losses that broadcast)
    same_shape: frozenset[str] = frozenset()  # must have the reference's shape exactly (else alone)
    mean: Mean = _mean  # reduction="mean" of one call's share of the unreduced loss
    alone: Callable[[Call], bool] = _never  # option combinations that must run alone
    warns: Callable[[str, Mapping[str, Any]], tuple[str, ...]] = _no_warnings  # torch's warnings per reduction
    # Calls whose unreduced loss and its gradient come element by element (or row by row, from a
    # kernel set up by the row's length alone), so that on a GPU each call's bits are the same
    # whatever rows surround it. Others (a sum over classes, features, time or a matmul inside
    # each sample, whose kernel is set up by the number of rows) never concatenate on a GPU.
    invariant: Callable[[Call], bool] = _never

    def plan(
        self, call: Call, max_shared_elements: int = SchedulingPolicy.max_shared_elements, *, invariant: bool = False
    ) -> Plan | None:
        """How ``call`` joins a batch, or None where it must run alone (also when a shared tensor
        has more than ``max_shared_elements``: ``SchedulingPolicy.max_shared_elements``; and,
        with ``invariant``, where ``self.invariant(call)`` is False)."""
        if invariant and not self.invariant(call):
            return None
        try:
            return self._plan(call, max_shared_elements)
        except _Unbatchable:
            return None

    def _plan(self, call: Call, max_shared_elements: int) -> Plan:
        if self.alone(call):
            raise _Unbatchable
        reduction, texts = _resolve_reduction(call.options)
        reference = call.tensors[self.reference]
        if reference.dim() < self.unbatched_rank:
            raise _Unbatchable  # torch rejects it; let it say so alone
        unbatched = reference.dim() == self.unbatched_rank
        tensors = {
            name: self._with_batch_dim(name, t, reference) if unbatched else t for name, t in call.tensors.items()
        }
        reference = tensors[self.reference]
        size = reference.shape[self._dim(self.reference)]
        roles = {name: self._role(name, t, reference, size) for name, t in tensors.items()}
        arguments: list[tuple[Any, ...]] = []
        for name, role in sorted(roles.items()):
            t = tensors[name]
            if role == SHARED:
                if name in call.requires_grad or t.numel() > max_shared_elements:
                    raise _Unbatchable  # each call needs its own gradient; or too large to compare
                arguments.append((name, role, t.dtype, tuple(t.shape), _digest(t)))
            elif role == BATCHED:
                arguments.append((name, role, t.dtype, _without(t.shape, self._dim(name))))
            else:
                arguments.append((name, role, t.dtype))
        options = {k: v for k, v in call.options.items() if k not in _NOT_KEYED}
        key = (call.loss, _freeze(options), tuple(arguments), call.requires_grad)
        elements = sum(t.numel() for name, t in tensors.items() if roles[name] != SHARED)
        batch_options = {**options, **{k: None for k in _LEGACY if k in call.options}, "reduction": "none"}
        texts += self.warns(reduction, call.options)
        return Plan(key, size, unbatched, reduction, texts, elements, tensors, roles, batch_options)

    def _dim(self, name: str) -> int:
        return self.batch_dims.get(name, 0)

    def _with_batch_dim(self, name: str, tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """An unbatched call's argument, given a batch dimension of 1 where it would have one."""
        if name in self.shared or (name in self.broadcast and tensor.dim() < reference.dim()):
            return tensor
        return tensor.unsqueeze(self._dim(name))

    def _role(self, name: str, t: torch.Tensor, reference: torch.Tensor, size: int) -> str:
        rank = reference.dim()
        if name in self.shared:
            return SHARED
        if name in self.padded:
            if t.dim() == 2 and t.shape[0] == size:
                return PADDED
            if t.dim() == 1:
                return RAGGED
            raise _Unbatchable
        if name in self.broadcast:
            if t.dim() == rank and t.shape[0] == size:
                return BATCHED
            if t.dim() < rank or (t.dim() == rank and t.shape[0] == 1):
                return SHARED  # broadcasts over the batch dimension
            raise _Unbatchable
        if name in self.homoscedastic:
            if (t.dim() == rank and t.shape[0] == size) or (t.dim() >= 1 and t.shape == reference.shape[:-1]):
                return BATCHED
            return SHARED
        dim = self._dim(name)
        if t.dim() <= dim or t.shape[dim] != size:
            raise _Unbatchable
        if (self.same_rank and t.dim() != rank) or (name in self.same_shape and t.shape != reference.shape):
            raise _Unbatchable
        return BATCHED

    def stack(self, plans: Sequence[Plan], empty: Empty = torch.empty) -> Stack:
        """The batch's arguments on the host: every call's, concatenated into tensors made by
        ``empty(shape, dtype=...)`` (the executor's pinned memory on a GPU); shared ones once."""
        first = plans[0]
        tensors = {}
        for name, role in first.roles.items():
            parts = [plan.tensors[name] for plan in plans]
            if role == SHARED:
                tensors[name] = parts[0]
                continue
            dim = self._dim(name) if role == BATCHED else 0
            shape = list(parts[0].shape)
            shape[dim] = sum(t.shape[dim] for t in parts)
            if role == PADDED:
                shape[1] = max(t.shape[1] for t in parts)
                parts = [F.pad(t, (0, shape[1] - t.shape[1])) if t.shape[1] < shape[1] else t for t in parts]
            tensors[name] = torch.cat(parts, dim=dim, out=empty(shape, dtype=parts[0].dtype))
        offsets, total = [], 0
        for plan in plans:
            offsets.append(total)
            total += plan.size
        return Stack(self, tuple(plans), tensors, tuple(offsets))


@dataclass(frozen=True)
class Stack:
    """A batch: its calls' plans, their concatenated arguments and where each call's samples start."""

    rule: BatchRule
    plans: tuple[Plan, ...]
    tensors: dict[str, torch.Tensor]
    offsets: tuple[int, ...]

    @property
    def options(self) -> Mapping[str, Any]:
        return self.plans[0].options

    def piece(self, i: int, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Call i's share of ``tensor``, a batched argument (or its gradient), in the call's shape."""
        dim = self.rule._dim(name)
        part = tensor.narrow(dim, self.offsets[i], self.plans[i].size)
        return part.squeeze(dim) if self.plans[i].unbatched else part

    def reduce(self, loss: torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Each call's loss from the batch's unreduced ``loss``, computed from ``tensors``.

        The shares come from one ``split`` per tensor (not a slice per call), so that backward
        assembles each gradient once instead of once per call. Each share that is reduced, and
        each part a mean reads, is first copied into a tensor of its own: a reduction then runs
        on a tensor of the call's size, freshly allocated, wherever the call sat in the batch,
        so its result (and its backward) does not depend on the batch (on a GPU, a reduction's
        kernel depends on the size and the alignment of its input).
        """
        sizes = [plan.size for plan in self.plans]
        shares = [
            share if plan.reduction == "none" else share.clone()
            for plan, share in zip(self.plans, loss.split_with_sizes(sizes), strict=True)
        ]
        parts: dict[str, Sequence[torch.Tensor]] = {}
        if any(plan.reduction == "mean" for plan in self.plans):
            for name, role in self.plans[0].roles.items():
                if role in (BATCHED, PADDED):
                    pieces = tensors[name].split_with_sizes(sizes, self.rule._dim(name))
                    parts[name] = [piece.clone() for piece in pieces]
                elif role == SHARED:
                    parts[name] = [tensors[name]] * len(sizes)
        losses = []
        for i, (plan, share) in enumerate(zip(self.plans, shares, strict=True)):
            if plan.reduction == "none":
                losses.append(share.squeeze(0) if plan.unbatched else share)
            elif plan.reduction == "sum":
                losses.append(share.sum())
            elif plan.reduction == "batchmean":  # kl_div: the sum over the call's batch size
                losses.append(share.sum() / plan.size)
            else:
                losses.append(self.rule.mean(share, {name: p[i] for name, p in parts.items()}, self.options))
        return losses


def _resolve_reduction(options: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    """The reduction torch applies, and its deprecation warning where size_average/reduce are set."""
    reduction: str = options.get("reduction", "mean")
    size_average, reduce = options.get("size_average"), options.get("reduce")
    if size_average is None and reduce is None:
        return reduction, ()
    if reduction == "batchmean":  # kl_div divides the legacy reduction by the batch size, too
        raise _Unbatchable
    with record() as texts:
        resolved = _reduction.legacy_get_string(size_average, reduce)
    return resolved, tuple(texts)


def _without(shape: torch.Size, dim: int) -> tuple[int, ...]:
    return (*shape[:dim], *shape[dim + 1 :])


def _digest(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().contiguous().reshape(-1)
    data = flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)
    buffer: Any = data.numpy()  # hashed in place, without a copy
    return hashlib.blake2b(buffer, digest_size=16).digest()


def _freeze(value: Any) -> Hashable:
    """A hashable stand-in for an option value that compares by value."""
    if value is None or isinstance(value, bool | int | float | str | torch.dtype):
        return (type(value).__name__, value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, functools.partial):
        return ("partial", value.func, tuple(map(_freeze, value.args)), _freeze(value.keywords))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value), tuple((f.name, _freeze(getattr(value, f.name))) for f in dataclasses.fields(value)))
    if isinstance(value, CosineDistance):
        return (CosineDistance, _freeze(vars(value)))
    if isinstance(value, types.BuiltinFunctionType | types.FunctionType):
        return ("function", value)
    raise _Unbatchable


# ---------------------------------------------------------------------------- per-loss reductions


def _sum(loss: torch.Tensor) -> torch.Tensor:
    """A sum that accumulates half types in float32, as torch's loss kernels do."""
    return loss.sum(dtype=torch.float32) if loss.dtype in _LOW_PRECISION else loss.sum()


def weighted_mean(loss: torch.Tensor, parts: Mapping[str, torch.Tensor], options: Mapping[str, Any]) -> torch.Tensor:
    """l1_loss, mse_loss: with a weight, sum(weight * loss) / sum(weight)."""
    weight = parts.get("weight")
    return loss.mean() if weight is None else loss.sum() / weight.sum()


def class_mean(loss: torch.Tensor, parts: Mapping[str, torch.Tensor], options: Mapping[str, Any]) -> torch.Tensor:
    """cross_entropy, nll_loss, linear_cross_entropy: over the weights of the targets not ignored.

    With label smoothing torch divides both of its terms by that same total (probabilities:
    by the number of positions), so the sum of the unreduced loss over it is torch's mean.
    """
    target = parts["target"]
    if target.is_floating_point():
        return loss.mean()
    ignore_index = options.get("ignore_index")
    target = target.to(torch.int64)
    kept = target != (-100 if ignore_index is None else ignore_index)
    weight = parts.get("weight")
    if weight is None:
        total = kept.sum()
    else:  # masks rather than selection, which would wait for the device
        total = (weight[torch.where(kept, target, 0)] * kept).sum()
    return (_sum(loss) / total).to(loss.dtype)


def ctc_mean(loss: torch.Tensor, parts: Mapping[str, torch.Tensor], options: Mapping[str, Any]) -> torch.Tensor:
    """ctc_loss: each loss over its target length (at least 1), then the mean."""
    return (loss / parts["target_lengths"].to(loss.dtype).clamp_min(1)).mean()


# ---------------------------------------------------------------------------- per-loss conditions


@functools.cache
def _kl_div_mean_warnings(log_target: bool) -> tuple[str, ...]:
    """torch's words for kl_div's reduction="mean", from torch itself."""
    with record() as texts:
        F.kl_div(torch.zeros(1), torch.zeros(1), reduction="mean", log_target=log_target)
    return tuple(texts)


def kl_div_warnings(reduction: str, options: Mapping[str, Any]) -> tuple[str, ...]:
    if reduction != "mean" or any(options.get(name) is not None for name in _LEGACY):
        return ()
    return _kl_div_mean_warnings(bool(options["log_target"]))


def class_indices_invariant(call: Call) -> bool:
    """cross_entropy: class indices of (N, C) or (C) logits without label smoothing (a log-softmax
    by row, then a gather); probabilities and label smoothing sum over the classes."""
    target = call.tensors["target"]
    smoothing = call.options.get("label_smoothing") or 0.0
    return not target.is_floating_point() and smoothing == 0.0 and call.tensors["input"].dim() <= 2


def linear_cross_entropy_alone(call: Call) -> bool:
    """Probabilities with an ignore_index (torch raises), and ``options`` that torch ignores with a
    warning naming the reduction."""
    target, options = call.tensors["target"], call.options
    if target.is_floating_point() and options["ignore_index"] is not None:
        return True
    return options["options"] is not None and (
        call.tensors["linear_weight"].dim() > 2 or options["label_smoothing"] != 0.0 or target.dtype != torch.int64
    )


def distance_alone(call: Call) -> bool:
    """A margin torch rejects, and cosine distances over a dimension other than the last."""
    if call.options["margin"] <= 0:
        return True
    distance = call.options["distance_function"]
    if isinstance(distance, CosineDistance):
        rank = call.tensors["anchor"].dim()
        return not (distance.dim == -1 or (rank > 1 and distance.dim == rank - 1))
    return False
