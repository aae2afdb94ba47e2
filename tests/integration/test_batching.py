"""Batched answers equal torch's, for every loss: requests sent together share batches.

A server of its own batches with ``max_batch_delay_s=0.05`` on one compute thread, so requests
sent at once surely group. For each loss, every case of the table (cases.py) goes out at once,
three times over, through the raw stub: with the gradients of every differentiable argument and
a random grad_output (variant "all"), with other values and the gradient of the first argument
only (variant "first", which lets a class weight or ``linear_weight`` that would need its own
gradient share a batch), and, for float32 cases, forward only (variant "forward"). Requests of
one case (and of cases that differ only in reduction or in having a batch dimension) have one
batch key, so batches mix reductions and batch sizes. Each answer (value, dtype, shape, torch's
warnings, gradients) must equal torch.nn.functional computed here. The server's batch metrics
must show that requests grouped, and which requests run alone is checked against the rules.
(On this CPU server a batch is any calls of one loss, each computed as alone, bit for bit:
test_batch_invariance.py; the rules' keys checked here are what a GPU concatenates by.)
"""

from __future__ import annotations

import inspect
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import torch
import torch.nn.functional as F

import remoteloss
from remoteloss import codec
from remoteloss._request import build_request
from remoteloss.v1 import loss_pb2_grpc
from remoteloss_server.app import ServerThread
from remoteloss_server.config import ServerConfig
from remoteloss_server.losses import LOSSES

from .cases import LOSS_NAMES, Call, Case, cases, differentiable, tolerance, with_grad

SHARED_ARGUMENTS = ("weight", "pos_weight", "linear_weight", "linear_bias")


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    config = ServerConfig(port=0, host="127.0.0.1", device="cpu", metrics_port=0, http_port=0, max_batch_delay_s=0.05)
    with ServerThread(config) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[Any]:
    with grpc.insecure_channel(server.target) as channel:
        yield loss_pb2_grpc.LossServiceStub(channel)


@dataclass
class Expected:
    case: Case
    variant: str
    request: Any
    loss: torch.Tensor
    gradients: dict[str, torch.Tensor]
    warnings: list[str]


def _build(case: Case, seed: int, shared_from: Call | None) -> Call:
    """The case's arguments drawn with another seed; class weights and the like copied from
    ``shared_from`` where they have the same shape (calls of one batch share them byte for byte)."""
    call = case.build(seed)
    if shared_from is not None:
        base, own = shared_from.tensors(), call.tensors()
        call = call.replace(
            {n: base[n] for n in SHARED_ARGUMENTS if n in base and n in own and base[n].shape == own[n].shape}
        )
    return call


def _local(call: Call, names: tuple[str, ...], grad_output: torch.Tensor | None) -> tuple[Any, ...]:
    built, leaves = with_grad(call, names)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = built.local()
    texts = list(dict.fromkeys(str(w.message) for w in caught))
    grads: dict[str, torch.Tensor] = {}
    if names:
        seed = torch.ones_like(out) if grad_output is None else grad_output.expand(out.shape)
        found = torch.autograd.grad(out, [leaves[n] for n in names], grad_outputs=seed, allow_unused=True)
        grads = {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, found, strict=True)}
    return out.detach(), grads, texts


def _grad_output(case: Case, like: torch.Tensor) -> torch.Tensor:
    """A random incoming gradient: of the loss's shape, or 0-d for a scalar loss."""
    rng = torch.Generator().manual_seed(zlib.crc32(case.id.encode()) ^ 0x5EED)
    shape = () if case.scalar_output else like.shape
    return (0.5 + torch.rand(shape, generator=rng, dtype=torch.float64)).to(like.dtype)


def _requests(loss: str) -> Iterator[Expected]:
    sources: dict[tuple[torch.dtype, str], Call] = {}  # cases that differ in reduction share weights
    for case in cases(loss):
        if case.torch_raises:
            continue
        first = _build(case, 0, sources.get((case.dtype, case.option_set.name)))
        sources.setdefault((case.dtype, case.option_set.name), first)
        names = differentiable(first)
        variants = [("all", first, names, True), ("first", _build(case, 1, first), names[:1], False)]
        if case.dtype == torch.float32:
            variants.append(("forward", _build(case, 2, first), (), False))
        for variant, call, wrt, with_grad_output in variants:
            grad_output = None
            if with_grad_output:
                grad_output = _grad_output(case, _local(call, (), None)[0])
            loss_value, grads, texts = _local(call, wrt, grad_output)
            arguments = inspect.signature(getattr(F, loss)).bind(*call.args, **call.remote_kwargs()).arguments
            request = build_request(loss, arguments, wrt=wrt, grad_output=grad_output)
            yield Expected(case, variant, request, loss_value, grads, texts)


def _batch_key(item: Expected) -> Hashable | None:
    """The rules' batch key for a request (computed here from the same request); None: alone."""
    spec = LOSSES[item.case.loss]
    assert spec.batch is not None
    plan = spec.batch.plan(spec.prepare(getattr(item.request, item.case.loss), "cpu"))
    return None if plan is None else plan.key


def _expected_alone(item: Expected) -> bool:
    """Which requests the rules send alone (docs/DESIGN.md, "Batching")."""
    case, opts = item.case, item.case.option_set.opts
    if opts.get("broadcast"):  # a target of another shape: torch's size warning names the shapes
        return True
    if case.loss == "triplet_margin_with_distance_loss":  # cosine over dim 0 of an unbatched call
        return not case.batched and opts.get("distance") == "cosine"
    if item.variant != "all":
        options = opts.get("options") is not None
        fallback = opts.get("kdim") or opts.get("prob") or "label_smoothing" in opts.get("torch", {})
        return case.loss == "linear_cross_entropy" and bool(options and fallback)  # torch ignores options
    # Variant "all": a tensor shared by the batch cannot get each call's own gradient.
    if case.loss == "linear_cross_entropy":
        return True
    if case.loss == "cross_entropy":  # a class weight gets a gradient with class probabilities
        return bool(opts.get("weight") and opts.get("prob"))
    if case.loss == "multilabel_soft_margin_loss":  # a weight (C) that broadcasts over the batch
        return bool(opts.get("weight") and case.batched)
    return case.loss == "gaussian_nll_loss" and not case.batched and opts.get("var") == "one"


def _assert_same(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (
        f"{what}: {actual.dtype} {list(actual.shape)}, torch gives {expected.dtype} {list(expected.shape)}"
    )
    torch.testing.assert_close(actual, expected, equal_nan=True, **tolerance(dtype), msg=lambda m: f"{what}: {m}")


def _batch_counts(server: ServerThread, loss: str) -> tuple[float, float]:
    registry = server.metrics.registry
    labels = {"loss": loss}
    requests = registry.get_sample_value("remoteloss_batch_requests_sum", labels) or 0.0
    batches = registry.get_sample_value("remoteloss_batch_requests_count", labels) or 0.0
    return requests, batches


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_batched_answers_equal_torch(server: ServerThread, stub: Any, loss: str) -> None:
    items = list(_requests(loss))
    keys = {(i.case.id, i.variant): _batch_key(i) for i in items}
    alone = {name for name, key in keys.items() if key is None}
    expected_alone = {(i.case.id, i.variant) for i in items if _expected_alone(i)}
    assert alone == expected_alone, "requests that run alone, unlike the rules say"
    requests_before, batches_before = _batch_counts(server, loss)

    futures = [stub.Compute.future(item.request, timeout=60) for item in items]  # all at once
    for item, future in zip(items, futures, strict=True):
        what = f"{item.case.id} ({item.variant})"
        response = future.result()
        _assert_same(codec.decode_torch(response.loss, "loss"), item.loss, item.case.dtype, what)
        assert list(response.warnings) == item.warnings, f"{what}: torch's warnings, no more, no less"
        assert set(response.gradients) == set(item.gradients), what
        for name, grad in item.gradients.items():
            actual = codec.decode_torch(response.gradients[name], name)
            _assert_same(actual, grad, item.case.dtype, f"{what}: d loss / d {name}")

    requests, batches = _batch_counts(server, loss)
    requests -= requests_before
    batches -= batches_before
    assert requests == len(items)
    # Each alone request is a batch of its own; the others share batches: about one per key and
    # 64 requests (twice that leaves room for a burst that straddles the start of a batch).
    sizes = Counter(key for key in keys.values() if key is not None)
    ideal = sum(-(-n // 64) for n in sizes.values())
    assert batches - len(alone) < sum(sizes.values()), "no two requests shared a batch"
    assert batches - len(alone) <= 2 * ideal, f"{sum(sizes.values())} requests of {len(sizes)} keys took {batches}"


@pytest.fixture(scope="module")
def slow_server() -> Iterator[ServerThread]:
    """Each batch waits 0.3 s for company."""
    config = ServerConfig(port=0, host="127.0.0.1", device="cpu", metrics_port=0, http_port=0, max_batch_delay_s=0.3)
    with ServerThread(config) as running:
        yield running


def test_a_request_whose_deadline_passes_in_the_queue_is_not_computed(slow_server: ServerThread) -> None:
    with (
        remoteloss.Client(slow_server.target, timeout=0.05) as client,
        pytest.raises(remoteloss.DeadlineExceededError) as info,
    ):
        client.soft_margin_loss(torch.zeros(3), torch.ones(3))
    assert isinstance(info.value, TimeoutError)
    time.sleep(0.4)  # past the batch delay: a batch would have formed by now
    assert _batch_counts(slow_server, "soft_margin_loss") == (0.0, 0.0)


def test_shutdown_answers_the_requests_still_queued() -> None:
    config = ServerConfig(port=0, host="127.0.0.1", device="cpu", metrics_port=0, http_port=0, max_batch_delay_s=0.5)
    request = build_request("mse_loss", {"input": torch.ones(2, 3), "target": torch.zeros(2, 3)})
    with ServerThread(config) as running:
        channel = grpc.insecure_channel(running.target)
        stub = loss_pb2_grpc.LossServiceStub(channel)
        futures = [stub.Compute.future(request, timeout=10) for _ in range(3)]
        give_up = time.monotonic() + 5
        while running.metrics.registry.get_sample_value("remoteloss_queue_depth") != 3:
            assert time.monotonic() < give_up, "the requests did not reach the queue"
            time.sleep(0.001)
        assert _batch_counts(running, "mse_loss")[1] == 0  # still waiting for the delay
    # The server has stopped: it computed what was queued before it did.
    with channel:
        assert [codec.decode_torch(f.result().loss, "loss").item() for f in futures] == [1.0, 1.0, 1.0]
