"""Batch rules and ``Executor.run_batch``: calls of different sizes in one batch answer exactly
as each would alone, for the reductions that need more than a mean (weights, ignore_index,
label smoothing, CTC lengths, batchmean, size_average/reduce); fallbacks; out of memory.

The concatenated route is a GPU's; it is tested here on the CPU (whose own batches compute each
call as alone: tests/integration/test_batch_invariance.py). Every loss and option set is also
batched end to end in tests/integration/test_batching.py.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import remoteloss
from remoteloss import codec
from remoteloss._request import build_request
from remoteloss_server.errors import InvalidArgumentError, ResourceExhaustedError
from remoteloss_server.executor import Executor, Job, Result
from remoteloss_server.losses import LOSSES
from remoteloss_server.losses.batching import BATCHED, PADDED, RAGGED, SHARED

torch.set_num_threads(1)
EXECUTOR = Executor("cpu", torch_threads=1, concatenate=True)  # a GPU's route, on the CPU
G = torch.Generator().manual_seed(7)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=G, dtype=torch.float64)


def job(loss: str, wrt: tuple[str, ...] = (), grad_output: Any = None, **arguments: Any) -> Job:
    request = build_request(loss, arguments, wrt=wrt, grad_output=grad_output)
    call = LOSSES[loss].prepare(getattr(request, loss), "cpu")
    incoming = codec.decode_torch(request.grad_output, "g") if request.HasField("grad_output") else None
    rule = LOSSES[loss].batch
    assert rule is not None
    return Job(call, incoming, rule.plan(call))


def expected(loss: str, wrt: tuple[str, ...], grad_output: Any, **arguments: Any) -> tuple[Any, ...]:
    leaves = {n: arguments[n].detach().clone().requires_grad_() for n in wrt}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = getattr(F, loss)(**{**arguments, **leaves})
    grads = {}
    if wrt:
        seed = torch.ones_like(out) if grad_output is None else grad_output.expand(out.shape)
        found = torch.autograd.grad(out, [leaves[n] for n in wrt], seed, allow_unused=True)
        grads = {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(wrt, found, strict=True)}
    return out.detach(), grads, [str(w.message) for w in caught]


def check_batch(loss: str, calls: list[dict[str, Any]], wrt: tuple[str, ...] = ()) -> list[Result]:
    """Batch ``calls`` (keyword arguments of F.<loss>, plus an optional "grad_output"); each must
    get torch's answer, and all must have shared one batch."""
    jobs, wanted = [], []
    for arguments in calls:
        arguments = dict(arguments)
        grad_output = arguments.pop("grad_output", None)
        jobs.append(job(loss, wrt, grad_output, **arguments))
        wanted.append(expected(loss, wrt, grad_output, **arguments))
    assert all(j.plan is not None for j in jobs), "every call should be batchable"
    assert len({j.plan.key for j in jobs if j.plan is not None}) == 1, "the calls should share a key"
    results = EXECUTOR._batched(jobs)
    assert results is not None, "the batch fell back to computing alone"
    for result, (loss_value, grads, texts) in zip(results, wanted, strict=True):
        assert isinstance(result, Result), result
        assert result.loss.shape == loss_value.shape and result.loss.dtype == loss_value.dtype
        torch.testing.assert_close(result.loss, loss_value, equal_nan=True)
        assert result.warnings == texts
        for name, grad in grads.items():
            torch.testing.assert_close(result.gradients[name], grad, equal_nan=True)
    return [r for r in results if isinstance(r, Result)]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_weights_ignore_index_and_smoothing_per_call(reduction: str) -> None:
    weight = torch.rand(5, generator=G, dtype=torch.float64) + 0.2
    options = {"weight": weight, "ignore_index": 2, "label_smoothing": 0.3, "reduction": reduction}
    calls = [
        {"input": randn(5), "target": torch.tensor(2), **options},  # unbatched, ignored: NaN for "mean"
        {"input": randn(3, 5), "target": torch.tensor([2, 0, 4]), **options},
        {"input": randn(6, 5), "target": torch.tensor([1, 2, 3, 4, 0, 1]), **options},
    ]
    if reduction != "none":
        calls[1]["grad_output"] = torch.tensor(2.5, dtype=torch.float64)
    check_batch("cross_entropy", calls, wrt=("input",))


def test_probabilities_and_k_dimensional_cross_entropy() -> None:
    weight = torch.rand(4, generator=G, dtype=torch.float64) + 0.2
    calls = [
        {"input": randn(n, 4, 2), "target": randn(n, 4, 2).softmax(1), "weight": weight, "label_smoothing": 0.1}
        for n in (1, 3)
    ]
    check_batch("cross_entropy", calls, wrt=("input", "target"))


def test_nll_loss_all_ignored_in_one_call_only() -> None:
    calls = [
        {"input": randn(2, 3).log_softmax(1), "target": torch.tensor([1, 1]), "ignore_index": 1},
        {"input": randn(3, 3).log_softmax(1), "target": torch.tensor([0, 1, 2]), "ignore_index": 1},
    ]
    first, second = check_batch("nll_loss", calls, wrt=("input",))
    assert first.loss.isnan() and not second.loss.isnan()


def test_ctc_padded_targets_of_different_widths_and_lengths() -> None:
    def ctc(n: int, width: int, lengths: list[int], reduction: str) -> dict[str, Any]:
        return {
            "log_probs": randn(10, n, 5).log_softmax(2),
            "targets": torch.randint(1, 5, (n, width), generator=G),
            "input_lengths": torch.tensor([10 - i for i in range(n)]),
            "target_lengths": torch.tensor(lengths),
            "reduction": reduction,
        }

    calls = [ctc(2, 2, [2, 0], "mean"), ctc(3, 4, [4, 1, 3], "none"), ctc(1, 3, [3], "sum")]
    unbatched = {
        "log_probs": randn(10, 5).log_softmax(1),
        "targets": torch.tensor([1, 2, 2]),
        "input_lengths": torch.tensor(9),
        "target_lengths": torch.tensor(3),
        "reduction": "mean",
    }
    check_batch("ctc_loss", [*calls, unbatched], wrt=("log_probs",))
    assert job("ctc_loss", **calls[1]).plan.roles["targets"] == PADDED  # type: ignore[union-attr]


def test_ctc_concatenated_targets() -> None:
    def ctc(lengths: list[int]) -> dict[str, Any]:
        n = len(lengths)
        return {
            "log_probs": randn(9, n, 4).log_softmax(2),
            "targets": torch.randint(1, 4, (sum(lengths),), generator=G),
            "input_lengths": torch.full((n,), 9),
            "target_lengths": torch.tensor(lengths),
            "zero_infinity": True,
        }

    check_batch("ctc_loss", [ctc([3, 1]), ctc([2, 4, 0])], wrt=("log_probs",))
    assert job("ctc_loss", **ctc([1])).plan.roles["targets"] == RAGGED  # type: ignore[union-attr]


@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_kl_div_divides_by_each_calls_batch_size(reduction: str) -> None:
    calls = [
        {"input": randn(n, 4).log_softmax(1), "target": randn(n, 4).softmax(1), "reduction": reduction}
        for n in (1, 2, 5)
    ]
    results = check_batch("kl_div", calls, wrt=("input", "target"))
    assert bool(results[0].warnings) == (reduction == "mean")  # torch's words, from torch


@pytest.mark.parametrize("legacy", [{"size_average": False}, {"reduce": False}, {"size_average": True, "reduce": True}])
def test_size_average_and_reduce_resolve_with_torchs_warning(legacy: dict[str, bool]) -> None:
    calls = [{"input": randn(n, 3), "target": randn(n, 3), **legacy} for n in (2, 4)]
    results = check_batch("mse_loss", calls, wrt=("input",))
    assert results[0].warnings and "size_average and reduce args will be deprecated" in results[0].warnings[0]
    kl = job("kl_div", input=randn(2, 3), target=randn(2, 3).softmax(1), size_average=False, reduction="batchmean")
    assert kl.plan is None  # torch divides the legacy reduction by the batch size as well


@pytest.mark.parametrize("var", ["same", "short", "one"])
def test_gaussian_var_shapes(var: str) -> None:
    def gaussian(n: int) -> dict[str, Any]:
        shape = {"same": (n, 3), "short": (n,), "one": (n, 1)}[var]
        return {"input": randn(n, 3), "target": randn(n, 3), "var": randn(*shape).abs() + 0.1, "full": True}

    check_batch("gaussian_nll_loss", [gaussian(2), gaussian(3)], wrt=("input", "var"))


def test_shared_tensors_are_part_of_the_key() -> None:
    weight = torch.rand(3, generator=G, dtype=torch.float64)
    base = {"input": randn(2, 3), "target": torch.tensor([0, 2]), "weight": weight}
    same = job("cross_entropy", **{**base, "input": randn(4, 3), "target": torch.tensor([1, 1, 0, 2])})
    first = job("cross_entropy", **base)
    other = job("cross_entropy", **{**base, "weight": weight + 1})
    assert first.plan is not None and same.plan is not None and other.plan is not None
    assert first.plan.roles == {"input": BATCHED, "target": BATCHED, "weight": SHARED}
    assert first.plan.key == same.plan.key != other.plan.key
    probabilities = {"input": randn(2, 3), "target": randn(2, 3).softmax(1), "weight": weight}
    assert job("cross_entropy", ("input",), **probabilities).plan is not None
    assert job("cross_entropy", ("input", "weight"), **probabilities).plan is None  # its own gradient


def test_reduction_is_not_part_of_the_key_but_options_are() -> None:
    def key(**options: Any) -> Any:
        plan = job("huber_loss", input=randn(2, 3), target=randn(2, 3), **options).plan
        assert plan is not None
        return plan.key

    assert key(reduction="sum") == key(reduction="none") == key(delta=1.0)
    assert key(delta=0.5) != key(delta=1.0)
    assert key() != job("huber_loss", ("input",), input=randn(2, 3), target=randn(2, 3)).plan.key  # type: ignore[union-attr]


def test_calls_that_run_alone() -> None:
    assert job("mse_loss", input=randn(3, 4), target=randn(4)).plan is None  # torch's size warning names shapes
    assert job("l1_loss", input=randn(3, 4), target=randn(2, 3, 4)).plan is None
    unbatched = {"anchor": randn(3), "positive": randn(3), "negative": randn(3)}
    assert job("triplet_margin_with_distance_loss", **unbatched, margin=0.0).plan is None  # torch raises
    # A cosine distance over dim 0 of an unbatched call would mix the samples of a batch.
    dim0 = remoteloss.CosineDistance(dim=0)
    assert job("triplet_margin_with_distance_loss", **unbatched, distance_function=dim0).plan is None
    batched = {name: randn(2, 3) for name in unbatched}
    dim1 = remoteloss.CosineDistance(dim=1)
    assert job("triplet_margin_with_distance_loss", **batched, distance_function=dim1).plan is not None
    assert job("triplet_margin_with_distance_loss", **batched, distance_function=dim0).plan is None
    lce = {"input": randn(2, 3), "linear_weight": randn(4, 3), "target": torch.tensor([0, 3])}
    assert job("linear_cross_entropy", ("input",), **lce).plan is not None
    assert job("linear_cross_entropy", ("input", "linear_weight"), **lce).plan is None  # its own gradient
    ignored = torch.nn.LinearCrossEntropyOptions()  # torch ignores options with label smoothing, and warns
    assert job("linear_cross_entropy", **lce, options=ignored).plan is not None
    assert job("linear_cross_entropy", **lce, options=ignored, label_smoothing=0.1).plan is None


def test_a_batch_torch_rejects_falls_back_to_each_call_alone() -> None:
    good = {"input": randn(2, 3), "target": randn(2, 3), "var": randn(2, 3).abs()}
    bad = {**good, "var": -randn(2, 3).abs() - 0.1}
    jobs = [job("gaussian_nll_loss", **good), job("gaussian_nll_loss", **bad)]
    assert jobs[0].plan is not None and jobs[1].plan is not None and jobs[0].plan.key == jobs[1].plan.key
    first, second = EXECUTOR.run_batch(jobs)
    assert isinstance(first, Result) and isinstance(second, InvalidArgumentError)
    assert "var has negative entry" in str(second)


def _with_function(j: Job, function: Callable[..., torch.Tensor]) -> Job:
    call = dataclasses.replace(j.call, function=function)
    return dataclasses.replace(j, call=call)


def test_a_batch_that_warns_falls_back_so_each_warning_names_its_own_call() -> None:
    def warns_for_batches(**kwargs: Any) -> torch.Tensor:
        if kwargs["input"].shape[0] > 2:
            warnings.warn(f"saw {kwargs['input'].shape[0]} rows", stacklevel=2)
        return F.mse_loss(**kwargs)

    jobs = [_with_function(job("mse_loss", input=randn(2, 2), target=randn(2, 2)), warns_for_batches) for _ in range(2)]
    assert EXECUTOR._batched(jobs) is None
    results = EXECUTOR.run_batch(jobs)
    assert all(isinstance(r, Result) and r.warnings == [] for r in results)


def test_out_of_memory_splits_the_batch_then_fails_single_calls() -> None:
    seen: list[int] = []

    def small_only(**kwargs: Any) -> torch.Tensor:
        rows = kwargs["input"].shape[0]
        seen.append(rows)
        if rows > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return F.mse_loss(**kwargs)

    jobs = [job("mse_loss", input=randn(1, 2), target=randn(1, 2)) for _ in range(4)]
    jobs.append(job("mse_loss", input=randn(3, 2), target=randn(3, 2)))
    results = EXECUTOR.run_batch([_with_function(j, small_only) for j in jobs])
    assert [type(r).__name__ for r in results] == ["Result"] * 4 + ["ResourceExhaustedError"]
    assert isinstance(results[-1], ResourceExhaustedError)
    # rows per attempt: all 5 calls; [1, 1]; [1, 1, 3] -> [1] alone and [1, 3] -> [1], [3] alone
    assert seen == [7, 2, 5, 1, 4, 1, 3]


def test_a_bad_grad_output_fails_only_its_call() -> None:
    calls = [job("mse_loss", ("input",), input=randn(2, 2), target=randn(2, 2), reduction="none") for _ in range(2)]
    calls.append(job("mse_loss", ("input",), randn(3), input=randn(2, 2), target=randn(2, 2), reduction="none"))
    results = EXECUTOR._batched(calls)
    assert results is not None
    assert isinstance(results[0], Result) and isinstance(results[1], Result)
    assert isinstance(results[2], InvalidArgumentError) and "grad_output has shape [3]" in str(results[2])


def test_on_a_gpu_only_calls_that_round_alike_in_any_batch_concatenate() -> None:
    def plan(loss: str, **arguments: Any) -> Any:
        j = job(loss, ("input",), **arguments)
        rule = LOSSES[loss].batch
        assert rule is not None
        return rule.plan(j.call, invariant=True)

    logits, classes = randn(4, 10), torch.tensor([0, 3, 9, 2])
    assert plan("mse_loss", input=randn(4, 3), target=randn(4, 3)) is not None
    assert plan("nll_loss", input=logits, target=classes, weight=randn(10).abs()) is not None
    assert plan("cross_entropy", input=logits, target=classes) is not None
    assert plan("cross_entropy", input=logits, target=classes, label_smoothing=0.1) is None  # sums over classes
    assert plan("cross_entropy", input=logits, target=logits.softmax(1)) is None
    assert plan("multi_margin_loss", input=logits, target=classes) is None
    # A batchable job without a plan (a lone call) gets one, and runs as a batch of one.
    lone = dataclasses.replace(job("mse_loss", ("input",), input=randn(4, 3), target=randn(4, 3)), plan=None)
    calls: list[int] = []
    original = EXECUTOR._batched

    def counting(jobs: Any) -> Any:
        calls.append(len(jobs))
        return original(jobs)

    EXECUTOR._batched = counting  # type: ignore[method-assign]
    try:
        (result,) = EXECUTOR.run_batch([lone])
    finally:
        del EXECUTOR._batched
    assert calls == [1] and isinstance(result, Result)
