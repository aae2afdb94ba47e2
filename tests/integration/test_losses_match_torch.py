"""Every case of the table, computed remotely, equals torch.nn.functional computed here.

Forward: value, dtype, shape and the warnings torch raises. Backward: the gradient of every
tensor torch can differentiate (probed locally), through ``.backward()`` on the SDK's result,
for scalar reductions and for ``reduction="none"`` with a random incoming gradient. numpy in
gives numpy out. ``client.value_and_grad`` once per loss, and each loss under concurrent load
(so that requests share batches) once.
"""

from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch

from .cases import (
    LOSS_NAMES,
    LOW_PRECISION,
    OMIT,
    Call,
    Case,
    OptionSet,
    RemoteOnly,
    all_cases,
    cases,
    differentiable,
    tolerance,
    with_grad,
)
from .helpers import Outcome, assert_invalid_argument, assert_same_tensor, remote, run

CASES = all_cases()
RUNNABLE = [c for c in CASES if not c.torch_raises]


def _ids(case: Case) -> str:
    return case.id


def _first(loss: str, *, reduction: str = "mean", batched: bool = True) -> Case:
    if loss == "kl_div" and reduction == "mean":
        reduction = "batchmean"  # "mean" warns (tested in test_forward_matches_torch)
    for case in cases(loss):
        if (
            case.dtype == torch.float64
            and case.option_set.name == "default"
            and case.reduction == reduction
            and case.batched == batched
        ):
            return case
    raise LookupError(loss)


def _incoming_grad(case: Case, like: torch.Tensor) -> torch.Tensor | None:
    """None for a scalar loss (backward()), else a random gradient of the loss's shape and dtype."""
    if case.scalar_output:
        return None
    rng = torch.Generator().manual_seed(zlib.crc32(case.id.encode()) ^ 0x5EED)
    return torch.randn(like.shape, generator=rng, dtype=torch.float64).to(like.dtype)


# ---------------------------------------------------------------------------- forward


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_forward_matches_torch(client: Any, case: Case) -> None:
    call = case.build()
    local = run(call.local)
    got = run(lambda: remote(client, call))
    if local.error is not None:
        assert case.torch_raises, f"torch raised {local.error!r}"
        assert_invalid_argument(
            got.error, case.loss, ("input", "log_probs", "dtype", str(case.dtype).removeprefix("torch."))
        )
        return
    assert not case.torch_raises, "torch computed a case marked as raising"
    assert got.error is None, f"{type(got.error).__name__}: {got.error}"
    assert got.warnings == local.warnings, "the remote call must raise torch's warnings, no more, no less"
    assert all(issubclass(c, UserWarning) for c in got.categories)
    assert_same_tensor(got.value, local.value, case.dtype)
    assert not got.value.requires_grad  # no tensor asked for a gradient


@pytest.mark.parametrize("loss", ["mse_loss", "kl_div", "cross_entropy"])
def test_warnings_reraised_with_pytest_warns(client: Any, loss: str) -> None:
    """The deprecation and reduction warnings come back as UserWarning with torch's exact text."""
    opts = {"mse_loss": {"broadcast": True}, "kl_div": {}, "cross_entropy": {"torch": {"size_average": False}}}[loss]
    case = Case(loss, torch.float64, True, OptionSet("warns", opts), OMIT)
    call = case.build()
    with pytest.warns(UserWarning) as local_record:
        expected = call.local()
    with pytest.warns(UserWarning) as remote_record:
        actual = remote(client, call)
    assert [str(w.message) for w in remote_record][:1] == [str(w.message) for w in local_record][:1]
    assert {str(w.message) for w in remote_record} == {str(w.message) for w in local_record}
    assert_same_tensor(actual, expected, torch.float64)


# ---------------------------------------------------------------------------- backward


@pytest.mark.parametrize("case", RUNNABLE, ids=_ids)
def test_gradients_match_torch(client: Any, case: Case) -> None:
    call = case.build()
    names = differentiable(call)
    assert names, "every loss is differentiable in its first argument"

    local_call, local_leaves = with_grad(call, names)
    local = run(local_call.local)
    assert local.error is None, local.error
    incoming = _incoming_grad(case, local.value)
    local.value.backward(incoming)

    remote_call, remote_leaves = with_grad(call, names)
    got = run(lambda: remote(client, remote_call))
    assert got.error is None, f"{type(got.error).__name__}: {got.error}"
    assert got.value.requires_grad and got.value.grad_fn is not None, "the result must carry a grad_fn"
    assert_same_tensor(got.value, local.value, case.dtype)
    back = run(lambda: got.value.backward(incoming))
    assert back.error is None, f"backward: {type(back.error).__name__}: {back.error}"
    for name in names:
        expected = local_leaves[name].grad
        actual = remote_leaves[name].grad
        assert actual is not None, f"no gradient for {name}"
        assert_same_tensor(actual, expected, case.dtype, what=f"d loss / d {name}")


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_scaled_scalar_backward(client: Any, loss: str) -> None:
    """A scalar loss inside a larger graph: (2.5 * loss + loss**2).backward()."""
    case = _first(loss)
    call = case.build()
    names = differentiable(call)
    results = {}
    for side in ("local", "remote"):
        built, leaves = with_grad(call, names)
        out = built.local() if side == "local" else remote(client, built)
        (2.5 * out + out**2).backward()
        results[side] = leaves
    for name in names:
        assert_same_tensor(results["remote"][name].grad, results["local"][name].grad, case.dtype, what=f"d/d {name}")


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_value_and_grad(client: Any, loss: str) -> None:
    for reduction in ("mean", "none"):
        case = _first(loss, reduction=reduction)
        call = case.build()
        names = differentiable(call)
        local_call, leaves = with_grad(call, names)
        expected = local_call.local()
        grad_output = _incoming_grad(case, expected)
        expected_grads = torch.autograd.grad(expected, [leaves[n] for n in names], grad_outputs=grad_output)
        kwargs: dict[str, Any] = {"wrt": names}
        if grad_output is not None:
            kwargs["grad_output"] = grad_output
        value, grads = client.value_and_grad(loss, *call.args, **call.remote_kwargs(), **kwargs)
        assert_same_tensor(value, expected, case.dtype)
        assert set(grads) == set(names)
        for name, grad in zip(names, expected_grads, strict=True):
            assert_same_tensor(grads[name], grad, case.dtype, what=f"d loss / d {name} ({reduction})")


# ---------------------------------------------------------------------------- numpy


def _numpy_cases() -> list[Case]:
    """Every option set once (float64, its first reduction), plus float32 and float16 defaults."""
    chosen, seen = [], set()
    for case in RUNNABLE:
        key = (case.loss, case.option_set.name)
        if case.dtype == torch.float64 and key not in seen:
            seen.add(key)
            chosen.append(case)
        elif (
            case.dtype in (torch.float32, torch.float16)
            and case.option_set.name == "default"
            and case.reduction == "mean"
        ):
            chosen.append(case)
    return chosen


def _to_numpy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.numpy()
    return value


@pytest.mark.parametrize("case", _numpy_cases(), ids=_ids)
def test_numpy_in_numpy_out(client: Any, case: Case) -> None:
    call = case.build()
    local = run(call.local)
    assert local.error is None
    np_call = Call(
        call.loss,
        tuple(_to_numpy(a) for a in call.args),
        {k: (v if isinstance(v, RemoteOnly) else _to_numpy(v)) for k, v in call.kwargs.items()},
        call.arg_names,
    )
    got = run(lambda: remote(client, np_call))
    assert got.error is None, f"{type(got.error).__name__}: {got.error}"
    assert got.warnings == local.warnings
    assert isinstance(got.value, np.ndarray | np.generic), (
        f"numpy in must give numpy out, got {type(got.value).__name__}"
    )
    actual = np.asarray(got.value)
    expected = local.value.numpy()
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, equal_nan=True, **tolerance(case.dtype))


# ---------------------------------------------------------------------------- batching


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_concurrent_requests_match_alone(client: Any, loss: str) -> None:
    """All float64/float32 cases of one loss at once, so that the server groups them into batches."""
    chosen: list[tuple[Case, Call, Outcome]] = []
    for case in cases(loss):
        if case.dtype in LOW_PRECISION:
            continue
        call = case.build()
        local = run(call.local)
        if local.warnings or local.error is not None:
            continue  # warnings are process-wide state; keep threads away from them
        chosen.append((case, call, local))
    assert chosen

    def compute(item: tuple[Case, Call, Outcome]) -> Any:
        call = item[1]
        # No grad_output: ones of the loss's shape.
        return client.value_and_grad(loss, *call.args, **call.remote_kwargs(), wrt=differentiable(call))

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(compute, chosen))
    for (case, call, local), (value, grads) in zip(chosen, results, strict=True):
        assert_same_tensor(value, local.value, case.dtype, what=case.id)
        names = differentiable(call)
        built, leaves = with_grad(call, names)
        out = built.local()
        expected = torch.autograd.grad(out, [leaves[n] for n in names], grad_outputs=torch.ones_like(out))
        for name, grad in zip(names, expected, strict=True):
            assert_same_tensor(grads[name], grad, case.dtype, what=f"{case.id}: d/d {name}")
