"""The losses of ``torch.nn.functional``, in the order of the ``ComputeRequest.loss`` oneof.

Dtype sets follow what torch accepts for each argument (tests/unit/test_losses_validation.py checks
them against torch); ``differentiable=False`` marks arguments torch refuses to differentiate.
"""

from __future__ import annotations

import dataclasses

import torch

from remoteloss.v1 import loss_pb2 as pb
from remoteloss_server.losses import batching, checks, hooks
from remoteloss_server.losses.batching import BatchRule
from remoteloss_server.losses.spec import (
    ANY,
    CLASS_INDEX,
    FLOATING,
    INT64,
    INTEGER,
    REAL,
    Dtypes,
    LossSpec,
    Rule,
    TensorArg,
)

__all__ = ["LOSSES"]

_ANY_SHAPE = "any shape"
_AS_INPUT = "broadcastable with input"
_SAME_AS_INPUT = "the shape of input"
_TO_INPUT = "broadcastable to the shape of input"
_CLASS_WEIGHT = "(C): a weight per class"
_LOGITS = "(C), (N, C) or (N, C, d1, ..., dK)"
_INDEX_OR_PROBS = (
    "class indices (int64 or uint8): (), (N) or (N, d1, ..., dK), each in [0, C) or ignore_index; "
    "or class probabilities (floating): the shape of the logits"
)


def _input_target(
    input_dtypes: Dtypes, target_dtypes: Dtypes, *, target_shape: str = _AS_INPUT, target_differentiable: bool = True
) -> tuple[TensorArg, TensorArg]:
    return (
        TensorArg("input", input_dtypes, _ANY_SHAPE),
        TensorArg("target", target_dtypes, target_shape, differentiable=target_differentiable),
    )


def _weight(dtypes: Dtypes, shape: str = _AS_INPUT, *, differentiable: bool = True) -> TensorArg:
    return TensorArg("weight", dtypes, shape, required=False, differentiable=differentiable)


_FLOAT32_64 = frozenset({torch.float32, torch.float64})
_BROADCAST = (checks.broadcast("input", "target"),)
_REGRESSION = (*_BROADCAST, checks.same_shape("weight", "input"))
_SAME_TARGET = checks.same_shape("target", "input")

# Batch rules (see losses.batching). Arguments that broadcast against each other batch only
# with the reference's exact shape: torch's size warnings name the shapes.
_TARGET = frozenset({"target"})
# ``invariant``: which calls may be concatenated on a GPU (see BatchRule.invariant).
_ELEMENTWISE = BatchRule(same_rank=True, same_shape=_TARGET, invariant=batching.always)
_WEIGHTED = BatchRule(same_rank=True, same_shape=frozenset({"target", "weight"}), invariant=batching.always)
_CLASSES = BatchRule(unbatched_rank=1, shared=frozenset({"weight"}), mean=batching.class_mean)
_PAIRS = BatchRule(
    reference="input1", same_rank=True, same_shape=frozenset({"input2", "target"}), invariant=batching.always
)
_TRIPLETS = frozenset({"positive", "negative"})

_SPECS = (
    LossSpec(
        "l1_loss",
        "L1Loss",
        (*_input_target(REAL, REAL), _weight(ANY, _SAME_AS_INPUT)),
        checks=_REGRESSION,
        batch=dataclasses.replace(_WEIGHTED, mean=batching.weighted_mean),
    ),
    LossSpec(
        "mse_loss",
        "MSELoss",
        (*_input_target(REAL, REAL), _weight(ANY, _SAME_AS_INPUT)),
        checks=_REGRESSION,
        batch=dataclasses.replace(_WEIGHTED, mean=batching.weighted_mean),
    ),
    LossSpec(
        "cross_entropy",
        "CrossEntropyLoss",
        (
            TensorArg("input", FLOATING, f"logits: {_LOGITS}"),
            TensorArg("target", CLASS_INDEX | FLOATING, _INDEX_OR_PROBS),
            _weight(ANY, _CLASS_WEIGHT),
        ),
        checks=(checks.cross_entropy,),
        rejects=(
            Rule(
                "label_smoothing",
                "at most 1 (+inf too; torch accepts negative values and NaN)",
                {"label_smoothing": 1.5},
            ),
        ),
        batch=dataclasses.replace(_CLASSES, invariant=batching.class_indices_invariant),
    ),
    LossSpec(
        "ctc_loss",
        "CTCLoss",
        (
            # Neither the CPU nor the CUDA kernel takes half types.
            TensorArg("log_probs", _FLOAT32_64, "(T, N, C) or unbatched (T, C); log-softmax over C"),
            TensorArg("targets", INTEGER, "padded (N, S) or concatenated (sum(target_lengths)); labels in [0, C)"),
            TensorArg("input_lengths", INTEGER, "(N) or (); each in [0, T]"),
            TensorArg("target_lengths", INTEGER, "(N) or (); each <= S, or summing to len(targets)"),
        ),
        checks=(checks.ctc_loss,),
        batch=BatchRule(
            reference="log_probs",
            unbatched_rank=2,
            batch_dims={"log_probs": 1},
            padded=frozenset({"targets"}),
            mean=batching.ctc_mean,
        ),
    ),
    LossSpec(
        "nll_loss",
        "NLLLoss",
        (
            TensorArg("input", FLOATING, f"log-probabilities: {_LOGITS}"),
            TensorArg(
                "target", CLASS_INDEX, "class indices: (), (N) or (N, d1, ..., dK), each in [0, C) or ignore_index"
            ),
            _weight(FLOATING, _CLASS_WEIGHT, differentiable=False),
        ),
        checks=(checks.nll_loss,),
        batch=dataclasses.replace(_CLASSES, invariant=batching.always),  # a gather, element by element
    ),
    LossSpec("poisson_nll_loss", "PoissonNLLLoss", _input_target(ANY, ANY), checks=_BROADCAST, batch=_ELEMENTWISE),
    LossSpec(
        "gaussian_nll_loss",
        "GaussianNLLLoss",
        (
            *_input_target(REAL, REAL),
            TensorArg("var", FLOATING, "the shape of input, one dimension short, or with one size 1", required=False),
        ),
        checks=(*_BROADCAST, checks.gaussian_var),
        hooks={"var_float": hooks.var_float},
        rejects=(Rule("var_float", ">= 0, as every element of a var tensor", {"var_float": -1.0}, clear=("var",)),),
        batch=dataclasses.replace(_ELEMENTWISE, homoscedastic=frozenset({"var"})),
    ),
    LossSpec(
        "kl_div",
        "KLDivLoss",
        _input_target(FLOATING, FLOATING),
        checks=_BROADCAST,
        reductions=("none", "mean", "sum", "batchmean"),
        batch=dataclasses.replace(_ELEMENTWISE, warns=batching.kl_div_warnings),
    ),
    LossSpec(
        "binary_cross_entropy",
        "BCELoss",
        (
            *_input_target(FLOATING, FLOATING, target_shape=_SAME_AS_INPUT),
            _weight(ANY, _TO_INPUT, differentiable=False),
        ),
        checks=(_SAME_TARGET, checks.broadcast_to("weight", "input"), checks.binary_cross_entropy),
        batch=dataclasses.replace(_ELEMENTWISE, broadcast=frozenset({"weight"})),
    ),
    LossSpec(
        "binary_cross_entropy_with_logits",
        "BCEWithLogitsLoss",
        (
            *_input_target(FLOATING, FLOATING, target_shape=_SAME_AS_INPUT),
            _weight(ANY, _TO_INPUT, differentiable=False),
            TensorArg("pos_weight", REAL, f"{_TO_INPUT}, e.g. (C)", required=False, differentiable=False),
        ),
        checks=(_SAME_TARGET, checks.broadcast_to("weight", "input"), checks.broadcast_to("pos_weight", "input")),
        batch=dataclasses.replace(_ELEMENTWISE, broadcast=frozenset({"weight", "pos_weight"})),
    ),
    LossSpec(
        "margin_ranking_loss",
        "MarginRankingLoss",
        (
            TensorArg("input1", REAL, "(N) or ()"),
            TensorArg("input2", REAL, "the rank of input1, broadcastable with it"),
            TensorArg("target", REAL, "the rank of input1, broadcastable with it; values 1 or -1"),
        ),
        checks=(checks.same_ndim("input1", "input2", "target"), checks.broadcast("input1", "input2", "target")),
        batch=_PAIRS,
    ),
    LossSpec(
        "hinge_embedding_loss", "HingeEmbeddingLoss", _input_target(REAL, ANY), checks=_BROADCAST, batch=_ELEMENTWISE
    ),
    LossSpec(
        "multilabel_margin_loss",
        "MultiLabelMarginLoss",
        (
            TensorArg("input", FLOATING, "(C) or (N, C)"),
            TensorArg("target", INT64, f"{_SAME_AS_INPUT}; classes, -1 ends each list"),
        ),
        checks=(checks.multilabel_margin_loss,),
        batch=BatchRule(unbatched_rank=1, same_shape=_TARGET),
    ),
    LossSpec(
        "huber_loss",
        "HuberLoss",
        (*_input_target(FLOATING, ANY), _weight(ANY, _SAME_AS_INPUT)),
        checks=_REGRESSION,
        rejects=(Rule("delta", "> 0 (NaN too)", {"delta": 0.0}),),
        batch=_WEIGHTED,  # a weighted mean is weighted_loss.mean() here
    ),
    LossSpec(
        "smooth_l1_loss",
        "SmoothL1Loss",
        _input_target(ANY, ANY),
        checks=_BROADCAST,
        rejects=(Rule("beta", ">= 0 (NaN too)", {"beta": -0.5}),),
        batch=_ELEMENTWISE,
    ),
    LossSpec(
        "soft_margin_loss",
        "SoftMarginLoss",
        _input_target(FLOATING, ANY, target_shape=_TO_INPUT, target_differentiable=False),
        checks=(checks.broadcast_to("target", "input"),),
        batch=_ELEMENTWISE,
    ),
    LossSpec(
        "multilabel_soft_margin_loss",
        "MultiLabelSoftMarginLoss",
        (*_input_target(FLOATING, REAL), _weight(ANY, _CLASS_WEIGHT)),
        checks=(checks.broadcast("input", "target", "weight"),),
        batch=BatchRule(unbatched_rank=1, same_rank=True, same_shape=_TARGET, broadcast=frozenset({"weight"})),
    ),
    LossSpec(
        "cosine_embedding_loss",
        "CosineEmbeddingLoss",
        (
            TensorArg("input1", ANY, "(N, D) or (D)"),
            TensorArg("input2", ANY, "the shape of input1"),
            TensorArg("target", ANY, "(N) or (); values 1 or -1"),
        ),
        checks=(checks.broadcast("input1", "input2"),),
        batch=BatchRule(reference="input1", unbatched_rank=1, same_shape=frozenset({"input2"})),
    ),
    LossSpec(
        "multi_margin_loss",
        "MultiMarginLoss",
        (
            TensorArg("input", FLOATING, "(N, C) or (C)"),
            TensorArg("target", INT64, "class indices: (N) or (), each in [0, C)"),
            _weight(FLOATING, _CLASS_WEIGHT, differentiable=False),
        ),
        checks=(checks.multi_margin_loss,),
        rejects=(Rule("p", "1 or 2", {"p": 3}),),
        batch=BatchRule(unbatched_rank=1, shared=frozenset({"weight"})),
    ),
    LossSpec(
        "triplet_margin_loss",
        "TripletMarginLoss",
        (
            TensorArg("anchor", REAL, "(N, D) or (D)"),
            TensorArg("positive", REAL, "the rank of anchor, broadcastable with it"),
            TensorArg("negative", REAL, "the rank of anchor, broadcastable with it"),
        ),
        checks=(checks.triplet,),
        rejects=(Rule("margin", "> 0", {"margin": 0.0}),),
        batch=BatchRule(reference="anchor", unbatched_rank=1, same_shape=_TRIPLETS),
    ),
    LossSpec(
        "triplet_margin_with_distance_loss",
        "TripletMarginWithDistanceLoss",
        (
            TensorArg("anchor", REAL, "(N, D) or (D)"),
            TensorArg("positive", REAL, "the rank of anchor, broadcastable with it"),
            TensorArg("negative", REAL, "the rank of anchor, broadcastable with it"),
        ),
        checks=(checks.triplet, checks.distance_dim),
        hooks={"distance_function": hooks.distance_function},
        rejects=(Rule("margin", "> 0", {"margin": -1.0}),),
        batch=BatchRule(reference="anchor", unbatched_rank=1, same_shape=_TRIPLETS, alone=batching.distance_alone),
    ),
    LossSpec(
        "linear_cross_entropy",
        "LinearCrossEntropyLoss",
        (
            TensorArg("input", FLOATING, "(in_features) or (N, in_features)"),
            TensorArg("linear_weight", FLOATING, "(C, in_features) or (C, d1, ..., dK, in_features)"),
            TensorArg("target", CLASS_INDEX | FLOATING, _INDEX_OR_PROBS),
            TensorArg("linear_bias", FLOATING, "(C) or (C, d1, ..., dK)", required=False),
            _weight(ANY, _CLASS_WEIGHT),
        ),
        checks=(checks.same_dtype("input", "linear_weight", "linear_bias"), checks.linear_cross_entropy),
        hooks={"options": hooks.linear_cross_entropy_options},
        rejects=(
            Rule("label_smoothing", "at most 1 (torch accepts negative values and NaN)", {"label_smoothing": 2.0}),
            Rule("options.batch_chunk_size", "> 0", {"options": {"batch_chunk_size": 0}}),
            Rule("options.chunking_method", "one of torch's method names", {"options": {"chunking_method": "fastest"}}),
            Rule("options.acc_policy", "one of torch's policy names", {"options": {"acc_policy": "exact"}}),
            Rule("options.acc_dtype", "a floating dtype", {"options": {"acc_dtype": "DTYPE_INT64"}}),
        ),
        batch=dataclasses.replace(
            _CLASSES,
            shared=frozenset({"linear_weight", "linear_bias", "weight"}),
            alone=batching.linear_cross_entropy_alone,
        ),
    ),
)

LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in _SPECS}

if list(LOSSES) != [f.name for f in pb.ComputeRequest.DESCRIPTOR.oneofs_by_name["loss"].fields]:
    raise TypeError("LOSSES must hold one spec per ComputeRequest.loss field, in proto order")
