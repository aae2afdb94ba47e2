"""Per-loss checks, run on the host before any tensor reaches the device.

They cover what torch checks only inside a kernel, where a CUDA device-side assert would break
the context for the whole process (class indices, probabilities in [0, 1], CTC labels), and
rules whose torch message does not name the argument. Everything else torch checks itself
before launching a kernel; the executor reports that as INVALID_ARGUMENT in torch's words.

The first paragraph of each check's docstring says what it checks, for users: docs/VALIDATION.md
is generated from it (scripts/gen_validation.py). A check made by a factory gets its own.
"""

from __future__ import annotations

import math

import torch

from remoteloss_server.losses.hooks import CosineDistance
from remoteloss_server.losses.spec import CLASS_INDEX, Args, Check, dtype_names

__all__ = [
    "binary_cross_entropy",
    "broadcast",
    "broadcast_to",
    "cross_entropy",
    "ctc_loss",
    "distance_dim",
    "gaussian_var",
    "linear_cross_entropy",
    "multi_margin_loss",
    "multilabel_margin_loss",
    "nll_loss",
    "same_dtype",
    "same_ndim",
    "same_shape",
    "triplet",
]


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _first_outside(values: torch.Tensor, low: int, high: int) -> int | None:
    """A value of ``values`` outside [low, high), or None."""
    if values.numel() == 0:
        return None
    values = values.to(torch.int64)
    top, bottom = int(values.max()), int(values.min())
    if top >= high:
        return top
    return bottom if bottom < low else None


def _shape(tensor: torch.Tensor) -> list[int]:
    return list(tensor.shape)


def _listing(names: list[str]) -> str:
    return ", ".join(names[:-1]) + " and " + names[-1]


def _shapes(a: Args, names: list[str]) -> str:
    """``"input [3, 1] and target [1, 4]"``."""
    return _listing([f"{n} {_shape(a.tensors[n])}" for n in names])


def _broadcast_shape(*shapes: torch.Size) -> torch.Size | None:
    """torch's broadcast of ``shapes``, or None where they do not broadcast."""
    if all(shape == shapes[0] for shape in shapes[1:]):  # the common case, without torch's ~40 us
        return shapes[0] if shapes else torch.Size()
    try:
        shape: torch.Size = torch.broadcast_shapes(*shapes)  # type: ignore[no-untyped-call]
    except RuntimeError:
        return None
    return shape


def _described(check: Check, text: str) -> Check:
    check.__doc__ = text
    return check


def broadcast(*names: str) -> Check:
    """The present tensors among ``names`` must broadcast together, as torch combines them, and
    their broadcast must stay within ``max_elements``."""

    def check(a: Args) -> None:
        present = [n for n in names if n in a.tensors]
        shape = _broadcast_shape(*(a.tensors[n].shape for n in present))
        if shape is not None:
            if len(present) > 1:  # a broadcast may hold far more elements than the tensors sent
                a.limit(shape.numel(), lambda: f"the broadcast of {_shapes(a, present)}")
            return
        if len(present) == 2:
            first, second = present
            a.fail(
                f"{second} has shape {_shape(a.tensors[second])}, which does not broadcast with "
                f"{first}'s {_shape(a.tensors[first])}"
            )
        a.fail(f"the shapes of {_shapes(a, present)} do not broadcast together")

    return _described(check, f"{_listing(list(names))} (those sent) broadcast together, to at most max_elements elements")


def broadcast_to(name: str, other: str) -> Check:
    """``name``, when present, must broadcast to the shape of ``other`` (torch writes into it)."""

    def check(a: Args) -> None:
        if name not in a.tensors:
            return
        shape, target = a.tensors[name].shape, a.tensors[other].shape
        if _broadcast_shape(shape, target) != target:
            a.fail(f"{name} has shape {list(shape)}, which does not broadcast to {other}'s shape {list(target)}")

    return _described(check, f"{name}, when sent, broadcasts to {other}'s shape")


def same_shape(name: str, other: str) -> Check:
    """``name``, when present, must have exactly the shape of ``other``."""

    def check(a: Args) -> None:
        if name in a.tensors and a.tensors[name].shape != a.tensors[other].shape:
            a.fail(
                f"{name} has shape {_shape(a.tensors[name])}, but must have {other}'s shape {_shape(a.tensors[other])}"
            )

    return _described(check, f"{name}, when sent, has exactly {other}'s shape")


def same_ndim(*names: str) -> Check:
    """The tensors must have the same number of dimensions (torch does not broadcast ranks here)."""

    def check(a: Args) -> None:
        dims = [a.tensors[n].dim() for n in names]
        if len(set(dims)) > 1:
            a.fail(
                f"{_listing(list(names))} must have the same number of dimensions, got "
                f"{_listing([str(d) for d in dims])}"
            )

    return _described(check, f"{_listing(list(names))} have the same number of dimensions")


def triplet(a: Args) -> None:
    """anchor, positive and negative have the same number of dimensions; anchor broadcasts with
    positive and with negative (and positive with negative when swap), to at most max_elements
    elements."""
    same_ndim("anchor", "positive", "negative")(a)
    broadcast("anchor", "positive")(a)
    broadcast("anchor", "negative")(a)
    if a.options["swap"]:
        broadcast("positive", "negative")(a)


def distance_dim(a: Args) -> None:
    """distance_function's cosine_distance.dim is a dimension of anchor: in [-D, D) for D
    dimensions (torch's message would not name the option)."""
    distance = a.options.get("distance_function")
    if isinstance(distance, CosineDistance):
        rank = max(a.tensors["anchor"].dim(), 1)
        if not -rank <= distance.dim < rank:
            a.fail(
                f"distance_function.cosine_distance.dim is {distance.dim}, but anchor has {rank} "
                f"dimensions ({-rank} to {rank - 1})"
            )


def gaussian_var(a: Args) -> None:
    """var, when a tensor, has input's shape, that shape without its last dimension, or that
    shape with one size set to 1 (torch's rule)."""
    var, input = a.tensors.get("var"), a.tensors["input"]
    if var is None or var.shape == input.shape or var.shape == input.shape[:-1]:
        return
    if var.dim() == input.dim() and sum(v for i, v in zip(input.shape, var.shape, strict=True) if i != v) == 1:
        return
    a.fail(
        f"var has shape {_shape(var)}, but must have input's shape {_shape(input)}, that shape "
        "without its last dimension, or that shape with one size set to 1"
    )


def same_dtype(*names: str) -> Check:
    """The present tensors among ``names`` must share one dtype, as torch requires."""

    def check(a: Args) -> None:
        present = [n for n in names if n in a.tensors]
        for name in present[1:]:
            if a.tensors[name].dtype != a.tensors[present[0]].dtype:
                a.fail(
                    f"{name} has dtype {_dtype(a.tensors[name])}, but {present[0]} has "
                    f"{_dtype(a.tensors[present[0]])}; they must match"
                )

    return _described(check, f"{_listing(list(names))} (those sent) have one dtype")


def _target_kind(a: Args, logits_shape: tuple[int, ...], owner_s: str) -> bool:
    """True for class probabilities; torch decides by shape: target.shape == logits' shape."""
    target = a.tensors["target"]
    probabilities = tuple(target.shape) == logits_shape
    if probabilities != target.is_floating_point():
        index_shape = [*logits_shape[:1], *logits_shape[2:]] if len(logits_shape) > 1 else []
        a.fail(
            f"target must hold class indices ({dtype_names(CLASS_INDEX)}) of shape {index_shape} "
            f"or class probabilities (floating) of {owner_s} shape {list(logits_shape)}, got "
            f"{_dtype(target)} of shape {list(target.shape)}"
        )
    return probabilities


def _class_indices(a: Args, classes: int, owner: str, ignore_index: int | None) -> None:
    """Class-index targets: in [0, classes) or ignore_index; a weight in the logits' dtype, no grad."""
    target = a.tensors["target"]
    weight = a.tensors.get("weight")
    if weight is not None:
        if weight.dtype != a.tensors["input"].dtype:
            a.fail(
                f"weight has dtype {_dtype(weight)}, but input has {_dtype(a.tensors['input'])}; "
                "they must match with class-index targets"
            )
        if "weight" in a.requires_grad:
            a.fail(
                "weight cannot require grad with class-index targets; torch differentiates it only for probabilities"
            )
    values = target if ignore_index is None else target[target.to(torch.int64) != ignore_index]
    bad = _first_outside(values, 0, classes)
    if bad is not None:
        ignored = "" if ignore_index is None else f", or ignore_index {ignore_index}"
        a.fail(f"target holds class {bad}, but {owner} has {classes} classes (0 to {classes - 1}{ignored})")


def _logits_shape_from_input(a: Args) -> tuple[int, ...] | None:
    shape = tuple(a.tensors["input"].shape)
    return shape if shape else None  # a 0-d input: torch raises its own error


def nll_loss(a: Args) -> None:
    """target holds class indices in [0, C) or ignore_index (C: input's size in dimension 1, or
    its only one); weight has input's dtype."""
    shape = _logits_shape_from_input(a)
    if shape is not None:
        _class_indices(a, shape[1] if len(shape) > 1 else shape[0], "input", a.options["ignore_index"])


def cross_entropy(a: Args) -> None:
    """target holds class indices (int64 or uint8, of input's shape without dimension 1) in [0, C)
    or ignore_index, or class probabilities (floating, of input's shape); with class indices,
    weight has input's dtype and does not require grad."""
    shape = _logits_shape_from_input(a)
    if shape is not None and not _target_kind(a, shape, "input's"):
        _class_indices(a, shape[1] if len(shape) > 1 else shape[0], "input", a.options["ignore_index"])


def linear_cross_entropy(a: Args) -> None:
    """The logits (input's rows by linear_weight's classes) stay within max_elements; target as
    for cross_entropy, with C = linear_weight's first size (ignore_index -100 when unset)."""
    input, linear_weight = a.tensors["input"], a.tensors["linear_weight"]
    if input.dim() not in (1, 2) or linear_weight.dim() < 2:
        return  # torch raises its own error
    classes = linear_weight.shape[0]
    logits_shape = (*input.shape[:-1], classes, *linear_weight.shape[1:-1])
    a.limit(math.prod(logits_shape), lambda: f"the logits {list(logits_shape)} of input and linear_weight")
    if not _target_kind(a, logits_shape, "the logits'"):
        ignore_index = a.options["ignore_index"]
        _class_indices(a, classes, "linear_weight", -100 if ignore_index is None else ignore_index)


def multi_margin_loss(a: Args) -> None:
    """weight has input's dtype; target holds class indices in [0, C), C being input's last size."""
    input = a.tensors["input"]
    classes = input.shape[-1] if input.dim() else 1
    same_dtype("input", "weight")(a)
    bad = _first_outside(a.tensors["target"], 0, classes)
    if bad is not None:
        a.fail(f"target holds class {bad}, but input has {classes} classes (0 to {classes - 1})")


def multilabel_margin_loss(a: Args) -> None:
    """target holds class indices in [0, C), or -1 to end a sample's list (C: input's last size)."""
    input = a.tensors["input"]
    classes = input.shape[-1] if input.dim() else 1
    bad = _first_outside(a.tensors["target"], -1, classes)
    if bad is not None:
        a.fail(
            f"target holds class {bad}, but input has {classes} classes "
            f"(0 to {classes - 1}, and -1 to end a sample's list)"
        )


def binary_cross_entropy(a: Args) -> None:
    """input and target have one dtype; input holds probabilities in [0, 1] (NaN is outside, as for
    torch), which torch on a GPU checks only with a device-side assert."""
    same_dtype("input", "target")(a)
    input = a.tensors["input"]
    outside = ~((input >= 0) & (input <= 1))  # NaN is outside too, as in torch's own check
    if bool(outside.any()):
        a.fail(f"input must hold probabilities in [0, 1], but holds {input[outside][0].item()}")


def ctc_loss(a: Args) -> None:
    """log_probs is (T, N, C) or (T, C); blank is in [0, C); input_lengths and target_lengths
    hold N lengths each, all >= 0, input_lengths <= T; padded targets (N, S) have N rows and
    target_lengths <= S, concatenated targets hold sum(target_lengths) labels; labels are in
    [0, C); the alignment table N x T x (2 max(target_lengths) + 1) stays within max_elements.

    torch reads lengths and labels on the device without checking them all."""
    log_probs, targets = a.tensors["log_probs"], a.tensors["targets"]
    if log_probs.dim() not in (2, 3):
        a.fail(f"log_probs must be (T, N, C) or unbatched (T, C), got shape {list(log_probs.shape)}")
    steps, classes = log_probs.shape[0], log_probs.shape[-1]
    batch = log_probs.shape[1] if log_probs.dim() == 3 else 1
    blank = a.options["blank"]
    if not 0 <= blank < classes:
        a.fail(f"blank is {blank}, but log_probs has {classes} classes (0 to {classes - 1})")
    lengths = {}
    for name in ("input_lengths", "target_lengths"):
        values = a.tensors[name].reshape(-1).to(torch.int64)
        if values.numel() != batch:
            a.fail(f"{name} holds {values.numel()} lengths, but log_probs has a batch of {batch}")
        if values.numel() and int(values.min()) < 0:
            a.fail(f"{name} holds {int(values.min())}, but lengths must be >= 0")
        lengths[name] = values
    if batch and int(lengths["input_lengths"].max()) > steps:
        a.fail(f"input_lengths holds {int(lengths['input_lengths'].max())}, but log_probs has {steps} time steps")
    target_lengths = lengths["target_lengths"]
    if targets.dim() == 2:  # padded (N, S)
        if targets.shape[0] != batch:
            a.fail(f"targets has {targets.shape[0]} rows, but log_probs has a batch of {batch}")
        width = targets.shape[1]
        if batch and int(target_lengths.max()) > width:
            a.fail(f"target_lengths holds {int(target_lengths.max())}, but padded targets have {width} columns")
        labels = targets[torch.arange(width) < target_lengths[:, None]]
    elif targets.dim() == 1:  # concatenated (sum(target_lengths))
        if int(target_lengths.sum()) != targets.numel():
            a.fail(
                f"target_lengths sums to {int(target_lengths.sum())}, but concatenated targets "
                f"hold {targets.numel()} labels"
            )
        labels = targets
    else:
        a.fail(f"targets must be padded (N, S) or concatenated (sum(target_lengths)), got shape {list(targets.shape)}")
    if batch:  # torch's alignment table
        longest = int(target_lengths.max())
        a.limit(batch * steps * (2 * longest + 1), lambda: f"the alignment table (N, T, 2 * {longest} + 1)")
    bad = _first_outside(labels, 0, classes)
    if bad is not None:
        a.fail(f"targets holds label {bad}, but log_probs has {classes} classes (0 to {classes - 1})")
