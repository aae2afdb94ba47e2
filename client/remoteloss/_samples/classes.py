"""Sample entries of the class losses: logits (or log-probabilities) and class indices in range."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from remoteloss._samples.base import Array, Draw, Entry, Options, Shape, class_layout, options, t, torch_options

__all__ = ["ENTRIES"]

_CLASS_INDEX_IGNORED = -100  # torch's ignore_index default (and what None means for class indices)


def _index_target(d: Draw, shape: Shape, c: int, opts: Mapping[str, Any]) -> Array:
    """Class indices; hints: "all_ignored" (every one is ignore_index), "some_ignored" (the first
    one is, and some other one is not)."""
    ignore = opts.get("torch", {}).get("ignore_index", _CLASS_INDEX_IGNORED)
    if opts.get("all_ignored"):
        return np.full(shape, ignore, dtype=np.int64)
    target = d.classes(shape, c)
    flat = target.reshape(-1)
    if opts.get("some_ignored") and flat.size > 1:
        flat[0] = ignore
        if (flat[1:] == ignore).all():
            flat[1] = (ignore + 1) % c if 0 <= ignore < c else 0
    return flat.reshape(shape)


def _class_weight(d: Draw, c: int, opts: Mapping[str, Any]) -> dict[str, Any]:
    return {"weight": d.uniform(c, lo=0.2, hi=2.0)} if opts.get("weight") else {}


def cross_entropy(d: Draw, s: Shape, opts: Mapping[str, Any]) -> dict[str, Any]:
    """Logits of shape ``s``; class indices, or probabilities ("prob")."""
    c, target_shape = class_layout("cross_entropy", s)
    x = d.randn(*s)
    y = d.softmax(*s, dim=min(1, len(s) - 1)) if opts.get("prob") else _index_target(d, target_shape, c, opts)
    return {"input": x, "target": y} | _class_weight(d, c, opts) | torch_options(opts)


def nll_loss(d: Draw, s: Shape, opts: Mapping[str, Any]) -> dict[str, Any]:
    c, target_shape = class_layout("nll_loss", s)
    x = d.log_softmax(*s, dim=min(1, len(s) - 1))
    y = _index_target(d, target_shape, c, opts)
    return {"input": x, "target": y} | _class_weight(d, c, opts) | torch_options(opts)


def multi_margin_loss(d: Draw, s: Shape, opts: Mapping[str, Any]) -> dict[str, Any]:
    c, target_shape = class_layout("multi_margin_loss", s)
    y = d.classes(target_shape, c)
    return {"input": d.randn(*s), "target": y} | _class_weight(d, c, opts) | torch_options(opts)


def _lengths(values: list[int], kind: str, dtype: str, batched: bool) -> Any:
    if kind == "tuple":
        return tuple(values)
    if kind == "list":
        return list(values)
    return np.array(values if batched else values[0], dtype=dtype)  # unbatched: 0-d


def ctc_loss(d: Draw, s: Shape, opts: Mapping[str, Any]) -> dict[str, Any]:
    """log_probs (T, N, C) or (T, C); padded (N, S), concatenated or unbatched targets. Hints:
    "impossible" (a sample too short for its repeated labels), "concatenated", "lengths" ("tuple",
    "list" or "tensor"), "int_dtype"."""
    if len(s) not in (2, 3) or s[-1] < 2:
        raise ValueError(f"ctc_loss: shape must be (T, N, C) or (T, C) with C >= 2, got {list(s)}")
    steps, c = s[0], s[-1]
    longest = max(1, steps // 2)
    blank = opts.get("torch", {}).get("blank", 0)
    low, high = (0, c - 1) if blank == c - 1 else (1, c)
    dtype, kind = opts.get("int_dtype", "int64"), opts.get("lengths", "tensor")
    impossible = opts.get("impossible")
    if len(s) == 3:
        n = s[1]
        inputs = [max(1, steps - (0, 1, 3)[i % 3]) for i in range(n)]
        lengths = [min((longest, 2, 3)[i % 3], longest, (inputs[i] + 1) // 2) for i in range(n)]
        if impossible:  # sample 1 needs 2 * 4 - 1 = 7 frames for 4 repeated labels, but gets only 5
            inputs[1], lengths[1] = 5, longest
        targets = d.classes((n, longest), high, low, dtype=dtype)
        if impossible:
            targets[1] = low  # the same label repeated: needs a blank between repeats
        if opts.get("concatenated"):
            targets = np.concatenate([targets[i, : lengths[i]] for i in range(n)])
    else:
        inputs = [max(1, steps - 1)]
        lengths = [min(3, longest, (inputs[0] + 1) // 2)]
        if impossible:  # 4 repeated labels need 7 frames
            inputs, lengths = [4], [longest]
        targets = d.classes((lengths[0],), high, low, dtype=dtype)  # (S): exactly the target
        if impossible:
            targets[:] = low
    return {
        "log_probs": d.log_softmax(*s, dim=len(s) - 1),
        "targets": targets,
        "input_lengths": _lengths(inputs, kind, dtype, len(s) == 3),
        "target_lengths": _lengths(lengths, kind, dtype, len(s) == 3),
    } | torch_options(opts)


def multilabel_margin_loss(d: Draw, s: Shape, opts: Mapping[str, Any]) -> dict[str, Any]:
    """(N, C) or (C); each row's labels end at the first -1. Hints: "labels" ("padded", "full",
    "empty": how many labels each row has), "garbage_after_pad" (a label after the -1)."""
    if len(s) not in (1, 2):
        raise ValueError(f"multilabel_margin_loss: shape must be (N, C) or (C), got {list(s)}")
    rows, c = (s[0] if len(s) == 2 else 1), s[-1]
    counts = {"padded": (2, 1, 4), "full": (c, c, c), "empty": (0, 2, 0)}[opts.get("labels", "padded")]
    target = np.full((rows, c), -1, dtype=np.int64)
    for r in range(rows):
        k = min(counts[r % 3], c)
        target[r, :k] = d.perm(c)[:k]
        if opts.get("garbage_after_pad") and k < c - 1:
            target[r, k + 1] = 0  # after the first -1 everything is ignored
    return {"input": d.randn(*s), "target": target.reshape(s)} | torch_options(opts)


def multilabel_soft_margin_loss(d: Draw, s: Shape, opts: Mapping[str, Any]) -> dict[str, Any]:
    out = {"input": d.randn(*s), "target": d.bits(*s)}
    if opts.get("weight"):
        out["weight"] = d.uniform(s[-1], lo=0.2, hi=2.0)
    return out | torch_options(opts)


def linear_cross_entropy(d: Draw, s: Shape, opts: Mapping[str, Any]) -> dict[str, Any]:
    """input (N, F) or (F); a linear layer of C = F + 2 classes, (C, F), or (C, 2, F) with "kdim". Hints:
    "prob", "bias", "weight", "some_ignored", "options" (LinearCrossEntropyOptions' arguments;
    torch is imported for them)."""
    if len(s) not in (1, 2):
        raise ValueError(f"linear_cross_entropy: shape must be (N, F) or (F), got {list(s)}")
    features = s[-1]
    c = features + 2  # a weight that is not square
    batch, out = s[:-1], ((2,) if opts.get("kdim") else ())
    kwargs = torch_options(opts)
    args = {"input": d.randn(*s), "linear_weight": d.scaled(c, *out, features, fan_in=features)}
    if opts.get("prob"):
        args["target"] = d.softmax(*batch, c, *out, dim=len(batch))
    else:
        y = d.classes((*batch, *out), c)
        ignore = kwargs.get("ignore_index")
        if opts.get("some_ignored") and y.size > 2:
            y.reshape(-1)[[0, 2]] = _CLASS_INDEX_IGNORED if ignore is None else ignore
        args["target"] = y
    if opts.get("bias"):
        kwargs["linear_bias"] = d.randn(c, *out)
    kwargs |= _class_weight(d, c, opts)
    if "options" in opts:
        kwargs["options"] = _linear_cross_entropy_options(opts["options"])
    return args | kwargs


def _linear_cross_entropy_options(given: Mapping[str, Any]) -> Any:
    import torch  # only option sets that test the options need it

    resolved = {k: getattr(torch, v) if k == "acc_dtype" else v for k, v in given.items()}
    return torch.nn.LinearCrossEntropyOptions(**resolved)


_SOME_IGNORED = {"some_ignored": True, "weight": True}
# The option sets cross_entropy and nll_loss share: class weights, and targets torch ignores.
_CLASS_WEIGHTS_AND_IGNORED = (
    Options("weight", {"weight": True}),
    Options("ignore_default", {"some_ignored": True}, batched=(True,)),
    Options("ignore_index", {**t(ignore_index=1), "some_ignored": True}),
    Options("weight_ignore", {**t(ignore_index=2), **_SOME_IGNORED}),
)

ENTRIES = (
    Entry(
        "cross_entropy",
        cross_entropy,
        (4, 5),
        (5,),
        options(
            *_CLASS_WEIGHTS_AND_IGNORED,
            Options("label_smoothing", t(label_smoothing=0.2)),
            Options("smoothing_weight_ignore", {**t(label_smoothing=0.3, ignore_index=0), **_SOME_IGNORED},
                    batched=(True,)),
            Options("all_ignored", {**t(ignore_index=3), "all_ignored": True}, batched=(True,)),
            Options("prob", {"prob": True}),
            Options("prob_weight", {"prob": True, "weight": True}),
            Options("prob_smoothing", {**t(label_smoothing=0.1), "prob": True}),
            Options("prob_weight_smoothing", {**t(label_smoothing=0.25), "prob": True, "weight": True}),
            Options("kdim", {"shape": (3, 5, 2, 3)}, batched=(True,)),
            Options("kdim_weight_ignore", {**t(ignore_index=4, label_smoothing=0.1), "shape": (3, 5, 2, 3),
                                           **_SOME_IGNORED}, batched=(True,)),
            Options("kdim_prob_weight", {"shape": (3, 5, 2, 3), "prob": True, "weight": True}, batched=(True,)),
        ),
    ),
    Entry(
        "ctc_loss",
        ctc_loss,
        (8, 3, 5),
        (8, 5),
        options(
            Options("lengths_tuple", {"lengths": "tuple"}),
            Options("lengths_list", {"lengths": "list"}, batched=(True,)),
            Options("concatenated", {"concatenated": True}, batched=(True,)),
            Options("concatenated_tuple", {"concatenated": True, "lengths": "tuple"}, batched=(True,)),
            Options("int32", {"int_dtype": "int32"}),
            Options("int32_concatenated", {"int_dtype": "int32", "concatenated": True}, batched=(True,)),
            Options("blank_last", t(blank=4)),
            Options("impossible", {"impossible": True}),
            Options("zero_infinity", {**t(zero_infinity=True), "impossible": True}),
            Options("zero_infinity_possible", t(zero_infinity=True), batched=(True,)),
            deprecated=False,
        ),
    ),
    Entry(
        "nll_loss",
        nll_loss,
        (4, 5),
        (5,),
        options(
            *_CLASS_WEIGHTS_AND_IGNORED,
            Options("all_ignored", {**t(ignore_index=3), "all_ignored": True}, batched=(True,)),
            Options("kdim", {"shape": (3, 5, 2, 3)}, batched=(True,)),
            Options("kdim_weight_ignore", {**t(ignore_index=0), "shape": (3, 5, 2, 3), **_SOME_IGNORED},
                    batched=(True,)),
        ),
    ),
    Entry(
        "multilabel_margin_loss",
        multilabel_margin_loss,
        (3, 5),
        (5,),
        options(
            Options("all_labels", {"labels": "full"}, batched=(True,)),
            Options("some_empty", {"labels": "empty"}, batched=(True,)),
            Options("after_padding", {"garbage_after_pad": True}),
        ),
    ),
    Entry(
        "multilabel_soft_margin_loss",
        multilabel_soft_margin_loss,
        (3, 4),
        (4,),
        options(Options("weight", {"weight": True})),
    ),
    Entry(
        "multi_margin_loss",
        multi_margin_loss,
        (4, 5),
        (5,),
        options(
            Options("p2", t(p=2)),
            Options("margin", t(margin=0.5)),
            Options("weight", {"weight": True}),
            Options("p2_margin_weight", {**t(p=2, margin=2.0), "weight": True}),
        ),
    ),
    Entry(
        "linear_cross_entropy",
        linear_cross_entropy,
        (6, 3),
        (3,),
        options(
            Options("bias", {"bias": True}),
            Options("weight", {"weight": True}),
            Options("ignore_default", {"some_ignored": True}, batched=(True,)),
            Options("ignore_none", {**t(ignore_index=None), "some_ignored": True}, batched=(True,)),
            Options("ignore_index", {**t(ignore_index=1), **_SOME_IGNORED}, batched=(True,)),
            Options("label_smoothing", {**t(label_smoothing=0.2), "bias": True}),
            Options("prob", {"prob": True}),
            Options(
                "prob_bias_weight_smoothing", {**t(label_smoothing=0.1), "prob": True, "bias": True, "weight": True}
            ),
            Options("kdim", {"kdim": True, "bias": True}, batched=(True,)),
            Options("kdim_prob", {"kdim": True, "prob": True}, batched=(True,)),
            Options("options_default", {"options": {}}),
            Options("options_bias_weight_ignore", {"options": {}, "bias": True, **_SOME_IGNORED}, batched=(True,)),
            Options("options_chunk_size", {"options": {"batch_chunk_size": 2, "chunking_method": None}, "bias": True}),
            Options("options_chunk_size_auto", {"options": {"batch_chunk_size": 4}}, batched=(True,)),
            Options("options_aspect_ratio", {"options": {"chunking_method": "aspect_ratio:2"}}, batched=(True,)),
            Options("options_accurate", {"options": {"acc_policy": "accurate"}}, batched=(True,)),
            Options("options_balanced", {"options": {"acc_policy": "balanced"}, "weight": True}, batched=(True,)),
            Options("options_compact", {"options": {"acc_policy": "compact", "allow_retain_graph": True}},
                    batched=(True,)),
            Options("options_smoothing_fallback", {**t(label_smoothing=0.1), "options": {}}),
            Options("options_prob_fallback", {"options": {}, "prob": True}, batched=(True,)),
            Options("options_kdim_fallback", {"options": {}, "kdim": True}, batched=(True,)),
            Options("options_low_precision", {"options": {}, "bias": True}, batched=(True,),
                    dtypes=("float16", "bfloat16")),
            Options("options_acc_dtype", {"options": {"acc_dtype": "float32", "acc_policy": "balanced"}},
                    batched=(True,), dtypes=("float16", "bfloat16")),
            deprecated=False,
        ),
    ),
)
