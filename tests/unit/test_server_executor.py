"""Executor.run: torch's values and gradients, torch's warnings, torch's errors as domain errors."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from remoteloss_server.errors import InvalidArgumentError, ResourceExhaustedError
from remoteloss_server.executor import Executor, resolve_device
from remoteloss_server.losses import Call

torch.set_num_threads(1)

SIZE_AVERAGE_WARNING = "size_average and reduce args will be deprecated, please use reduction='sum' instead."


@pytest.fixture(scope="module")
def executor() -> Executor:
    return Executor("cpu", torch_threads=1)


def test_the_first_gradient_imports_nothing_once_an_executor_exists() -> None:
    """torch imports modules on its first gradient seeded with a tensor (0.25-0.4 s on 2 cores):
    at the executor's construction, before the server serves, not in a caller's first call."""
    code = (
        "import sys, torch\n"
        "from remoteloss_server.executor import Executor\n"
        "Executor('cpu', torch_threads=1)\n"
        "before = set(sys.modules)\n"
        "x = torch.randn(3, requires_grad=True)\n"
        "torch.autograd.grad(torch.nn.functional.mse_loss(x, torch.zeros(3), reduction='none'), [x], torch.ones(3))\n"
        "print(sorted(set(sys.modules) - before))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def make_call(loss: str, tensors: dict[str, torch.Tensor], wrt: tuple[str, ...] = (), **options: Any) -> Call:
    function: Callable[..., torch.Tensor] = getattr(F, loss)
    return Call(loss, function, {k: v.clone() for k, v in tensors.items()}, options, wrt)


def local(
    loss: str,
    tensors: dict[str, torch.Tensor],
    wrt: tuple[str, ...],
    grad_output: torch.Tensor | None = None,
    **options: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    leaves = {k: v.clone().requires_grad_(k in wrt) for k, v in tensors.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss_value = getattr(F, loss)(**leaves, **options)
    if not wrt:
        return loss_value, {}
    grads = torch.autograd.grad(loss_value, [leaves[k] for k in wrt], grad_outputs=grad_output)
    return loss_value.detach(), dict(zip(wrt, grads, strict=True))


def test_sets_torch_threads_and_resolves_cpu() -> None:
    assert Executor("cpu", torch_threads=2).device == torch.device("cpu")
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answers")
def test_resolve_device_without_cuda() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="cuda:0: CUDA is not available"):
        resolve_device("cuda:0")


def test_forward_only_equals_torch(executor: Executor) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "input": torch.randn(4, 5, 2, generator=g, dtype=torch.float64),
        "target": torch.tensor([[0, 4], [1, 1], [2, 3], [4, 0]]),
    }
    result = executor.run(make_call("cross_entropy", tensors, label_smoothing=0.2, reduction="none"))
    expected, _ = local("cross_entropy", tensors, (), label_smoothing=0.2, reduction="none")
    torch.testing.assert_close(result.loss, expected, rtol=0, atol=0)
    assert result.gradients == {} and result.warnings == []
    assert not result.loss.requires_grad


def test_gradients_equal_torch(executor: Executor) -> None:
    g = torch.Generator().manual_seed(1)
    tensors = {
        "input": torch.randn(3, 4, generator=g),
        "target": torch.rand(3, 4, generator=g).softmax(-1),
        "weight": torch.rand(4, generator=g),
    }
    wrt = ("input", "target", "weight")  # all three are differentiable with probability targets
    result = executor.run(make_call("cross_entropy", tensors, wrt, reduction="sum"))
    expected, grads = local("cross_entropy", tensors, wrt, reduction="sum")
    torch.testing.assert_close(result.loss, expected)
    assert set(result.gradients) == set(wrt)
    for name in wrt:
        torch.testing.assert_close(result.gradients[name], grads[name])
        assert result.gradients[name].device.type == "cpu" and result.gradients[name].dtype == tensors[name].dtype


def test_grad_output_weighs_a_non_scalar_loss(executor: Executor) -> None:
    g = torch.Generator().manual_seed(2)
    tensors = {
        "log_probs": torch.randn(6, 2, 5, generator=g, dtype=torch.float64).log_softmax(-1),
        "targets": torch.tensor([[1, 2], [3, 3]]),
        "input_lengths": torch.tensor([6, 5]),
        "target_lengths": torch.tensor([2, 1]),
    }
    grad_output = torch.tensor([0.5, -2.0], dtype=torch.float64)
    result = executor.run(make_call("ctc_loss", tensors, ("log_probs",), reduction="none"), grad_output)
    expected, grads = local("ctc_loss", tensors, ("log_probs",), grad_output, reduction="none")
    torch.testing.assert_close(result.loss, expected)
    torch.testing.assert_close(result.gradients["log_probs"], grads["log_probs"])


def test_scalar_grad_output_scales_every_element(executor: Executor) -> None:
    tensors = {"input": torch.randn(3, 4), "target": torch.randn(3, 4)}
    result = executor.run(make_call("mse_loss", tensors, ("input",), reduction="none"), torch.tensor(3.0))
    _, grads = local("mse_loss", tensors, ("input",), torch.full((3, 4), 3.0), reduction="none")
    torch.testing.assert_close(result.gradients["input"], grads["input"])


@pytest.mark.parametrize(
    ("grad_output", "match"),
    [
        (torch.ones(2), r"mse_loss: grad_output has shape \[2\], but the loss has shape \[3, 4\]"),
        (torch.ones(3, 4, dtype=torch.int64), r"mse_loss: grad_output must be floating, got int64"),
    ],
)
def test_bad_grad_output(executor: Executor, grad_output: torch.Tensor, match: str) -> None:
    call = make_call(
        "mse_loss", {"input": torch.randn(3, 4), "target": torch.randn(3, 4)}, ("input",), reduction="none"
    )
    with pytest.raises(InvalidArgumentError, match=match):
        executor.run(call, grad_output)


def test_gradient_torch_does_not_reach_is_zeros(executor: Executor) -> None:
    tensors = {"input": torch.randn(3, 4), "target": torch.randn(3, 4).sign()}
    both = executor.run(make_call("hinge_embedding_loss", tensors, ("input", "target")))
    assert torch.equal(both.gradients["target"], torch.zeros(3, 4))
    only_target = executor.run(make_call("hinge_embedding_loss", tensors, ("target",)))
    assert torch.equal(only_target.gradients["target"], torch.zeros(3, 4))
    torch.testing.assert_close(only_target.loss, F.hinge_embedding_loss(tensors["input"], tensors["target"]))


def test_warnings_are_captured_deduplicated_in_order(executor: Executor) -> None:
    tensors = {"input": torch.randn(3, 1), "target": torch.randn(3)}  # broadcasts, so torch warns
    result = executor.run(make_call("mse_loss", tensors, ("input",), size_average=False))
    assert len(result.warnings) == 2
    assert result.warnings[0].startswith("Using a target size (torch.Size([3])) that is different to the input size")
    assert result.warnings[1] == SIZE_AVERAGE_WARNING
    again = executor.run(make_call("mse_loss", tensors, size_average=False))  # "always": not only the first time
    assert again.warnings == result.warnings
    expected, _ = local("mse_loss", tensors, (), size_average=False)
    torch.testing.assert_close(result.loss, expected)


def test_warnings_stay_with_the_thread_that_raised_them(executor: Executor) -> None:
    """Concurrent compute threads: each result holds exactly its own warnings."""
    warned = make_call("kl_div", {"input": torch.randn(8, 4).log_softmax(-1), "target": torch.rand(8, 4)})
    silent = make_call("l1_loss", {"input": torch.randn(8, 4), "target": torch.randn(8, 4)})
    results: dict[int, list[str]] = {i: [] for i in range(8)}
    barrier = threading.Barrier(8)
    hook, filters = warnings.showwarning, list(warnings.filters)

    def work(i: int) -> None:
        barrier.wait()
        for _ in range(20):
            results[i].extend(executor.run(warned if i % 2 else silent).warnings)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, texts in results.items():
        if i % 2:
            assert len(texts) == 20 and all(t.startswith("reduction: 'mean' divides") for t in texts)
        else:
            assert texts == []
    assert warnings.showwarning is hook and warnings.filters == filters  # restored once all are done


@pytest.mark.parametrize(
    ("loss", "tensors", "options", "match"),
    [
        (
            "cross_entropy",
            {"input": torch.randn(3, 4), "target": torch.tensor([0, 1, 2])},
            {"label_smoothing": 1.5},
            r"^cross_entropy: label_smoothing must be between 0.0 and 1.0",
        ),
        (
            "multi_margin_loss",
            {"input": torch.randn(3, 4), "target": torch.tensor([0, 1, 2])},
            {"p": 3},
            r"^multi_margin_loss: only p == 1 and p == 2 supported",
        ),
        (
            "ctc_loss",
            {
                "log_probs": torch.randn(6, 2, 5).half(),
                "targets": torch.tensor([[1, 2], [3, 3]]),
                "input_lengths": torch.tensor([6, 5]),
                "target_lengths": torch.tensor([2, 1]),
            },
            {},
            r"not implemented for 'Half' \(arguments: log_probs float16 \[6, 2, 5\], targets int64 \[2, 2\], ",
        ),
    ],
)
def test_what_torch_raises_is_invalid_argument(
    executor: Executor, loss: str, tensors: dict[str, torch.Tensor], options: dict[str, Any], match: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=match) as info:
        executor.run(make_call(loss, tensors, **options))
    assert "\n" not in str(info.value)


def _raising(exc: BaseException) -> Call:
    def function(**kwargs: Any) -> torch.Tensor:
        raise exc

    return Call("mse_loss", function, {"input": torch.ones(1)}, {}, ())


def test_out_of_memory_is_resource_exhausted(executor: Executor) -> None:
    with pytest.raises(ResourceExhaustedError, match="mse_loss: out of memory on cpu"):
        executor.run(_raising(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")))


def test_cpu_allocation_failure_is_resource_exhausted(executor: Executor) -> None:
    message = (
        "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"
    )
    with pytest.raises(ResourceExhaustedError, match="mse_loss: out of memory on cpu"):
        executor.run(_raising(RuntimeError(message)))


def test_a_device_failure_is_not_blamed_on_the_arguments(executor: Executor) -> None:
    with pytest.raises(RuntimeError, match="CUDA error: device-side assert triggered") as info:
        executor.run(_raising(RuntimeError("CUDA error: device-side assert triggered")))
    assert not isinstance(info.value, InvalidArgumentError)


def test_an_unexpected_error_propagates(executor: Executor) -> None:
    with pytest.raises(KeyError):
        executor.run(_raising(KeyError("bug")))


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().numpy().tobytes()


def test_a_cpu_batch_answers_each_call_as_alone_bit_for_bit(executor: Executor) -> None:
    """A CPU batch computes each call as ``run`` does (one backward pass over the separate
    graphs): the same bits, each call's own warnings, and a bad grad_output fails its call only."""
    from remoteloss_server.executor import Job, Result

    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(7, 3, generator=g), torch.randn(7, 3, generator=g)
    logits, classes = torch.randn(5, 4, generator=g), torch.tensor([0, 3, 1, 2, 2])
    jobs = [
        Job(make_call("mse_loss", {"input": x, "target": y}, ("input", "target"))),
        Job(make_call("mse_loss", {"input": x[:1], "target": y[0]}, ("input",))),  # torch warns: broadcast
        Job(make_call("cross_entropy", {"input": logits, "target": classes}, ("input",), label_smoothing=0.2)),
        Job(make_call("huber_loss", {"input": x, "target": y}, ("input",), reduction="none"),
            torch.rand(7, 3, generator=g)),
        Job(make_call("huber_loss", {"input": x, "target": y}, ("input",)), torch.ones(2)),  # a bad grad_output
    ]
    together = executor.run_batch(jobs)
    for job, batched in zip(jobs[:4], together, strict=False):
        alone = executor.run(dataclasses.replace(job.call, tensors={k: v.clone() for k, v in job.call.tensors.items()}),
                             job.grad_output)
        assert isinstance(batched, Result)
        assert _bits(batched.loss) == _bits(alone.loss) and batched.warnings == alone.warnings
        assert {n: _bits(t) for n, t in batched.gradients.items()} == {n: _bits(t) for n, t in alone.gradients.items()}
    assert together[0].warnings == [] and together[1].warnings and "target size" in together[1].warnings[0]
    assert isinstance(together[4], InvalidArgumentError) and "grad_output has shape [2]" in str(together[4])


def test_a_call_torch_rejects_in_a_cpu_batch_fails_alone_and_the_rest_compute_once(
    executor: Executor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller's bad call (a class index out of range) in a batch with gradients: its own
    INVALID_ARGUMENT, as alone, and every other call's answer bit for bit, each computed once
    (the fallback, which computes each call again with ``_compute``, never runs)."""
    from remoteloss_server.executor import Job, Result

    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    logits = torch.randn(4, 5, generator=g)
    good = [
        Job(make_call("mse_loss", {"input": x, "target": y}, ("input",))),
        Job(make_call("cross_entropy", {"input": logits, "target": torch.tensor([0, 4, 1, 2])}, ("input",))),
    ]
    bad = Job(make_call("cross_entropy", {"input": logits, "target": torch.tensor([0, 9, 1, 2])}, ("input",)))
    with pytest.raises(InvalidArgumentError) as alone_error:
        executor.run(bad.call)
    expected = [executor.run(make_call(j.call.loss, j.call.tensors, j.call.requires_grad)) for j in good]
    calls = []
    original = Executor._compute

    def counted(self: Executor, *args: Any) -> Result:
        calls.append(args[0].loss)
        return original(self, *args)

    monkeypatch.setattr(Executor, "_compute", counted)
    jobs = [good[0], dataclasses.replace(bad, call=make_call(bad.call.loss, bad.call.tensors, ("input",))), good[1]]
    together = executor.run_batch(jobs)
    assert calls == []
    assert isinstance(together[1], InvalidArgumentError) and str(together[1]) == str(alone_error.value)
    for batched, alone in zip([together[0], together[2]], expected, strict=True):
        assert isinstance(batched, Result)
        assert _bits(batched.loss) == _bits(alone.loss)
        assert {n: _bits(t) for n, t in batched.gradients.items()} == {n: _bits(t) for n, t in alone.gradients.items()}
