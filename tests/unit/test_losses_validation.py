"""LossSpec.prepare: good messages become the torch call; bad ones are rejected, before any
compute, with an InvalidArgumentError that names the loss and the argument."""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from google.protobuf.message import Message

from remoteloss import codec
from remoteloss._samples import ENTRIES, Draw
from remoteloss.v1 import loss_pb2 as pb
from remoteloss_server.errors import InvalidArgumentError
from remoteloss_server.losses import LOSSES

torch.set_num_threads(1)

REDUCTIONS = {
    "none": pb.REDUCTION_NONE,
    "mean": pb.REDUCTION_MEAN,
    "sum": pb.REDUCTION_SUM,
    "batchmean": pb.REDUCTION_BATCHMEAN,
}


def message(loss: str, kwargs: dict[str, Any], requires_grad: Collection[str] = ()) -> Message:
    """The per-loss request message for ``F.<loss>(**kwargs)``."""
    msg: Message = getattr(pb, LOSSES[loss].descriptor.name)()
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            getattr(msg, name).CopyFrom(codec.encode(value, name=name, requires_grad=name in requires_grad))
        elif name == "reduction":
            msg.reduction = REDUCTIONS[value]  # type: ignore[attr-defined]
        elif name == "var":
            msg.var_float = value  # type: ignore[attr-defined]
        elif isinstance(value, Message):
            getattr(msg, name).CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg


# Each loss's sample entry, at these main-argument shapes (else (3, 4), or the entry's own where it
# takes no (3, 4)) and with every optional tensor, in float32; "loss/probabilities" adds the form
# whose target holds class probabilities.
_SHAPES = {"ctc_loss": (6, 2, 5), "margin_ranking_loss": (3,), "linear_cross_entropy": (3, 2)}
_EVERY_TENSOR = {"weight": "full", "pos_weight": True, "bias": True}


def _float32(value: Any) -> Any:
    tensor = torch.from_numpy(value) if isinstance(value, np.ndarray) else value
    return tensor.float() if tensor.is_floating_point() else tensor


def examples() -> dict[str, dict[str, Any]]:
    """Small valid arguments per loss, from its sample entry; "loss/variant" keys add a second
    form of the target."""
    found = {}
    for loss, entry in ENTRIES.items():
        variants = {loss: {}}
        if any(o.opts.get("prob") for o in entry.option_sets):
            variants[f"{loss}/probabilities"] = {"prob": True}
        for key, extra in variants.items():
            try:
                arrays = entry.make(Draw(0), _SHAPES.get(loss, (3, 4)), {**_EVERY_TENSOR, **extra})
            except ValueError:
                arrays = entry.make(Draw(0), entry.batched, {**_EVERY_TENSOR, **extra})
            found[key] = {name: _float32(value) for name, value in arrays.items()}
    return found


EXAMPLES = examples()


def loss_of(key: str) -> str:
    return key.split("/", 1)[0]


def test_examples_cover_every_loss() -> None:
    assert {loss_of(k) for k in EXAMPLES} == set(LOSSES)


@pytest.mark.parametrize("key", EXAMPLES)
def test_good_message_becomes_the_torch_call(key: str) -> None:
    loss, kwargs = loss_of(key), EXAMPLES[key]
    call = LOSSES[loss].prepare(message(loss, kwargs, requires_grad=("input",)), "cpu")
    assert call.loss == loss and inspect.unwrap(call.function) is getattr(F, loss)  # or a wrapper of it
    assert call.requires_grad == (("input",) if "input" in kwargs else ())
    assert set(call.tensors) == set(kwargs)
    for name, tensor in kwargs.items():
        assert torch.equal(call.tensors[name], tensor) and call.tensors[name].dtype == tensor.dtype
    assert call.options["reduction"] == "mean"  # REDUCTION_UNSPECIFIED: torch's default
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kl_div warns about "mean"
        torch.testing.assert_close(call(), getattr(F, loss)(**kwargs))


def test_unset_options_are_torch_defaults_and_set_ones_pass_through() -> None:
    kwargs = {**EXAMPLES["cross_entropy"], "ignore_index": 1, "label_smoothing": 0.25, "reduction": "sum"}
    call = LOSSES["cross_entropy"].prepare(message("cross_entropy", kwargs), "cpu")
    assert call.options == {
        "size_average": None,
        "ignore_index": 1,
        "reduce": None,
        "reduction": "sum",
        "label_smoothing": 0.25,
    }
    call = LOSSES["linear_cross_entropy"].prepare(
        message("linear_cross_entropy", EXAMPLES["linear_cross_entropy"]), "cpu"
    )
    assert call.options["ignore_index"] is None and call.options["options"] is None


def test_option_hooks() -> None:
    call = LOSSES["gaussian_nll_loss"].prepare(
        message("gaussian_nll_loss", {**EXAMPLES["gaussian_nll_loss"], "var": 0.5}), "cpu"
    )
    assert call.options["var"] == 0.5 and "var" not in call.tensors
    triplet = {**EXAMPLES["triplet_margin_with_distance_loss"], "swap": True}
    cosine = pb.DistanceFunction(cosine_distance=pb.CosineDistance(eps=1e-6))
    call = LOSSES["triplet_margin_with_distance_loss"].prepare(
        message("triplet_margin_with_distance_loss", {**triplet, "distance_function": cosine}), "cpu"
    )
    expected = F.triplet_margin_with_distance_loss(
        **triplet, distance_function=lambda x, y: 1 - F.cosine_similarity(x, y, dim=1, eps=1e-6)
    )
    torch.testing.assert_close(call(), expected)
    options = pb.LinearCrossEntropyOptions(chunking_method="none", batch_chunk_size=2, acc_dtype=pb.DTYPE_FLOAT64)
    call = LOSSES["linear_cross_entropy"].prepare(
        message("linear_cross_entropy", {**EXAMPLES["linear_cross_entropy"], "options": options}), "cpu"
    )
    assert call.options["options"] == torch.nn.LinearCrossEntropyOptions(
        chunking_method=None, batch_chunk_size=2, acc_dtype=torch.float64
    )


# --------------------------------------------------------------------------- bad input


@dataclass(frozen=True)
class Bad:
    key: str  # the EXAMPLES entry to start from
    name: str
    change: dict[str, Any]  # argument -> new value; None removes it
    match: str  # a regex the message must contain, after "<loss>: "
    requires_grad: tuple[str, ...] = ()
    edit: Callable[[Any], None] | None = None  # a wire-level edit of the message

    @property
    def id(self) -> str:
        return f"{self.key}-{self.name}"


def _long(*values: int) -> torch.Tensor:
    return torch.tensor(values)


def _corrupt(field: str) -> Callable[[Any], None]:
    def edit(msg: Any) -> None:
        getattr(msg, field).data = getattr(msg, field).data[:-1]

    return edit


BAD = [
    Bad("l1_loss", "missing_target", {"target": None}, r"target is required"),
    Bad(
        "l1_loss",
        "bool_input",
        {"input": torch.ones(3, 4, dtype=torch.bool)},
        r"input has dtype bool, but must be one of float16",
    ),
    Bad(
        "l1_loss",
        "target_not_broadcastable",
        {"target": torch.ones(3, 5)},
        r"target has shape \[3, 5\], which does not broadcast with input's \[3, 4\]",
    ),
    Bad(
        "mse_loss",
        "weight_shape",
        {"weight": torch.ones(4)},
        r"weight has shape \[4\], but must have input's shape \[3, 4\]",
    ),
    Bad(
        "mse_loss",
        "batchmean",
        {"reduction": "batchmean"},
        r"reduction 'batchmean' is not supported; use one of none, mean, sum",
    ),
    Bad(
        "mse_loss",
        "unknown_reduction",
        {},
        r"reduction has an unknown value 42",
        edit=lambda m: setattr(m, "reduction", 42),
    ),
    Bad("mse_loss", "truncated_data", {}, r"input: data holds 47 bytes", edit=_corrupt("input")),
    Bad("mse_loss", "dtype_unspecified", {}, r"target: dtype is unset", edit=lambda m: setattr(m.target, "dtype", 0)),
    Bad("cross_entropy", "integer_input", {"input": torch.ones(3, 4, dtype=torch.int64)}, r"input has dtype int64"),
    Bad(
        "cross_entropy",
        "class_out_of_range",
        {"target": _long(0, 4, 1)},
        r"target holds class 4, but input has 4 classes \(0 to 3, or ignore_index -100\)",
    ),
    Bad("cross_entropy", "class_negative", {"target": _long(0, -1, 1)}, r"target holds class -1"),
    Bad("cross_entropy", "int32_target", {"target": _long(0, 1, 2).int()}, r"target has dtype int32"),
    Bad(
        "cross_entropy",
        "float_target_of_index_shape",
        {"target": torch.rand(3)},
        r"target must hold class indices \(int64, uint8\) of shape \[3\] or class probabilities "
        r"\(floating\) of input's shape \[3, 4\], got float32 of shape \[3\]",
    ),
    Bad(
        "cross_entropy",
        "index_target_of_input_shape",
        {"target": torch.zeros(3, 4, dtype=torch.int64)},
        r"target must hold class indices",
    ),
    Bad(
        "cross_entropy",
        "weight_dtype",
        {"weight": torch.rand(4, dtype=torch.float64)},
        r"weight has dtype float64, but input has float32",
    ),
    Bad(
        "cross_entropy", "weight_requires_grad", {}, r"weight cannot require grad with class-index targets", ("weight",)
    ),
    Bad(
        "cross_entropy/probabilities",
        "int_input",
        {"input": torch.zeros(3, 4, dtype=torch.int32)},
        r"input has dtype int32",
    ),
    Bad("ctc_loss", "float_targets", {"targets": torch.ones(2, 2)}, r"targets has dtype float32"),
    Bad(
        "ctc_loss",
        "input_length_above_T",
        {"input_lengths": _long(7, 5)},
        r"input_lengths holds 7, but log_probs has 6 time steps",
    ),
    Bad(
        "ctc_loss",
        "negative_length",
        {"target_lengths": _long(-1, 1)},
        r"target_lengths holds -1, but lengths must be >= 0",
    ),
    Bad(
        "ctc_loss",
        "lengths_count",
        {"input_lengths": _long(6)},
        r"input_lengths holds 1 lengths, but log_probs has a batch of 2",
    ),
    Bad(
        "ctc_loss",
        "target_length_above_S",
        {"target_lengths": _long(4, 1)},
        r"target_lengths holds 4, but padded targets have 3 columns",
    ),
    Bad(
        "ctc_loss",
        "targets_rows",
        {"targets": _long(1, 2, 3).reshape(3, 1), "target_lengths": _long(1, 1)},
        r"targets has 3 rows, but log_probs has a batch of 2",
    ),
    Bad(
        "ctc_loss",
        "concatenated_sum",
        {"targets": _long(1, 2)},
        r"target_lengths sums to 5, but concatenated targets hold 2 labels",
    ),
    Bad(
        "ctc_loss",
        "label_out_of_range",
        {"targets": _long(1, 5, 3, 3, 3, 3).reshape(2, 3)},
        r"targets holds label 5, but log_probs has 5 classes \(0 to 4\)",
    ),
    Bad("ctc_loss", "blank_out_of_range", {"blank": 5}, r"blank is 5, but log_probs has 5 classes"),
    Bad(
        "ctc_loss",
        "log_probs_rank",
        {"log_probs": torch.randn(6)},
        r"log_probs must be \(T, N, C\) or unbatched \(T, C\), got shape \[6\]",
    ),
    Bad("nll_loss", "class_out_of_range", {"target": _long(0, 9, 1)}, r"target holds class 9, but input has 4 classes"),
    Bad(
        "nll_loss",
        "weight_requires_grad",
        {},
        r"weight cannot require grad; torch does not differentiate nll_loss",
        ("weight",),
    ),
    Bad("poisson_nll_loss", "missing_input", {"input": None}, r"input is required"),
    Bad(
        "gaussian_nll_loss",
        "var_and_var_float",
        {},
        r"set either var or var_float, not both",
        edit=lambda m: setattr(m, "var_float", 1.0),
    ),
    Bad("gaussian_nll_loss", "no_var", {"var": None}, r"var is required"),
    Bad(
        "gaussian_nll_loss",
        "var_shape",
        {"var": torch.ones(2, 4)},
        r"var has shape \[2, 4\], but must have input's shape \[3, 4\]",
    ),
    Bad("gaussian_nll_loss", "integer_var", {"var": torch.ones(3, 4, dtype=torch.int64)}, r"var has dtype int64"),
    Bad("kl_div", "integer_target", {"target": torch.ones(3, 4, dtype=torch.int64)}, r"target has dtype int64"),
    Bad(
        "binary_cross_entropy",
        "input_above_one",
        {"input": torch.full((3, 4), 1.5)},
        r"input must hold probabilities in \[0, 1\], but holds 1.5",
    ),
    Bad(
        "binary_cross_entropy",
        "input_nan",
        {"input": torch.full((3, 4), float("nan"))},
        r"input must hold probabilities in \[0, 1\], but holds nan",
    ),
    Bad(
        "binary_cross_entropy",
        "target_dtype",
        {"target": torch.rand(3, 4, dtype=torch.float64)},
        r"target has dtype float64, but input has float32; they must match",
    ),
    Bad(
        "binary_cross_entropy",
        "target_shape",
        {"target": torch.rand(4)},
        r"target has shape \[4\], but must have input's shape \[3, 4\]",
    ),
    Bad("binary_cross_entropy", "weight_requires_grad", {}, r"weight cannot require grad", ("weight",)),
    Bad(
        "binary_cross_entropy_with_logits",
        "pos_weight_requires_grad",
        {},
        r"pos_weight cannot require grad",
        ("pos_weight",),
    ),
    Bad(
        "binary_cross_entropy_with_logits",
        "pos_weight_shape",
        {"pos_weight": torch.ones(5)},
        r"pos_weight has shape \[5\], which does not broadcast to input's shape \[3, 4\]",
    ),
    Bad("margin_ranking_loss", "bool_input1", {"input1": torch.ones(3, dtype=torch.bool)}, r"input1 has dtype bool"),
    Bad(
        "margin_ranking_loss",
        "rank_mismatch",
        {"input2": torch.ones(3, 1)},
        r"input1, input2 and target must have the same number of dimensions, got 1, 2 and 1",
    ),
    Bad("hinge_embedding_loss", "missing_target", {"target": None}, r"target is required"),
    Bad(
        "multilabel_margin_loss",
        "class_out_of_range",
        {"target": _long(4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0).reshape(3, 4)},
        r"target holds class 4, but input has 4 classes",
    ),
    Bad(
        "multilabel_margin_loss",
        "class_below_minus_one",
        {"target": _long(-2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0).reshape(3, 4)},
        r"target holds class -2",
    ),
    Bad(
        "multilabel_margin_loss",
        "int32_target",
        {"target": torch.zeros(3, 4, dtype=torch.int32)},
        r"target has dtype int32, but must be one of int64",
    ),
    Bad("huber_loss", "integer_input", {"input": torch.ones(3, 4, dtype=torch.int64)}, r"input has dtype int64"),
    Bad("smooth_l1_loss", "missing_input", {"input": None}, r"input is required"),
    Bad(
        "soft_margin_loss",
        "target_requires_grad",
        {},
        r"target cannot require grad; torch does not differentiate soft_margin_loss",
        ("target",),
    ),
    Bad(
        "soft_margin_loss",
        "target_larger_than_input",
        {"target": torch.ones(2, 3, 4)},
        r"target has shape \[2, 3, 4\], which does not broadcast to input's shape \[3, 4\]",
    ),
    Bad(
        "multilabel_soft_margin_loss",
        "bool_target",
        {"target": torch.ones(3, 4, dtype=torch.bool)},
        r"target has dtype bool",
    ),
    Bad("cosine_embedding_loss", "missing_input2", {"input2": None}, r"input2 is required"),
    Bad(
        "multi_margin_loss",
        "class_out_of_range",
        {"target": _long(0, 4, 1)},
        r"target holds class 4, but input has 4 classes \(0 to 3\)",
    ),
    Bad(
        "multi_margin_loss",
        "weight_dtype",
        {"weight": torch.rand(4, dtype=torch.float64)},
        r"weight has dtype float64, but input has float32",
    ),
    Bad("multi_margin_loss", "weight_requires_grad", {}, r"weight cannot require grad", ("weight",)),
    Bad("triplet_margin_loss", "missing_negative", {"negative": None}, r"negative is required"),
    Bad(
        "triplet_margin_loss",
        "not_broadcastable",
        {"positive": torch.ones(3, 5)},
        r"positive has shape \[3, 5\], which does not broadcast with anchor's \[3, 4\]",
    ),
    Bad(
        "triplet_margin_with_distance_loss",
        "bool_anchor",
        {"anchor": torch.ones(3, 4, dtype=torch.bool)},
        r"anchor has dtype bool",
    ),
    Bad(
        "triplet_margin_with_distance_loss",
        "cosine_dim_out_of_range",
        {"distance_function": pb.DistanceFunction(cosine_distance=pb.CosineDistance(dim=2))},
        r"distance_function.cosine_distance.dim is 2, but anchor has 2 dimensions \(-2 to 1\)",
    ),
    Bad(
        "triplet_margin_with_distance_loss",
        "rank_mismatch",
        {"negative": torch.ones(4)},
        r"anchor, positive and negative must have the same number of dimensions, got 2, 2 and 1",
    ),
    Bad(
        "linear_cross_entropy",
        "class_out_of_range",
        {"target": _long(0, 9, 1)},
        r"target holds class 9, but linear_weight has 4 classes \(0 to 3, or ignore_index -100\)",
    ),
    Bad(
        "linear_cross_entropy",
        "bias_dtype",
        {"linear_bias": torch.rand(4, dtype=torch.float64)},
        r"linear_bias has dtype float64, but input has float32; they must match",
    ),
    Bad(
        "linear_cross_entropy",
        "chunking_method",
        {"options": pb.LinearCrossEntropyOptions(chunking_method="fastest")},
        r"options: invalid chunking_method: 'fastest'",
    ),
    Bad(
        "linear_cross_entropy",
        "acc_dtype",
        {"options": pb.LinearCrossEntropyOptions()},
        r"options.acc_dtype has an unknown value 77",
        edit=lambda m: setattr(m.options, "acc_dtype", 77),
    ),
    Bad(
        "linear_cross_entropy/probabilities",
        "int64_target_of_logits_shape",
        {"target": torch.zeros(3, 4, dtype=torch.int64)},
        r"target must hold class indices .* or class probabilities \(floating\) of the logits' shape \[3, 4\]",
    ),
]


def _checks_hit(exc: BaseException) -> set[Any]:
    """The code of each catalog check on the traceback of ``exc`` (a factory's checks share one)."""
    hit, tb = set(), exc.__traceback__
    while tb is not None:
        hit.add(tb.tb_frame.f_code)
        tb = tb.tb_next
    return hit


def test_every_check_has_a_bad_case() -> None:
    """Each check of the catalog rejects some case of BAD: a loss that adds a check adds its bad
    cases; one built from existing checks is covered by theirs and by the generic tests here."""
    checks = {check.__code__: f"{spec.name}: {check.__qualname__}" for spec in LOSSES.values() for check in spec.checks}
    hit: set[Any] = set()
    for bad in BAD:
        loss = loss_of(bad.key)
        kwargs = {**EXAMPLES[bad.key], **bad.change}
        msg = message(loss, {k: v for k, v in kwargs.items() if v is not None}, bad.requires_grad)
        if bad.edit is not None:
            bad.edit(msg)
        with pytest.raises(InvalidArgumentError) as info:
            LOSSES[loss].prepare(msg, "cpu")
        hit |= _checks_hit(info.value)
    missing = [name for code, name in checks.items() if code not in hit]
    assert not missing, f"checks no bad case rejects: {missing}"


@pytest.mark.parametrize("bad", BAD, ids=lambda b: b.id)
def test_bad_message_is_rejected_naming_loss_and_argument(bad: Bad) -> None:
    loss = loss_of(bad.key)
    kwargs = {**EXAMPLES[bad.key], **bad.change}
    msg = message(loss, {k: v for k, v in kwargs.items() if v is not None}, bad.requires_grad)
    if bad.edit is not None:
        bad.edit(msg)
    with pytest.raises(InvalidArgumentError) as info:
        LOSSES[loss].prepare(msg, "cpu")
    text = str(info.value)
    assert info.value.code == "INVALID_ARGUMENT"
    assert text.startswith(f"{loss}: ") and "\n" not in text
    assert re.search(bad.match, text), text


def test_ignore_index_is_exempt_from_the_range_check() -> None:
    kwargs = {**EXAMPLES["cross_entropy"], "target": _long(0, 200, 1), "ignore_index": 200}
    call = LOSSES["cross_entropy"].prepare(message("cross_entropy", kwargs), "cpu")
    torch.testing.assert_close(call(), F.cross_entropy(**kwargs))


def test_ctc_padding_past_target_length_is_not_checked() -> None:
    kwargs = {**EXAMPLES["ctc_loss"], "targets": _long(1, 2, 3, 4, 1, 99).reshape(2, 3)}  # 99 lies past length 2
    call = LOSSES["ctc_loss"].prepare(message("ctc_loss", kwargs), "cpu")
    torch.testing.assert_close(call(), F.ctc_loss(**kwargs))


# --------------------------------------------------------------------------- agreement with torch

ALL_DTYPES = [getattr(torch, info.name) for info in codec.DTYPES.values()]
LOW_PRECISION = (torch.float16, torch.bfloat16)
# Where the server is deliberately stricter than torch: labels that are not integers.
STRICTER = {
    ("ctc_loss", "targets"): frozenset(d for d in ALL_DTYPES if not d.is_floating_point and d != torch.bool)
    ^ frozenset(ALL_DTYPES)
}


def _torch_accepts(key: str, name: str, dtype: torch.dtype) -> bool | str:
    """Whether some call with ``name`` in ``dtype`` works: the others unchanged, or the other
    floating tensors in ``dtype`` too, or all of them in it; reductions "none" and "sum"."""
    loss, base = loss_of(key), EXAMPLES[key]
    error = ""
    for mode in range(3):
        kwargs = dict(base)
        for other, tensor in base.items():
            if other == name or (tensor.is_floating_point() and (mode == 2 or (mode == 1 and dtype.is_floating_point))):
                kwargs[other] = tensor.to(dtype)
        for reduction in ("none", "sum"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    getattr(F, loss)(**kwargs, reduction=reduction)
                return True
            except (RuntimeError, ValueError, TypeError) as exc:
                error = str(exc)
    return error


@pytest.mark.parametrize("key", EXAMPLES)
def test_dtype_sets_are_what_torch_accepts(key: str) -> None:
    """A declared dtype works in torch (or lacks only a kernel on this device); others fail."""
    spec = LOSSES[loss_of(key)]
    wrong = []
    for arg in spec.tensors:
        if arg.name not in EXAMPLES[key]:
            continue
        for dtype in ALL_DTYPES:
            accepted = _torch_accepts(key, arg.name, dtype)
            if dtype in arg.dtypes and accepted is not True:
                kernel_missing = dtype in LOW_PRECISION and "not implemented for" in str(accepted)
                combination = "cross_entropy" in key or "linear_cross_entropy" in key  # mode-dependent sets
                if not (kernel_missing or combination):
                    wrong.append(f"{arg.name} {dtype}: declared, but torch says {accepted!r}")
            if dtype not in arg.dtypes and accepted is True and dtype not in STRICTER.get((spec.name, arg.name), ()):
                wrong.append(f"{arg.name} {dtype}: torch accepts it, but it is not declared")
    assert not wrong, wrong


@pytest.mark.parametrize("key", EXAMPLES)
def test_differentiable_flags_are_what_torch_allows(key: str) -> None:
    loss, base = loss_of(key), EXAMPLES[key]
    for arg in LOSSES[loss].tensors:
        if arg.name not in base or not base[arg.name].is_floating_point():
            continue
        kwargs = {**base, arg.name: base[arg.name].clone().requires_grad_()}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                getattr(F, loss)(**kwargs)
            allowed = True
        except RuntimeError as exc:
            assert "not differentiable" in str(exc)
            allowed = False
        mode_dependent = loss in ("cross_entropy", "linear_cross_entropy") and arg.name == "weight"
        assert arg.differentiable == allowed or (mode_dependent and not allowed), arg.name


SHAPES = [(), (1,), (4,), (3,), (3, 4), (3, 1), (1, 4), (2, 3, 4)]
SHAPE_GRID = {
    "l1_loss": ("input", "target", "weight"),
    "poisson_nll_loss": ("input", "target"),
    "gaussian_nll_loss": ("input", "target", "var"),
    "binary_cross_entropy": ("input", "target", "weight"),
    "binary_cross_entropy_with_logits": ("input", "target", "pos_weight"),
    "margin_ranking_loss": ("input1", "input2", "target"),
    "soft_margin_loss": ("input", "target"),
    "multilabel_soft_margin_loss": ("input", "target", "weight"),
    "triplet_margin_loss": ("anchor", "positive", "negative"),
}


@pytest.mark.parametrize("loss", SHAPE_GRID)
def test_shape_checks_never_reject_what_torch_accepts(loss: str) -> None:
    """Over a grid of shapes: whenever a host-side shape check rejects, torch raises too."""
    g = torch.Generator().manual_seed(1)
    names = SHAPE_GRID[loss]
    grid = torch.cartesian_prod(*[torch.arange(len(SHAPES))] * len(names)).tolist()
    stricter = []
    for choice in grid:
        kwargs = dict(EXAMPLES[loss])
        for name, index in zip(names, choice, strict=True):
            kwargs[name] = torch.rand(SHAPES[index], generator=g) + 0.01
        for extra in (
            {"reduction": "none"},
            {"reduction": "mean", "swap": True} if "triplet" in loss else {"reduction": "sum"},
        ):
            try:
                LOSSES[loss].prepare(message(loss, {**kwargs, **extra}), "cpu")
                continue
            except InvalidArgumentError as exc:
                ours = str(exc)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    getattr(F, loss)(**kwargs, **extra)
                stricter.append(ours)
            except (RuntimeError, ValueError):
                pass
    assert not stricter, stricter[:5]
