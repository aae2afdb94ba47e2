"""Runs prepared calls on the device: one alone, or a batch of them.

``Executor.run`` and ``Executor.run_batch`` block; they run on a compute thread, except a CPU
small batch, which the batcher computes on the event loop (``SchedulingPolicy.inline_elements``).
This is the only module that picks a device or calls CUDA APIs. An answer never depends on who
shared its batch. On a CPU a batch computes each call as it would alone, so each answer is
torch's own, bit for bit. On a GPU calls whose batch rule says they may (``BatchRule.invariant``)
are concatenated, and such a call alone takes the same route as a batch of one: the same kernels
on tensors of its own size. There, host tensors are staged in pinned memory and copied without
blocking, a batch synchronises once (when its results are copied back), and a batch that runs out
of memory is split in halves and retried, down to single calls, which then fail alone with
RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from remoteloss_server.errors import InvalidArgumentError, ResourceExhaustedError, ServiceError
from remoteloss_server.losses import LOSSES, Call
from remoteloss_server.losses.batching import Plan, Stack
from remoteloss_server.torch_errors import REJECTIONS, is_device_failure, is_out_of_memory, message
from remoteloss_server.torch_warnings import record

__all__ = ["Executor", "Job", "Result", "resolve_device"]

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> ``cuda:0`` when CUDA is available, else ``cpu``; ValueError for an unusable one."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name}: CUDA is not available")
        device = torch.device("cuda", device.index or 0)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise ValueError(f"device {name}: only cpu and cuda are supported")
    return device


@dataclass(frozen=True)
class Result:
    """A computed loss, on the host: the value, gradients by argument name, torch's warnings."""

    loss: torch.Tensor
    gradients: dict[str, torch.Tensor]
    warnings: list[str]


@dataclass(frozen=True)
class Job:
    """One call to compute, with its incoming gradient; ``plan`` (from its loss's batch rule)
    lets it share a batch, None makes it run alone."""

    call: Call
    grad_output: torch.Tensor | None = None
    plan: Plan | None = None


class _OutOfMemory(Exception):
    pass


class Executor:
    """Computes prepared calls on one device."""

    def __init__(self, device: str, torch_threads: int, *, concatenate: bool | None = None) -> None:
        self.device = resolve_device(device)
        # How a batch computes (SchedulingPolicy.concatenate): concatenated on a GPU, each call as alone on a CPU.
        self.concatenate = self.device.type == "cuda" if concatenate is None else concatenate
        torch.set_num_threads(torch_threads)
        if self.device.type == "cuda":
            torch.empty(0, device=self.device)  # create the CUDA context now, not on the first request
        # torch's first gradient seeded with a tensor imports torch.fx's symbolic shapes (sympy):
        # about 0.4 s, which would be the first gradient request's. Now, before the server serves.
        leaf = torch.zeros(1, device=self.device, requires_grad=True)
        torch.autograd.grad(leaf * 1, [leaf], grad_outputs=torch.ones(1, device=self.device))

    def memory_reserved(self) -> int:
        """Bytes torch's caching allocator holds on this device; 0 on the CPU. Thread-safe."""
        return int(torch.cuda.memory_reserved(self.device)) if self.device.type == "cuda" else 0

    def run(self, call: Call, grad_output: torch.Tensor | None = None) -> Result:
        """Compute ``call`` (once: its tensors become autograd leaves) and, for the tensors it
        names in ``requires_grad``, d(sum(loss * grad_output))/d(tensor); grad_output defaults
        to ones, and a 0-d one weighs every element of the loss alike.

        Raises InvalidArgumentError for what torch rejects and ResourceExhaustedError when the
        device runs out of memory; anything else is a bug and propagates.
        """
        with record() as texts:
            return self._compute(call, grad_output, texts)

    def _compute(self, call: Call, grad_output: torch.Tensor | None, texts: list[str]) -> Result:
        """``run`` inside a recording of warnings: the call's own are those it adds to ``texts``."""
        start = len(texts)
        call = self._on_device(call)
        try:
            if call.requires_grad:
                loss, gradients = self._differentiate(call, grad_output)
            else:  # no tensor of the call requires grad (decoded, none marked): autograd records nothing,
                # without inference_mode's enter and exit, which cost a small call 3% of its handler
                loss, gradients = call(), {}
            names = list(gradients)
            loss, *grads = self._to_host([loss, *gradients.values()])
            gradients = dict(zip(names, grads, strict=True))
        except REJECTIONS as exc:
            if is_out_of_memory(exc):
                self._release_memory()
                raise ResourceExhaustedError(f"{call.loss}: out of memory on {self.device}") from None
            if is_device_failure(exc):
                raise
            raise InvalidArgumentError(f"{call.loss}: {message(exc, call)}") from exc
        return Result(loss, gradients, list(dict.fromkeys(texts[start:])))

    def run_batch(self, jobs: Sequence[Job]) -> list[Result | ServiceError]:
        """Compute jobs of one batch key, each with its own result or error.

        On a CPU (``concatenate`` False) each job computes as ``run`` would compute it alone, so
        that every answer is torch's own, bit for bit; the batch shares one recording of
        warnings and one turn. Concatenated (a GPU), jobs with plans (a job without one gets its
        own here) run as one batch (``_batched``), a single job as a batch of one, so that a
        call's answer does not depend on who shared its batch. A failure of torch for the batch
        (or a warning, whose words would name the batch's shapes) makes each job run as a batch
        of one, then alone where that fails too; jobs without plans run so, one by one.
        Bugs and CUDA errors propagate."""
        if not self.concatenate:
            return self._each(jobs)
        if len(jobs) == 1:
            jobs = [self._planned(jobs[0])]
            if jobs[0].plan is None:
                return [self._alone(jobs[0])]
        elif not all(job.plan is not None for job in jobs):  # each by the route it takes alone
            return [result for job in jobs for result in self.run_batch([job])]
        try:
            results = self._batched(jobs)
        except _OutOfMemory:
            if len(jobs) == 1:
                return [ResourceExhaustedError(f"{jobs[0].call.loss}: out of memory on {self.device}")]
            half = len(jobs) // 2
            logger.info("out of memory for a batch of %d; retrying in halves", len(jobs))
            return self.run_batch(jobs[:half]) + self.run_batch(jobs[half:])
        if results is not None:
            return results
        if len(jobs) == 1:
            return [self._alone(jobs[0])]
        return [result for job in jobs for result in self.run_batch([job])]

    def _planned(self, job: Job) -> Job:
        """``job`` with its loss's batch plan (None where it must run alone)."""
        if job.plan is not None:
            return job
        rule = LOSSES[job.call.loss].batch
        plan = None if rule is None else rule.plan(job.call, invariant=True)
        return job if plan is None else dataclasses.replace(job, plan=plan)

    def _each(self, jobs: Sequence[Job]) -> list[Result | ServiceError]:
        """Each job computed as ``run`` computes it, inside one recording of warnings: jobs that
        all need gradients with one backward pass over their separate graphs (``_together``)."""
        results: list[Result | ServiceError] = []
        with record() as texts:
            if len(jobs) > 1 and all(job.call.requires_grad for job in jobs):
                together = self._together(jobs, texts)
                if together is not None:
                    return together
            for job in jobs:
                try:
                    results.append(self._compute(job.call, job.grad_output, texts))
                except ServiceError as err:
                    results.append(err)
        return results

    def _together(self, jobs: Sequence[Job], texts: list[str]) -> list[Result | ServiceError] | None:
        """Each job's forward as alone, then one ``autograd.grad`` over all of them: the graphs
        share no node, so each gradient is computed by the same functions on the same values as
        alone (bit for bit; tests/integration/test_batch_invariance.py), without one pass of the
        autograd engine per call. A forward torch rejects fails its call only, as ``run`` would;
        None (compute each alone) where the backward fails or warns (the warning would belong to
        no one call), or memory or the device fails."""
        forwards: list[tuple[Call, list[torch.Tensor], torch.Tensor, list[str]] | ServiceError] = []
        outputs, inputs, seeds = [], [], []
        for job in jobs:
            call = self._on_device(job.call)
            start = len(texts)
            try:
                leaves = [call.tensors[name].requires_grad_(True) for name in call.requires_grad]
                with torch.enable_grad():
                    loss = call()
                if loss.requires_grad:
                    seeds.append(self._grad_output(call, job.grad_output, loss))
                    outputs.append(loss)
                    inputs += leaves
            except InvalidArgumentError as err:
                forwards.append(err)
                continue
            except REJECTIONS as exc:
                if is_out_of_memory(exc) or is_device_failure(exc):
                    return None  # alone, where run() says which
                forwards.append(InvalidArgumentError(f"{call.loss}: {message(exc, call)}"))
                continue
            forwards.append((call, leaves, loss, list(dict.fromkeys(texts[start:]))))
        start = len(texts)
        try:
            grads = iter(torch.autograd.grad(outputs, inputs, seeds, allow_unused=True) if outputs else ())
        except REJECTIONS:
            return None
        if len(texts) > start:
            return None
        results: list[Result | ServiceError] = []
        for entry in forwards:
            if isinstance(entry, ServiceError):
                results.append(entry)
                continue
            call, leaves, loss, warned = entry
            found = [next(grads) for _ in leaves] if loss.requires_grad else [None] * len(leaves)
            gradients = {
                name: torch.zeros_like(leaf) if grad is None else grad
                for name, leaf, grad in zip(call.requires_grad, leaves, found, strict=True)
            }
            loss, *host = self._to_host([loss, *gradients.values()])
            results.append(Result(loss, dict(zip(gradients, host, strict=True)), warned))
        return results

    def _alone(self, job: Job) -> Result | ServiceError:
        try:
            return self.run(job.call, job.grad_output)
        except ServiceError as err:
            return err

    def _batched(self, jobs: Sequence[Job]) -> list[Result | ServiceError] | None:
        """The batch computed once with reduction="none", each job's share reduced as torch
        would, and every gradient from one backward pass; None where torch rejects or warns."""
        first = jobs[0].call
        rule = LOSSES[first.loss].batch
        assert rule is not None
        with record() as texts:
            try:
                stack = rule.stack([job.plan for job in jobs if job.plan is not None], empty=self._empty_host)
                tensors = self._to_device(stack.tensors)
                leaves = [tensors[name] for name in first.requires_grad]
                with torch.enable_grad() if leaves else torch.inference_mode():
                    for leaf in leaves:
                        leaf.requires_grad_(True)
                    unreduced = first.function(**tensors, **stack.options)
                    losses = stack.reduce(unreduced, tensors)
                    gradients = self._batch_gradients(jobs, stack, leaves, losses) if leaves else [{}] * len(jobs)
                flat = []
                for loss, grads in zip(losses, gradients, strict=True):
                    flat.append(loss)
                    if not isinstance(grads, ServiceError):
                        flat.extend(grads.values())
                host = iter(self._to_host(flat))
            except REJECTIONS as exc:
                if is_out_of_memory(exc):
                    self._release_memory()
                    raise _OutOfMemory from None
                if is_device_failure(exc):
                    raise
                return None
        if texts:
            return None
        results: list[Result | ServiceError] = []
        for job, grads in zip(jobs, gradients, strict=True):
            loss = next(host)
            if isinstance(grads, ServiceError):
                results.append(grads)
                continue
            assert job.plan is not None
            results.append(Result(loss, {name: next(host) for name in grads}, list(job.plan.warnings)))
        return results

    def _batch_gradients(
        self, jobs: Sequence[Job], stack: Stack, leaves: list[torch.Tensor], losses: list[torch.Tensor]
    ) -> list[dict[str, torch.Tensor] | ServiceError]:
        """Each job's gradients, from one backward pass over every job whose grad_output fits."""
        names = jobs[0].call.requires_grad
        outputs, seeds = [], []
        answers: list[InvalidArgumentError | None] = []
        for job, loss in zip(jobs, losses, strict=True):
            try:
                seeds.append(self._grad_output(job.call, job.grad_output, loss))
            except InvalidArgumentError as err:
                answers.append(err)
                continue
            outputs.append(loss)
            answers.append(None)
        grads: Sequence[torch.Tensor | None] = [None] * len(leaves)
        if outputs and outputs[0].requires_grad:  # else no gradient flows to any leaf
            grads = torch.autograd.grad(outputs, leaves, grad_outputs=seeds, allow_unused=True)
        full = {
            name: torch.zeros_like(leaf) if grad is None else grad
            for name, leaf, grad in zip(names, leaves, grads, strict=True)
        }
        return [
            answer if answer is not None else {name: stack.piece(i, name, full[name]) for name in names}
            for i, answer in enumerate(answers)
        ]

    def _differentiate(
        self, call: Call, grad_output: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        leaves = [call.tensors[name].requires_grad_(True) for name in call.requires_grad]
        with torch.enable_grad():
            loss = call()
            if not loss.requires_grad:  # no gradient flows to any leaf (e.g. only a target asked)
                return loss, {name: torch.zeros_like(t) for name, t in zip(call.requires_grad, leaves, strict=True)}
            seed = self._grad_output(call, grad_output, loss)
            grads = torch.autograd.grad(loss, leaves, grad_outputs=seed, allow_unused=True)
        return loss, {
            name: torch.zeros_like(leaf) if grad is None else grad
            for name, leaf, grad in zip(call.requires_grad, leaves, grads, strict=True)
        }

    def _grad_output(self, call: Call, grad_output: torch.Tensor | None, loss: torch.Tensor) -> torch.Tensor:
        if grad_output is None:
            return torch.ones_like(loss)
        if not grad_output.is_floating_point():
            raise InvalidArgumentError(
                f"{call.loss}: grad_output must be floating, got {str(grad_output.dtype).removeprefix('torch.')}"
            )
        if grad_output.dim() == 0:  # a scalar weighs every element of the loss alike
            return self._stage(grad_output).to(loss.dtype).expand(loss.shape)
        if grad_output.shape != loss.shape:
            raise InvalidArgumentError(
                f"{call.loss}: grad_output has shape {list(grad_output.shape)}, but the loss has "
                f"shape {list(loss.shape)}"
            )
        return self._stage(grad_output).to(loss.dtype)

    # ------------------------------------------------------------------------ host <-> device

    def _stage(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on the device: through pinned memory and an asynchronous copy from the host."""
        if tensor.device == self.device:
            return tensor
        if self.device.type == "cuda" and tensor.device.type == "cpu":
            pinned = tensor if tensor.is_pinned() else tensor.pin_memory()
            return pinned.to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def _empty_host(self, shape: Sequence[int], *, dtype: torch.dtype) -> torch.Tensor:
        """A host tensor to fill: pinned when it is bound for a GPU."""
        return torch.empty(shape, dtype=dtype, pin_memory=self.device.type == "cuda")

    def _on_device(self, call: Call) -> Call:
        """``call`` with its tensors on the device; on a CPU itself (decoded there): no new Call per request."""
        return call if self.device.type == "cpu" else dataclasses.replace(call, tensors=self._to_device(call.tensors))

    def _to_device(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: self._stage(tensor) for name, tensor in tensors.items()}

    def _to_host(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``tensors`` on the host, detached; from a GPU through pinned memory, with one synchronisation."""
        if self.device.type != "cuda":
            return [t.detach() for t in tensors]
        copies = []
        for t in tensors:
            host = self._empty_host(t.shape, dtype=t.dtype)
            host.copy_(t.detach(), non_blocking=True)
            copies.append(host)
        torch.cuda.current_stream(self.device).synchronize()
        return copies

    def _release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

