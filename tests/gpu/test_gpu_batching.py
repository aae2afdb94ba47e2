"""On CUDA: the executor's device path (pinned staging, one synchronisation per batch, results
on the host), batches equal to torch on the CPU, class indices checked before any launch, and
out of memory split down to the calls that cause it. Skipped without CUDA."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import remoteloss
from remoteloss._request import build_request
from remoteloss_server.app import ServerThread
from remoteloss_server.config import ServerConfig
from remoteloss_server.errors import InvalidArgumentError, ResourceExhaustedError
from remoteloss_server.executor import Executor, Job, Result
from remoteloss_server.losses import LOSSES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

G = torch.Generator().manual_seed(3)


@pytest.fixture(scope="module")
def executor() -> Executor:
    return Executor("cuda", torch_threads=1)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=G, dtype=torch.float64)


def job(loss: str, wrt: tuple[str, ...] = (), **arguments: Any) -> Job:
    request = build_request(loss, arguments, wrt=wrt)
    call = LOSSES[loss].prepare(getattr(request, loss), "cpu")  # as the servicer does: on the host
    rule = LOSSES[loss].batch
    assert rule is not None
    return Job(call, None, rule.plan(call))


def local(loss: str, wrt: tuple[str, ...], **arguments: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    leaves = {n: arguments[n].clone().requires_grad_() for n in wrt}
    out = getattr(F, loss)(**{**arguments, **leaves})
    grads = torch.autograd.grad(out, list(leaves.values()), torch.ones_like(out)) if wrt else ()
    return out.detach(), dict(zip(wrt, grads, strict=True))


def test_a_call_alone_comes_back_on_the_host(executor: Executor) -> None:
    arguments = {"input": randn(4, 5), "target": torch.tensor([0, 4, 2, 1])}
    result = executor.run(job("cross_entropy", ("input",), **arguments).call)
    value, grads = local("cross_entropy", ("input",), **arguments)
    assert result.loss.device.type == "cpu" and result.gradients["input"].device.type == "cpu"
    torch.testing.assert_close(result.loss, value)
    torch.testing.assert_close(result.gradients["input"], grads["input"])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_batches_equal_torch_on_the_cpu(executor: Executor, reduction: str) -> None:
    weight = torch.rand(5, generator=G, dtype=torch.float64) + 0.2
    options = {"weight": weight, "ignore_index": 1, "label_smoothing": 0.2, "reduction": reduction}
    calls = [
        {"input": randn(5), "target": torch.tensor(3), **options},
        {"input": randn(3, 5), "target": torch.tensor([1, 0, 4]), **options},
        {"input": randn(7, 5), "target": torch.randint(0, 5, (7,), generator=G), **options},
    ]
    jobs = [job("cross_entropy", ("input",), **c) for c in calls]
    results = executor.run_batch(jobs)
    for result, arguments in zip(results, calls, strict=True):
        assert isinstance(result, Result)
        value, grads = local("cross_entropy", ("input",), **arguments)
        torch.testing.assert_close(result.loss, value)
        torch.testing.assert_close(result.gradients["input"], grads["input"])


def test_ctc_batch_with_padded_targets(executor: Executor) -> None:
    calls = [
        {
            "log_probs": randn(12, n, 6).log_softmax(2),
            "targets": torch.randint(1, 6, (n, width), generator=G),
            "input_lengths": torch.full((n,), 12),
            "target_lengths": torch.full((n,), width),
        }
        for n, width in ((2, 3), (4, 5))
    ]
    results = executor.run_batch([job("ctc_loss", ("log_probs",), **c) for c in calls])
    for result, arguments in zip(results, calls, strict=True):
        assert isinstance(result, Result)
        value, grads = local("ctc_loss", ("log_probs",), **arguments)
        torch.testing.assert_close(result.loss, value)
        torch.testing.assert_close(result.gradients["log_probs"], grads["log_probs"])


def test_class_indices_are_checked_before_launch(executor: Executor) -> None:
    with pytest.raises(InvalidArgumentError, match="target holds class 9"):
        job("nll_loss", input=randn(2, 3), target=torch.tensor([0, 9]))
    result = executor.run(job("nll_loss", input=randn(2, 3).log_softmax(1), target=torch.tensor([0, 2])).call)
    assert torch.isfinite(result.loss)  # the CUDA context is intact
    torch.cuda.synchronize()


def test_out_of_memory_splits_the_batch(executor: Executor) -> None:
    def small_only(**kwargs: Any) -> torch.Tensor:
        if kwargs["input"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return F.mse_loss(**kwargs)

    jobs = [job("mse_loss", input=randn(1, 4), target=randn(1, 4)) for _ in range(4)]
    jobs.append(job("mse_loss", input=randn(3, 4), target=randn(3, 4)))
    jobs = [dataclasses.replace(j, call=dataclasses.replace(j.call, function=small_only)) for j in jobs]
    results = executor.run_batch(jobs)
    assert all(isinstance(r, Result) for r in results[:4])
    assert isinstance(results[4], ResourceExhaustedError)


def test_a_gpu_server_batches_concurrent_requests() -> None:
    config = ServerConfig(
        host="127.0.0.1", port=0, device="cuda", metrics_port=0, http_port=0, max_batch_delay_s=0.02, shutdown_grace_s=0.5
    )
    inputs = [np.random.default_rng(i).standard_normal((8, 10)).astype(np.float32) for i in range(16)]
    targets = [np.random.default_rng(100 + i).integers(0, 10, 8) for i in range(16)]
    with ServerThread(config) as server, remoteloss.Client(server.target) as client:
        with ThreadPoolExecutor(max_workers=16) as pool:
            values = list(pool.map(lambda pair: client.cross_entropy(*pair), zip(inputs, targets, strict=True)))
        registry = server.metrics.registry
        batches = registry.get_sample_value("remoteloss_batch_requests_count", {"loss": "cross_entropy"})
        assert batches is not None and batches < 16
    for value, x, y in zip(values, inputs, targets, strict=True):
        expected = F.cross_entropy(torch.from_numpy(x), torch.from_numpy(y))
        np.testing.assert_allclose(value, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_a_gpu_server_reads_large_requests_in_place() -> None:
    """Requests over the split size: tensors over the received bytes, staged to the GPU, and
    gradients written once; equal to torch on the CPU, alone and batched with a second caller."""
    config = ServerConfig(host="127.0.0.1", port=0, device="cuda", metrics_port=0, http_port=0, shutdown_grace_s=0.5)
    rows = 2048  # 2048 x 512 float32: 4 MiB per tensor
    inputs = [torch.randn(rows, 512, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    targets = [torch.randint(0, 512, (rows,), generator=torch.Generator().manual_seed(10 + i)) for i in range(4)]

    def remote(pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x = pair[0].clone().requires_grad_()
        value = client.cross_entropy(x, pair[1], label_smoothing=0.1)
        value.backward()
        assert x.grad is not None
        return value.detach(), x.grad

    with ServerThread(config) as server, remoteloss.Client(server.target) as client:
        with ThreadPoolExecutor(max_workers=2) as pool:
            answers = list(pool.map(remote, zip(inputs, targets, strict=True)))
    for (value, grad), x, y in zip(answers, inputs, targets, strict=True):
        leaf = x.clone().requires_grad_()
        expected = F.cross_entropy(leaf, y, label_smoothing=0.1)
        expected.backward()
        torch.testing.assert_close(value, expected.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, leaf.grad, rtol=1e-5, atol=1e-7)


def _invariance_jobs() -> list[Job]:
    """float32 calls of several batch sizes, with the gradient of the input, for five losses."""
    gen = torch.Generator().manual_seed(11)
    weight = torch.linspace(0.3, 1.7, 10)
    jobs = []
    for rows in (1, 3, 8, 17, 40):
        x, y = torch.randn(rows, 6, generator=gen), torch.randn(rows, 6, generator=gen)
        logits, classes = torch.randn(rows, 10, generator=gen), torch.randint(0, 10, (rows,), generator=gen)
        jobs += [
            job("mse_loss", ("input",), input=x, target=y),
            job("huber_loss", ("input",), input=x, target=y, delta=0.5),
            job("kl_div", ("input",), input=logits.log_softmax(1), target=logits.roll(1, 0).softmax(1),
                reduction="batchmean"),
            job("nll_loss", ("input",), input=logits.log_softmax(1), target=classes, weight=weight),
            job("cross_entropy", ("input",), input=logits, target=classes),
            job("cross_entropy", ("input",), input=logits, target=classes, label_smoothing=0.1),
        ]
    # Planned as the server plans on a GPU: label smoothing, which sums over classes, runs alone.
    return [dataclasses.replace(j, plan=LOSSES[j.call.loss].batch.plan(j.call, invariant=True)) for j in jobs]


def test_a_batch_answers_bit_for_bit_as_each_call_alone(executor: Executor) -> None:
    jobs = _invariance_jobs()
    by_loss: dict[tuple[str, Any], list[int]] = {}
    for i, j in enumerate(jobs):
        by_loss.setdefault((j.call.loss, j.plan.key if j.plan is not None else None), []).append(i)
    batched: dict[int, Any] = {}
    for indices in by_loss.values():
        batched.update(zip(indices, executor.run_batch([jobs[i] for i in indices]), strict=True))
    for i, j in enumerate(jobs):
        alone = executor.run_batch([dataclasses.replace(j, plan=None)])[0]  # as a lone call arrives
        together = batched[i]
        assert isinstance(alone, Result) and isinstance(together, Result)
        pairs = [(alone.loss, together.loss), *((alone.gradients[n], together.gradients[n]) for n in alone.gradients)]
        for a, b in pairs:
            assert a.dtype == b.dtype and a.shape == b.shape
            assert a.numpy().tobytes() == b.numpy().tobytes(), f"{j.call.loss}: batched differs from alone"

