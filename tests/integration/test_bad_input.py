"""Bad input, end to end: INVALID_ARGUMENT naming the loss and the argument, never UNKNOWN.

Through the SDK, the error is ``remoteloss.InvalidArgumentError`` (also a ``ValueError``). Hand
-built requests through the raw stub cover what the SDK would never send: a missing tensor, a
data length that does not match the shape, ``DTYPE_UNSPECIFIED``, an empty request. After each
bad request the server must still answer a good one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
import remoteloss
import torch
import torch.nn.functional as F
from remoteloss._samples import RemoteOnly

from .cases import LOSS_NAMES, Call, Case, OptionSet, arg_names
from .helpers import (
    assert_invalid_argument,
    assert_rpc_invalid_argument,
    assert_server_answers,
    raw_request,
    remote,
    rpc_error,
    run,
)


def _base(loss: str, batched: bool = True, **opts: Any) -> Call:
    return Case(loss, torch.float64, batched, OptionSet("bad", opts), "mean").build()


def _t(*values: Any, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


@dataclass(frozen=True)
class Bad:
    """One bad call: what to change in a good call, and the argument the message must name."""

    loss: str
    name: str
    change: Callable[[Call], Call]
    args: tuple[str, ...]  # the message names at least one of these
    torch_raises: bool = True  # False: torch (on a CPU) does not check it, but the server must

    @property
    def id(self) -> str:
        return f"{self.loss}-{self.name}"


def _set(**values: Any) -> Callable[[Call], Call]:
    def change(call: Call) -> Call:
        return call.replace({k: (v(call) if callable(v) else v) for k, v in values.items()})

    return change


def _add(**kwargs: Any) -> Callable[[Call], Call]:
    def change(call: Call) -> Call:
        return Call(call.loss, call.args, {**call.kwargs, **kwargs}, call.arg_names)

    return change


def _as(name: str, dtype: torch.dtype) -> Callable[[Call], Call]:
    return _set(**{name: lambda c: c.tensors()[name].to(dtype)})


def _reshape(name: str, shape: tuple[int, ...]) -> Callable[[Call], Call]:
    """Replace `name` by a tensor of another shape (and the same dtype)."""

    def make(call: Call) -> torch.Tensor:
        t = call.tensors()[name]
        if t.is_floating_point():
            return torch.rand(shape, dtype=t.dtype)
        return torch.zeros(shape, dtype=t.dtype)

    return _set(**{name: make})


def _with(name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Call], Call]:
    return _set(**{name: lambda c: fn(c.tensors()[name].clone())})


def _put(index: Any, value: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(t: torch.Tensor) -> torch.Tensor:
        t[index] = value
        return t

    return fn


def _elementwise(loss: str, *, int_dtype_raises: bool = True, rank_raises: bool = False) -> list[Bad]:
    bad = [Bad(loss, "shape_mismatch", _reshape("target", (3, 5)), ("target", "input"))]
    if rank_raises:  # elsewhere torch broadcasts input up to a target of higher rank (a case in cases.py)
        bad.append(Bad(loss, "rank_mismatch", _reshape("target", (2, 3, 4)), ("target", "input")))
    if int_dtype_raises:
        bad.append(
            Bad(
                loss,
                "integer_input",
                lambda c: _as("target", torch.int64)(_as("input", torch.int64)(c)),
                ("input", "dtype"),
            )
        )
    return bad


BAD: list[Bad] = [
    # l1 / mse / huber / smooth_l1
    *_elementwise("l1_loss"),
    Bad("l1_loss", "weight_not_input_shape", _add(weight=_t(1, 2, 3, 4)), ("weight",)),
    *_elementwise("mse_loss"),
    Bad("mse_loss", "weight_not_input_shape", _add(weight=_t(1, 2, 3, 4)), ("weight",)),
    *_elementwise("huber_loss"),
    Bad("huber_loss", "delta_zero", _add(delta=0.0), ("delta",)),
    Bad("huber_loss", "weight_not_input_shape", _add(weight=_t(1, 2, 3, 4)), ("weight",)),
    *_elementwise("smooth_l1_loss"),
    Bad("smooth_l1_loss", "beta_negative", _add(beta=-1.0), ("beta",)),
    # cross_entropy
    Bad("cross_entropy", "class_out_of_range", _with("target", _put(0, 5)), ("target",)),
    Bad("cross_entropy", "class_negative", _with("target", _put(0, -1)), ("target",)),
    Bad("cross_entropy", "batch_mismatch", _reshape("target", (3,)), ("target", "input")),
    Bad("cross_entropy", "int32_target", _as("target", torch.int32), ("target",)),
    Bad("cross_entropy", "weight_size", _add(weight=_t(1, 1, 1, 1)), ("weight",)),
    Bad("cross_entropy", "label_smoothing_above_one", _add(label_smoothing=1.5), ("label_smoothing",)),
    Bad("cross_entropy", "prob_target_shape", _set(target=torch.rand(4, 4, dtype=torch.float64)), ("target",)),
    Bad("cross_entropy", "integer_input", _as("input", torch.int64), ("input",)),
    Bad(
        "cross_entropy",
        "kdim_class_out_of_range",
        lambda c: _with("target", _put((0, 1, 2), 7))(_base("cross_entropy", shape=(3, 5, 2, 3))),
        ("target",),
    ),
    # ctc_loss
    Bad("ctc_loss", "input_length_above_T", _set(input_lengths=_t(9, 7, 5, dtype=torch.int64)), ("input_lengths",)),
    Bad(
        "ctc_loss",
        "target_length_above_S",
        _set(target_lengths=_t(5, 2, 3, dtype=torch.int64)),
        ("target_lengths", "targets"),
    ),
    Bad("ctc_loss", "negative_length", _set(input_lengths=_t(8, -1, 5, dtype=torch.int64)), ("input_lengths",)),
    Bad("ctc_loss", "lengths_count", _set(input_lengths=_t(8, 7, dtype=torch.int64)), ("input_lengths",)),
    Bad("ctc_loss", "targets_batch_mismatch", _reshape("targets", (2, 4)), ("targets",)),
    Bad(
        "ctc_loss",
        "concatenated_too_short",
        lambda c: _reshape("targets", (8,))(_base("ctc_loss", concatenated=True)),
        ("targets", "target_lengths"),
    ),
    Bad("ctc_loss", "blank_out_of_range", _add(blank=5), ("blank",)),
    Bad("ctc_loss", "float_lengths", _set(input_lengths=_t(8, 7, 5)), ("input_lengths",)),
    Bad("ctc_loss", "log_probs_rank", _set(log_probs=torch.randn(8, 3, 5, 2, dtype=torch.float64)), ("log_probs",)),
    Bad("ctc_loss", "integer_log_probs", _as("log_probs", torch.int64), ("log_probs",)),
    # torch's CPU kernel reads out of bounds here without complaint; the server must range-check.
    Bad("ctc_loss", "class_out_of_range", _with("targets", _put((0, 0), 5)), ("targets",), torch_raises=False),
    # nll_loss
    Bad("nll_loss", "class_out_of_range", _with("target", _put(1, 5)), ("target",)),
    Bad("nll_loss", "batch_mismatch", _reshape("target", (3,)), ("target", "input")),
    Bad("nll_loss", "float_target", _as("target", torch.float64), ("target",)),
    Bad("nll_loss", "weight_size", _add(weight=_t(1, 1, 1, 1, 1, 1)), ("weight",)),
    Bad(
        "nll_loss",
        "weight_requires_grad",
        _add(weight=torch.ones(5, dtype=torch.float64, requires_grad=True)),
        ("weight",),
    ),
    # poisson_nll_loss
    *_elementwise("poisson_nll_loss", int_dtype_raises=False),
    Bad("poisson_nll_loss", "bad_reduction_string", _add(reduction="avg"), ("reduction",)),
    # gaussian_nll_loss
    Bad("gaussian_nll_loss", "shape_mismatch", _reshape("target", (3, 5)), ("target", "input")),
    Bad("gaussian_nll_loss", "var_size", _reshape("var", (2, 4)), ("var",)),
    Bad("gaussian_nll_loss", "var_negative", _with("var", _put((0, 0), -1.0)), ("var",)),
    Bad("gaussian_nll_loss", "var_float_negative", _set(var=-1.0), ("var",)),
    Bad(
        "gaussian_nll_loss",
        "integer_input",
        lambda c: c.replace({n: t.to(torch.int64) for n, t in c.tensors().items()}),
        ("input", "target", "var"),
    ),
    # kl_div
    Bad("kl_div", "shape_mismatch", _reshape("target", (3, 4)), ("target", "input")),
    Bad(
        "kl_div",
        "integer_input",
        lambda c: _as("target", torch.int64)(_as("input", torch.int64)(c)),
        ("input", "target"),
    ),
    Bad("kl_div", "bad_reduction_string", _add(reduction="avg"), ("reduction",)),
    # binary_cross_entropy
    Bad("binary_cross_entropy", "shape_mismatch", _reshape("target", (3, 5)), ("target", "input")),
    Bad("binary_cross_entropy", "input_above_one", _with("input", _put((0, 0), 1.5)), ("input",)),
    Bad("binary_cross_entropy", "weight_not_broadcastable", _add(weight=_t(1, 2, 3, 4, 5)), ("weight",)),
    Bad(
        "binary_cross_entropy",
        "integer_input",
        lambda c: _as("target", torch.int64)(_as("input", torch.int64)(c)),
        ("input", "target"),
    ),
    # binary_cross_entropy_with_logits
    Bad("binary_cross_entropy_with_logits", "shape_mismatch", _reshape("target", (3, 5)), ("target", "input")),
    Bad("binary_cross_entropy_with_logits", "pos_weight_size", _add(pos_weight=_t(1, 2, 3, 4, 5)), ("pos_weight",)),
    Bad(
        "binary_cross_entropy_with_logits",
        "integer_input",
        lambda c: _as("target", torch.int64)(_as("input", torch.int64)(c)),
        ("input", "target"),
    ),
    # margin_ranking_loss
    Bad("margin_ranking_loss", "shape_mismatch", _reshape("input2", (5,)), ("input2", "input1", "target")),
    Bad("margin_ranking_loss", "rank_mismatch", _reshape("input2", (6, 1)), ("input2", "input1")),
    # hinge_embedding_loss
    *_elementwise("hinge_embedding_loss"),
    # multilabel_margin_loss
    Bad("multilabel_margin_loss", "shape_mismatch", _reshape("target", (3, 4)), ("target",)),
    Bad("multilabel_margin_loss", "class_out_of_range", _with("target", _put((0, 0), 5)), ("target",)),
    Bad("multilabel_margin_loss", "class_below_minus_one", _with("target", _put((0, 0), -2)), ("target",)),
    Bad("multilabel_margin_loss", "float_target", _as("target", torch.float64), ("target",)),
    Bad("multilabel_margin_loss", "int32_target", _as("target", torch.int32), ("target",)),
    Bad(
        "multilabel_margin_loss",
        "rank_3",
        lambda c: c.replace(
            {"input": torch.rand(2, 3, 5, dtype=torch.float64), "target": torch.zeros(2, 3, 5, dtype=torch.int64)}
        ),
        ("input",),
    ),
    # soft_margin_loss
    *_elementwise("soft_margin_loss", rank_raises=True),
    # multilabel_soft_margin_loss
    *_elementwise("multilabel_soft_margin_loss"),
    Bad("multilabel_soft_margin_loss", "weight_size", _add(weight=_t(1, 2, 3, 4, 5)), ("weight",)),
    # cosine_embedding_loss
    Bad("cosine_embedding_loss", "shape_mismatch", _reshape("input2", (4, 2)), ("input2", "input1")),
    Bad("cosine_embedding_loss", "target_size", _reshape("target", (5,)), ("target",)),
    # multi_margin_loss
    Bad("multi_margin_loss", "class_out_of_range", _with("target", _put(0, 5)), ("target",)),
    Bad("multi_margin_loss", "p_three", _add(p=3), ("p",)),
    Bad("multi_margin_loss", "weight_size", _add(weight=_t(1, 1, 1, 1)), ("weight",)),
    Bad("multi_margin_loss", "batch_mismatch", _reshape("target", (3,)), ("target",)),
    Bad("multi_margin_loss", "float_target", _as("target", torch.float64), ("target",)),
    # triplet_margin_loss
    Bad("triplet_margin_loss", "shape_mismatch", _reshape("negative", (4, 2)), ("negative", "anchor")),
    Bad("triplet_margin_loss", "rank_mismatch", _reshape("negative", (3,)), ("negative", "anchor")),
    # triplet_margin_with_distance_loss
    Bad("triplet_margin_with_distance_loss", "shape_mismatch", _reshape("negative", (4, 2)), ("negative", "anchor")),
    Bad("triplet_margin_with_distance_loss", "rank_mismatch", _reshape("negative", (3,)), ("negative", "anchor")),
    Bad("triplet_margin_with_distance_loss", "margin_zero", _add(margin=0.0), ("margin",)),
    Bad("triplet_margin_with_distance_loss", "cosine_dim_out_of_range", _add(distance_function=RemoteOnly(
        lambda x, y: 1 - F.cosine_similarity(x, y, dim=2), lambda: remoteloss.CosineDistance(dim=2))),
        ("distance_function",)),
    # linear_cross_entropy
    Bad("linear_cross_entropy", "in_features_mismatch", _reshape("linear_weight", (5, 4)), ("linear_weight", "input")),
    Bad("linear_cross_entropy", "class_out_of_range", _with("target", _put(0, 5)), ("target",)),
    Bad("linear_cross_entropy", "bias_shape", _add(linear_bias=_t(1, 2, 3, 4)), ("linear_bias",)),
    Bad("linear_cross_entropy", "bias_dtype", _add(linear_bias=_t(1, 2, 3, 4, 5, dtype=torch.float32)),
        ("linear_bias",)),
    Bad("linear_cross_entropy", "batch_mismatch", _reshape("target", (5,)), ("target", "input")),
    Bad("linear_cross_entropy", "int32_target", _as("target", torch.int32), ("target",)),
    Bad(
        "linear_cross_entropy",
        "ignore_index_with_probabilities",
        lambda c: _add(ignore_index=1)(_base("linear_cross_entropy", prob=True)),
        ("ignore_index",),
    ),
    Bad(
        "linear_cross_entropy",
        "kdim_unbatched",
        lambda c: c.replace(
            {
                "input": torch.rand(3, dtype=torch.float64),
                "linear_weight": torch.rand(5, 2, 3, dtype=torch.float64),
                "target": torch.zeros(2, dtype=torch.int64),
            }
        ),
        ("input", "linear_weight"),
    ),
    Bad(
        "linear_cross_entropy",
        "options_class_out_of_range",
        lambda c: _with("target", _put(0, 5))(_add(options=torch.nn.LinearCrossEntropyOptions())(c)),
        ("target",),
    ),
    Bad(
        "linear_cross_entropy",
        "options_acc_dtype_float64_input",
        _add(options=torch.nn.LinearCrossEntropyOptions(acc_dtype=torch.float32)),
        ("acc_dtype", "options"),
    ),
    Bad(
        "linear_cross_entropy",
        "options_chunk_size_and_method",
        _add(options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=2, chunking_method="aspect_ratio")),
        ("batch_chunk_size", "chunking_method", "options"),
    ),
]


def test_every_check_has_a_bad_case() -> None:
    """Each check of the catalog rejects some case of BAD, as the SDK sends it (run here through
    the server's own LossSpec.prepare): a loss that adds a check adds its bad cases here; one built
    from existing checks is covered by theirs and by the per-loss tests below."""
    from remoteloss._request import build_request
    from remoteloss_server.errors import InvalidArgumentError
    from remoteloss_server.losses import LOSSES

    checks = {check.__code__: f"{spec.name}: {check.__qualname__}" for spec in LOSSES.values() for check in spec.checks}
    hit: set[Any] = set()
    for bad in BAD:
        call = bad.change(_base(bad.loss))
        arguments = {**dict(zip(call.arg_names, call.args, strict=True)), **call.remote_kwargs()}
        try:
            request = build_request(bad.loss, arguments)
        except (ValueError, TypeError):  # the SDK refuses it before sending (a reduction's name)
            continue
        try:
            LOSSES[bad.loss].prepare(getattr(request, bad.loss), "cpu")
        except InvalidArgumentError as exc:
            tb = exc.__traceback__
            while tb is not None:
                hit.add(tb.tb_frame.f_code)
                tb = tb.tb_next
    missing = [name for code, name in checks.items() if code not in hit]
    assert not missing, f"checks no bad case rejects: {missing}"


@pytest.mark.parametrize("bad", BAD, ids=lambda b: b.id)
def test_bad_input_through_sdk(client: Any, bad: Bad) -> None:
    call = bad.change(_base(bad.loss))

    def local() -> Any:
        out = call.local()
        if out.requires_grad:
            out.sum().backward()
        return out

    expected = run(local)
    assert (expected.error is not None) == bad.torch_raises, f"torch: {expected.error!r}"
    got = run(lambda: remote(client, call))
    assert_invalid_argument(got.error, bad.loss, bad.args)
    if got.error is not None and got.error.__cause__ is not None and isinstance(got.error.__cause__, grpc.RpcError):
        assert got.error.__cause__.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert_server_answers(client)


@pytest.mark.parametrize("loss", ["mse_loss", "cross_entropy", "ctc_loss"])
def test_bad_input_through_raw_stub(stub: Any, loss: str) -> None:
    """The same rejection at the gRPC level: status INVALID_ARGUMENT with the loss's name."""
    bad = next(b for b in BAD if b.loss == loss)
    call = bad.change(_base(loss))
    tensors = {n: t for n, t in call.tensors().items()}
    for name, value in zip(call.arg_names, call.args, strict=True):
        tensors.setdefault(name, value)
    exc = rpc_error(lambda: stub.Compute(raw_request(loss, tensors), timeout=30))
    assert_rpc_invalid_argument(exc, loss, bad.args)


# ---------------------------------------------------------------------------- hand-built requests


def _good_tensors(loss: str) -> dict[str, Any]:
    call = _base(loss)
    values = dict(zip(call.arg_names, call.args, strict=True))
    return {n: v for n, v in values.items() if v is not None}


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_raw_good_request_is_answered(stub: Any, loss: str) -> None:
    """The hand-built requests below are good apart from the one thing each breaks."""
    from remoteloss import codec

    call = _base(loss)
    response = stub.Compute(raw_request(loss, _good_tensors(loss)), timeout=30)
    expected = run(call.local).value  # kl_div's default "mean" warns
    torch.testing.assert_close(codec.decode_torch(response.loss, "loss"), expected.detach())


REQUIRED = [(loss, name) for loss in LOSS_NAMES for name in arg_names(loss)]


@pytest.mark.parametrize(("loss", "name"), REQUIRED, ids=[f"{loss}-{name}" for loss, name in REQUIRED])
def test_missing_required_tensor(stub: Any, client: Any, loss: str, name: str) -> None:
    tensors = _good_tensors(loss)
    del tensors[name]
    exc = rpc_error(lambda: stub.Compute(raw_request(loss, tensors), timeout=30))
    assert_rpc_invalid_argument(exc, loss, (name,))
    assert_server_answers(client)


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_data_length_does_not_match_shape(stub: Any, client: Any, loss: str) -> None:
    request = raw_request(loss, _good_tensors(loss))
    first = arg_names(loss)[0]
    tensor = getattr(getattr(request, loss), first)
    tensor.data = tensor.data[:-8]  # one float64 short
    exc = rpc_error(lambda: stub.Compute(request, timeout=30))
    assert_rpc_invalid_argument(exc, loss, (first,))
    assert_server_answers(client)


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_dtype_unspecified(stub: Any, client: Any, loss: str) -> None:
    from remoteloss.v1 import loss_pb2 as pb

    request = raw_request(loss, _good_tensors(loss))
    second = arg_names(loss)[1]
    getattr(getattr(request, loss), second).dtype = pb.DTYPE_UNSPECIFIED
    exc = rpc_error(lambda: stub.Compute(request, timeout=30))
    assert_rpc_invalid_argument(exc, loss, (second,))
    assert_server_answers(client)


@pytest.mark.parametrize("loss", ["mse_loss", "cross_entropy"])
def test_unknown_dtype_value(stub: Any, loss: str) -> None:
    request = raw_request(loss, _good_tensors(loss))
    getattr(request, loss).input.dtype = 99
    assert_rpc_invalid_argument(rpc_error(lambda: stub.Compute(request, timeout=30)), loss, ("input",))


def test_requires_grad_on_integer_tensor(stub: Any) -> None:
    request = raw_request("cross_entropy", _good_tensors("cross_entropy"))
    request.cross_entropy.target.requires_grad = True
    assert_rpc_invalid_argument(rpc_error(lambda: stub.Compute(request, timeout=30)), "cross_entropy", ("target",))


def test_negative_shape(stub: Any) -> None:
    request = raw_request("mse_loss", _good_tensors("mse_loss"))
    request.mse_loss.input.shape[:] = [-3, -4]
    assert_rpc_invalid_argument(rpc_error(lambda: stub.Compute(request, timeout=30)), "mse_loss", ("input",))


def test_grad_output_of_wrong_shape(stub: Any) -> None:
    from remoteloss import codec

    call = _base("mse_loss")
    tensors = _good_tensors("mse_loss")
    request = raw_request("mse_loss", tensors)
    request.mse_loss.input.requires_grad = True
    request.mse_loss.reduction = 1  # none: the loss is (3, 4)
    request.grad_output.CopyFrom(codec.encode(torch.ones(2, dtype=call.args[0].dtype)))
    assert_rpc_invalid_argument(rpc_error(lambda: stub.Compute(request, timeout=30)), "mse_loss", ("grad_output",))


def test_empty_compute_request(stub: Any, client: Any) -> None:
    from remoteloss.v1 import loss_pb2 as pb

    exc = rpc_error(lambda: stub.Compute(pb.ComputeRequest(), timeout=30))
    assert_rpc_invalid_argument(exc, None, ("loss",))
    assert_server_answers(client)


def test_unknown_loss_from_a_newer_client_is_unimplemented(channel: grpc.Channel, client: Any) -> None:
    """A loss field this server does not know (field 30 of the oneof range) arrives as an unknown
    field: UNIMPLEMENTED, not INVALID_ARGUMENT ("no loss set") and never UNKNOWN."""
    unknown_loss = bytes([(30 << 3 | 2) & 0x7F | 0x80, (30 << 3 | 2) >> 7, 0])  # field 30, length-delimited, empty
    exc = rpc_error(lambda: _raw_compute(channel)(unknown_loss, timeout=30))
    assert exc.code() == grpc.StatusCode.UNIMPLEMENTED, f"{exc.code()}: {exc.details()}"
    assert_server_answers(client)


def _raw_compute(channel: grpc.Channel) -> Any:
    from remoteloss.v1 import loss_pb2 as pb

    return channel.unary_unary(
        "/remoteloss.v1.LossService/Compute",
        request_serializer=lambda raw: raw,
        response_deserializer=pb.ComputeResponse.FromString,
    )


def test_corrupt_request_bytes_are_invalid_argument(channel: grpc.Channel, client: Any) -> None:
    """Bytes that are no ComputeRequest at all (a truncated field) are the client's fault."""
    exc = rpc_error(lambda: _raw_compute(channel)(bytes([2 << 3 | 2, 50, 1, 2]), timeout=30))
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{exc.code()}: {exc.details()}"
    assert_server_answers(client)


def test_sdk_rejects_what_cannot_be_encoded(client: Any) -> None:
    """A local codec rejection raises the same class as a server one."""
    import remoteloss

    with pytest.raises(remoteloss.InvalidArgumentError) as info:
        client.mse_loss(np.ones((2, 2), dtype=np.complex128), np.ones((2, 2)))
    assert isinstance(info.value, ValueError)
    assert "input" in str(info.value)


# ---------------------------------------------------------------------------- fuzzing

_FUZZ_DTYPES = (torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.bool)


def _tensor_fields(loss: str) -> list[str]:
    from remoteloss.v1 import loss_pb2 as pb

    descriptor = pb.ComputeRequest.DESCRIPTOR.fields_by_name[loss].message_type
    return [f.name for f in descriptor.fields if f.message_type is pb.Tensor.DESCRIPTOR]


def _fuzzed_arguments(data: Any, loss: str) -> dict[str, torch.Tensor]:
    """The tensors of a good call, each kept, dropped (if optional), re-typed or re-shaped."""
    from hypothesis import strategies as st

    good = _base(loss, weight="full", bias=True, pos_weight=True).tensors()  # every optional tensor too
    required = set(arg_names(loss))
    arguments: dict[str, torch.Tensor] = {}
    for name in _tensor_fields(loss):
        base = good.get(name)
        action = data.draw(st.sampled_from(["keep", "keep", "dtype", "shape", "drop"]), label=f"{name}: action")
        if action == "drop" and name not in required:
            continue
        if base is None:  # an optional tensor the good call leaves out: invent one
            base = torch.rand(4, dtype=torch.float64)
        shape = tuple(base.shape)
        dtype = base.dtype
        if action == "dtype":
            dtype = data.draw(st.sampled_from(_FUZZ_DTYPES), label=f"{name}: dtype")
        if action == "shape":
            shape = tuple(data.draw(st.lists(st.integers(0, 4), max_size=3), label=f"{name}: shape"))
        if dtype.is_floating_point:
            value = torch.rand(shape, dtype=torch.float64).to(dtype)
        elif dtype == torch.bool:
            value = torch.rand(shape) > 0.5
        elif base.is_floating_point():
            value = torch.randint(-1, 3, shape).to(dtype)
        else:  # integer arguments: class indices or lengths
            value = torch.randint(-1, 9, shape).to(dtype) if shape != tuple(base.shape) else base.to(dtype)
        arguments[name] = value
    return arguments


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_fuzzed_requests_never_fail_unexpectedly(client: Any, loss: str) -> None:
    """Random dtypes and shapes: the answer is torch's value or INVALID_ARGUMENT, never UNKNOWN or
    INTERNAL; and the server never computes what torch refuses."""
    import remoteloss
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(
        max_examples=40,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(data=st.data())
    def check(data: Any) -> None:
        torch.manual_seed(0)
        arguments = _fuzzed_arguments(data, loss)
        import torch.nn.functional as F

        local = run(lambda: getattr(F, loss)(**arguments))
        got = run(lambda: getattr(client, loss)(**arguments))
        if got.error is not None:
            assert isinstance(got.error, remoteloss.InvalidArgumentError), (
                f"{type(got.error).__name__}: {got.error} (torch: {local.error!r})"
            )
            assert loss in str(got.error)
            return
        assert local.error is None, f"the server computed what torch refuses: {local.error!r}"
        assert_same = torch.testing.assert_close
        assert got.value.dtype == local.value.dtype and got.value.shape == local.value.shape
        assert_same(got.value, local.value, equal_nan=True, rtol=1e-2, atol=1e-3)

    check()
    assert_server_answers(client)


# ---------------------------------------------------------------------------- empty, with a huge dimension

# Every tensor made empty, those of rank >= 2 with a huge dimension (middle sizes 1). torch answers
# such calls (often nan) or raises; the server must give torch's answer or INVALID_ARGUMENT, never
# INTERNAL: numpy cannot hold these shapes ("array is too big"), so nothing may go through it.
HUGE_EMPTY = {"0-by-2**62": (0, 2**62), "2**63-1-by-0": (2**63 - 1, 0)}


def _huge_empty(call: Call, pattern: str, requires_grad: bool) -> Call:
    first, last = HUGE_EMPTY[pattern]

    def change(value: torch.Tensor) -> torch.Tensor:
        if value.dim() == 0:
            new = value.detach().clone()
        else:
            shape = (0,) if value.dim() == 1 else (first, *[1] * (value.dim() - 2), last)
            new = torch.empty(shape, dtype=value.dtype)
        return new.requires_grad_(requires_grad and new.is_floating_point())

    return call.replace({name: change(t) for name, t in call.tensors().items()})


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["plain", "requires_grad"])
@pytest.mark.parametrize("pattern", HUGE_EMPTY)
@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_empty_tensor_with_a_huge_dimension(
    client: Any, loss: str, pattern: str, requires_grad: bool, reduction: str
) -> None:
    """torch's loss and gradients, or INVALID_ARGUMENT; the SDK decodes such an answer."""
    base = Case(loss, torch.float64, True, OptionSet("bad", {}), reduction).build()
    call = _huge_empty(base, pattern, requires_grad)

    def with_grads(fn: Callable[[], Any]) -> Any:
        for tensor in call.tensors().values():
            tensor.grad = None
        out = fn()
        if out.requires_grad:
            out.sum().backward()
        return out, {n: t.grad for n, t in call.tensors().items() if t.requires_grad}

    expected = run(lambda: with_grads(call.local))
    got = run(lambda: with_grads(lambda: remote(client, call)))
    if got.error is not None:
        assert isinstance(got.error, ValueError), f"{type(got.error).__name__}: {got.error}"  # INVALID_ARGUMENT
        assert expected.error is not None or "2**63 - 1" in str(got.error), f"torch answers; the server: {got.error}"
        return
    assert expected.error is None, f"torch raises {expected.error!r}, the server answers"
    (value, grads), (expected_value, expected_grads) = got.value, expected.value
    torch.testing.assert_close(value.detach(), expected_value.detach(), equal_nan=True)
    assert grads.keys() == expected_grads.keys()
    for name, gradient in grads.items():  # the server sends zeros where torch leaves None
        want = expected_grads[name]
        want = torch.zeros_like(call.tensors()[name]) if want is None else want
        assert gradient is not None, name
        torch.testing.assert_close(gradient, want, equal_nan=True)
