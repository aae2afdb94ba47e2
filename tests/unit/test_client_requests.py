"""Python arguments -> ComputeRequest (remoteloss._request), checked without a server."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import remoteloss
from remoteloss import codec
from remoteloss._request import REDUCTIONS, build_request
from remoteloss.v1 import loss_pb2 as pb

torch.set_num_threads(1)


def _message(loss: str, **arguments: object) -> Any:
    return getattr(build_request(loss, arguments), loss)


def test_reductions_come_from_the_enum() -> None:
    assert REDUCTIONS == {
        "none": pb.REDUCTION_NONE,
        "mean": pb.REDUCTION_MEAN,
        "sum": pb.REDUCTION_SUM,
        "batchmean": pb.REDUCTION_BATCHMEAN,
    }


@pytest.mark.parametrize("reduction", ["avg", "MEAN", "", 2, None])
def test_unknown_reduction_is_rejected_locally_naming_it(reduction: object) -> None:
    if reduction is None:  # None means "not given": the field stays unset
        assert _message("mse_loss", input=[1.0], target=[1.0], reduction=None).reduction == 0
        return
    with pytest.raises(remoteloss.InvalidArgumentError, match="^mse_loss: reduction must be one of") as info:
        build_request("mse_loss", {"input": [1.0], "target": [1.0], "reduction": reduction})
    assert isinstance(info.value, ValueError)


def test_options_are_set_only_when_given() -> None:
    message = _message("cross_entropy", input=np.zeros((2, 3)), target=[0, 1], weight=None, size_average=None,
                       ignore_index=-100, reduce=False, reduction="sum", label_smoothing=0.25)
    assert message.HasField("input") and message.HasField("target") and not message.HasField("weight")
    assert not message.HasField("size_average")
    assert message.ignore_index == -100 and message.HasField("ignore_index")
    assert message.HasField("reduce") and message.reduce is False
    assert message.reduction == pb.REDUCTION_SUM and message.label_smoothing == 0.25


def test_a_loss_with_only_defaults_still_selects_its_oneof() -> None:
    assert build_request("mse_loss", {}).WhichOneof("loss") == "mse_loss"


def test_requires_grad_is_set_exactly_for_wrt() -> None:
    leaf = torch.ones(3, requires_grad=True)
    request = build_request("mse_loss", {"input": leaf, "target": torch.ones(3, requires_grad=True)}, wrt=("input",))
    assert request.mse_loss.input.requires_grad and not request.mse_loss.target.requires_grad
    assert not build_request("mse_loss", {"input": leaf}).mse_loss.input.requires_grad
    request = build_request("mse_loss", {"input": leaf}, wrt=("input",), grad_output=[[1.0, 2.0, 3.0]])
    assert codec.decode_torch(request.grad_output).tolist() == [[1.0, 2.0, 3.0]]


def test_requires_grad_on_integers_is_rejected_locally() -> None:
    with pytest.raises(remoteloss.InvalidArgumentError, match="^cross_entropy: target: requires_grad is set, but int64"):
        build_request("cross_entropy", {"input": [[0.0, 1.0]], "target": [1]}, wrt=("target",))


def test_codec_rejections_become_invalid_argument_naming_loss_and_argument() -> None:
    with pytest.raises(remoteloss.InvalidArgumentError, match="^l1_loss: target: numpy dtype complex128"):
        build_request("l1_loss", {"input": [1.0], "target": np.ones(1, complex)})


def test_scalar_types_are_checked() -> None:
    with pytest.raises(TypeError, match="^nll_loss: ignore_index must be an int, got float$"):
        build_request("nll_loss", {"ignore_index": 1.5})
    with pytest.raises(TypeError, match="^huber_loss: delta must be a float, got str$"):
        build_request("huber_loss", {"delta": "1"})
    with pytest.raises(remoteloss.InvalidArgumentError, match="^nll_loss: ignore_index: "):
        build_request("nll_loss", {"ignore_index": 2**70})
    message = _message("multi_margin_loss", p=np.int64(2), margin=np.float32(0.5))
    assert (message.p, message.margin) == (2, 0.5)
    assert _message("triplet_margin_loss", p=math.inf).p == math.inf


def test_gaussian_var_is_a_tensor_or_a_float() -> None:
    message = _message("gaussian_nll_loss", var=0.5)
    assert message.var_float == 0.5 and not message.HasField("var")
    message = _message("gaussian_nll_loss", var=torch.full((3,), 0.5))
    assert message.HasField("var") and not message.HasField("var_float")


def test_ctc_lengths_from_sequences_are_int64_and_tensors_keep_their_dtype() -> None:
    message = _message("ctc_loss", input_lengths=(5, 4), target_lengths=[3, 2])
    assert message.input_lengths.dtype == pb.DTYPE_INT64 == message.target_lengths.dtype
    assert codec.decode_numpy(message.input_lengths).tolist() == [5, 4]
    message = _message("ctc_loss", input_lengths=torch.tensor([5, 4], dtype=torch.int32), target_lengths=3)
    assert message.input_lengths.dtype == pb.DTYPE_INT32
    assert tuple(message.target_lengths.shape) == ()
    with pytest.raises(remoteloss.InvalidArgumentError, match="^ctc_loss: input_lengths: lengths must be integers"):
        build_request("ctc_loss", {"input_lengths": (5.0, 4.5)})


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        (None, None),
        (F.pairwise_distance, pb.DistanceFunction(pairwise_distance=pb.PairwiseDistance())),
        (torch.pairwise_distance, pb.DistanceFunction(pairwise_distance=pb.PairwiseDistance())),
        (torch.nn.PairwiseDistance(p=1.0, eps=1e-3, keepdim=True),
         pb.DistanceFunction(pairwise_distance=pb.PairwiseDistance(p=1.0, eps=1e-3, keepdim=True))),
        (remoteloss.PairwiseDistance(),
         pb.DistanceFunction(pairwise_distance=pb.PairwiseDistance(p=2.0, eps=1e-6, keepdim=False))),
        (remoteloss.CosineDistance(dim=0, eps=1e-4),
         pb.DistanceFunction(cosine_distance=pb.CosineDistance(dim=0, eps=1e-4))),
    ],
    ids=["none", "functional", "torch", "module", "remoteloss-pairwise", "remoteloss-cosine"],
)
def test_distance_functions(function: object, expected: pb.DistanceFunction | None) -> None:
    message = _message("triplet_margin_with_distance_loss", distance_function=function)
    assert message.HasField("distance_function") is (expected is not None)
    if expected is not None:
        assert message.distance_function == expected
        assert message.distance_function.WhichOneof("kind") == expected.WhichOneof("kind")


@pytest.mark.parametrize(
    ("function", "match"),
    [
        (torch.nn.CosineSimilarity(dim=0), r"similarity, not a distance; use remoteloss.CosineDistance\(dim=0, eps=1e-08\)"),
        (lambda x1, x2: (x1 - x2).abs(), "distance_function must be None, remoteloss.PairwiseDistance, "),
        (torch.nn.L1Loss(), "an arbitrary callable cannot be sent"),
    ],
    ids=["cosine-similarity", "lambda", "module"],
)
def test_other_callables_are_rejected(function: object, match: str) -> None:
    with pytest.raises(TypeError, match=f"^triplet_margin_with_distance_loss: .*{match}"):
        build_request("triplet_margin_with_distance_loss", {"distance_function": function})


def test_distance_classes_compute_what_they_name() -> None:
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    torch.testing.assert_close(remoteloss.PairwiseDistance(p=1.0)(x1, x2), F.pairwise_distance(x1, x2, p=1.0))
    torch.testing.assert_close(remoteloss.CosineDistance()(x1, x2), 1 - F.cosine_similarity(x1, x2))


def test_linear_cross_entropy_options() -> None:
    assert not _message("linear_cross_entropy", options=None).HasField("options")
    message = _message("linear_cross_entropy", options=torch.nn.LinearCrossEntropyOptions())
    assert message.options == pb.LinearCrossEntropyOptions(
        allow_retain_graph=False, chunking_method="auto", acc_policy="auto"
    )
    options = torch.nn.LinearCrossEntropyOptions(
        allow_retain_graph=True, batch_chunk_size=16, chunking_method=None, acc_policy="compact", acc_dtype=torch.float64
    )
    assert _message("linear_cross_entropy", options=options).options == pb.LinearCrossEntropyOptions(
        allow_retain_graph=True, batch_chunk_size=16, chunking_method="none", acc_policy="compact",
        acc_dtype=pb.DTYPE_FLOAT64,
    )
    with pytest.raises(TypeError, match="^linear_cross_entropy: options must be None or torch.nn.LinearCrossEntropyOptions"):
        build_request("linear_cross_entropy", {"options": {"acc_policy": "compact"}})
