"""Dynamic batching: a queue of calls, grouped by their batch key and computed together.

``Batcher.submit(call, grad_output, deadline, tenant=)`` queues a call and waits for its
``Result``. A loop takes a group whenever a compute slot is free (one per compute thread), so a
batch forms from what queued while the previous batch computed: no added latency at low load.
``max_batch_delay_s`` holds a group back until its oldest call has waited that long, unless it is
full; ``max_batch_size`` (calls) and ``max_batch_elements`` (tensor elements) cap a batch, and a
larger group leaves the rest for the next one. Calls whose caller went away are dropped, and
calls whose deadline passed fail with DEADLINE_EXCEEDED, both before anything is computed.
``close()`` refuses new calls (UNAVAILABLE), computes everything queued and returns when the last
batch is done.

Every knob comes from one ``SchedulingPolicy``, and the batcher alone decides where a call
computes: a batch of at most ``policy.inline_elements`` on the event loop (cheaper than the hop
to a thread), larger ones on a compute thread; a call alone in the server (``alone()``: none
other in flight or arriving) on an idle batcher at once, as a batch of one, since the queue
would only add its hops. The loop holds a slot only once work is queued.

Tenants share the compute slots by weight (``fairness.FairShares``): a batch holds one tenant's
calls, its measured compute time is charged to that tenant, and the next batch comes from the
tenant with the least virtual time among those with a batch ready, then its oldest ready group.
A tenant that was idle starts level with the others. Without keys every call is one tenant.
Batch keys and the batched computation come from each loss's ``BatchRule`` and
``Executor.run_batch``; with ``batching=False`` each call is its own batch. Where batches do not
concatenate (``policy.concatenate`` False: a CPU; and on a GPU the calls whose rule gives no
plan) the group is the loss: each call computes as alone, the group in one turn. Whether a
group's ready calls go as one batch or one at a time is decided per loss from measured costs
(``adaptive``, in ``picking``); an answer never depends on the batch it was in (docs/DESIGN.md).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Executor as Pool
from typing import Any, Protocol

import torch

from remoteloss_server.adaptive import BatchDecider
from remoteloss_server.alone import compute_alone
from remoteloss_server.errors import ServiceError, UnavailableError
from remoteloss_server.executor import Job, Result
from remoteloss_server.fairness import FairShares
from remoteloss_server.losses import LOSSES, Call
from remoteloss_server.losses.batching import Plan
from remoteloss_server.metrics import NO_TENANT, Metrics
from remoteloss_server.picking import Picker
from remoteloss_server.queued import Group, Item, fail, resolve
from remoteloss_server.scheduling import SchedulingPolicy

__all__ = ["Batcher", "Runner"]

logger = logging.getLogger(__name__)

_DEFAULT_POLICY = SchedulingPolicy()


class Runner(Protocol):
    """What the batcher needs of an ``Executor``."""

    device: torch.device

    def run_batch(self, jobs: Sequence[Job]) -> list[Result | ServiceError]: ...


class Batcher(Picker):
    """Groups queued calls by batch key and computes each group on ``pool`` as one batch."""

    def __init__(
        self,
        executor: Runner,
        pool: Pool,
        metrics: Metrics,
        policy: SchedulingPolicy = _DEFAULT_POLICY,
        *,
        alone: Callable[[], bool] = lambda: False,
        tenant_weights: Mapping[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._executor = executor
        self._pool = pool
        self._metrics = metrics
        self._policy = policy
        self._alone = alone  # whether the caller of submit() is the only request in flight
        self.clock = clock  # deadlines passed to submit() are on this clock
        self._device = str(executor.device)
        self._queues: dict[str | None, dict[Hashable, Group]] = {}  # by tenant, then batch key
        self._shares = FairShares(tenant_weights)
        self._seq = itertools.count()
        self._closed = False
        self._wakeup: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self._computing = 0  # batches computing now
        self._decider = BatchDecider(explore_every=policy.explore_every)  # batch or not, per loss

    @property
    def queued(self) -> int:
        """Calls waiting for a batch (cancelled ones included until the loop drops them)."""
        return sum(len(group.items) for groups in self._queues.values() for group in groups.values())

    def virtual_time(self, tenant: str | None) -> float:
        """``tenant``'s compute seconds charged so far divided by its weight, or where it starts."""
        return self._shares.virtual_time(tenant)

    async def start(self) -> None:
        """Start the loop on the running event loop."""
        if self._loop_task is not None:
            raise RuntimeError("the batcher is already started")
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self._policy.concurrency)
        self._loop_task = asyncio.create_task(self._run(), name="remoteloss-batcher")

    async def close(self) -> None:
        """Refuse new calls, compute every queued one, and wait for the last batch."""
        self._closed = True
        if self._loop_task is None:
            return
        assert self._wakeup is not None
        self._wakeup.set()
        await self._loop_task
        if self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)

    async def submit(
        self,
        call: Call,
        grad_output: torch.Tensor | None = None,
        deadline: float | None = None,
        *,
        tenant: str | None = None,
    ) -> Result:
        """Queue ``call`` and wait for its result. ``deadline`` is on ``self.clock``.

        ``tenant``: whose call it is (the API key's tenant; None without keys). A call alone in
        the server (``alone()``) on an idle batcher computes at once: a small one on the spot
        (``alone.compute_alone``), a larger one if still alone after one turn of the event loop,
        which lets requests that arrived with it show themselves.

        Raises the call's ServiceError; DeadlineExceededError when the deadline passes before
        its batch starts; UnavailableError once ``close()`` has been called.
        """
        if self._closed or self._loop_task is None or self._wakeup is None:
            raise UnavailableError("the server is shutting down" if self._closed else "the batcher is not running")
        if self.idle and self._alone():
            if (elements := call.elements) <= self._policy.inline_elements:
                self._shares.activate(tenant)
                return compute_alone(
                    self._timed, Job(call, grad_output), elements, tenant, metrics=self._metrics,
                    device=self._device, clock=self.clock, charge=self._charge, sample=self._sample,
                )
            await asyncio.sleep(0)
            if self.idle and self._alone():
                return await self._compute_now(call, grad_output, deadline, tenant)
        plan = await self._plan(call)
        seq = next(self._seq)
        key = self._key(call, plan, seq)
        elements = max(plan.elements, call.implied_elements) if plan is not None else call.elements
        item = Item(
            Job(call, grad_output, plan), elements, deadline, self.clock(), asyncio.get_running_loop().create_future()
        )
        groups = self._queues.get(tenant)
        if groups is None:  # the tenant becomes active
            self._shares.activate(tenant)
            groups = self._queues[tenant] = {}
        group = groups.get(key)
        if group is None:
            group = groups[key] = Group(seq, tenant, key)
        group.items.append(item)
        group.elements += elements
        self._metrics.child(self._metrics.queue_depth).inc()
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            return await item.future
        except asyncio.CancelledError:  # the caller went away: free its place in the queue now
            self._forget(group, item)
            raise

    async def _compute_now(
        self, call: Call, grad_output: torch.Tensor | None, deadline: float | None, tenant: str | None
    ) -> Result:
        """A lone call too large for the spot, as a batch of one on a compute thread, holding a slot."""
        item = Item(Job(call, grad_output), call.elements, deadline, self.clock(),
                     asyncio.get_running_loop().create_future())
        self._shares.activate(tenant)
        assert self._slots is not None
        await self._slots.acquire()  # free (idle), so this does not wait
        self._start_compute(tenant, [item])  # its own task, as the loop's batches: it keeps the slot
        return await item.future  # until the thread is done, even if this caller goes away

    async def _plan(self, call: Call) -> Plan | None:
        """How ``call`` joins a batch (None: alone); a large call's key (digests of its shared
        tensors) is made off the event loop."""
        rule = LOSSES[call.loss].batch if self._policy.batching and self._policy.concatenate else None
        if rule is None:
            return None
        large = sum(t.numel() for t in call.tensors.values()) > self._policy.plan_inline_elements
        shared = self._policy.max_shared_elements
        plan = await asyncio.to_thread(rule.plan, call, shared, invariant=True) if large \
            else rule.plan(call, shared, invariant=True)
        if self._closed:
            raise UnavailableError("the server is shutting down")
        return plan

    def _key(self, call: Call, plan: Plan | None, seq: int) -> Hashable:
        """The group ``call`` queues in: its plan's key where it concatenates; else its loss (each
        such call computes as alone, so any calls of a loss may share a turn); its own without
        batching."""
        if plan is not None:
            return plan.key
        return call.loss if self._policy.batching else ("alone", seq)

    @property
    def idle(self) -> bool:
        """Whether a call alone in the server would compute at once, without the queue: nothing is
        queued or computing, a compute slot is free and no batch delay is set."""
        slots = self._slots
        return not (self._queues or self._computing or self._policy.max_batch_delay_s > 0 or self._closed
                    or slots is None or slots.locked())

    def _forget(self, group: Group, item: Item) -> None:
        """Take a cancelled call out of the queue, unless a batch has taken it already."""
        if self._queues.get(group.tenant, {}).get(group.key) is not group or item not in group.items:
            return
        group.items.remove(item)
        group.elements -= item.elements
        self._metrics.queue_depth.dec()
        if not group.items:
            self._drop(group)

    def _charge(self, tenant: str | None, seconds: float) -> None:
        """Charge a batch's compute time to its tenant."""
        self._shares.charge(tenant, seconds)
        self._metrics.child(self._metrics.tenant_compute, tenant or NO_TENANT).inc(seconds)

    # ------------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        assert self._slots is not None
        while True:
            if not await self._work():  # waits without holding a slot, which a lone call may take
                return
            await self._slots.acquire()
            try:
                chosen = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            if chosen is None:
                self._slots.release()
                return
            tenant, batch = chosen
            if self._policy.inline_elements and sum(item.elements for item in batch) <= self._policy.inline_elements:
                self._compute_inline(tenant, batch)
            else:
                self._start_compute(tenant, batch)
            # Not kept while this loop waits for the next call: the batch holds its requests'
            # tensors and answers, and the last batch of a burst would pin them until then.
            del chosen, batch

    def _start_compute(self, tenant: str | None, batch: list[Item]) -> None:
        """``_compute(batch)`` as a task of its own, holding an acquired slot until it is done."""
        task = asyncio.create_task(self._compute(tenant, batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _next_batch(self) -> tuple[str | None, list[Item]] | None:
        """The next batch to compute and its tenant; None once closed with nothing left."""
        assert self._wakeup is not None
        while True:
            if not await self._work():
                return None
            chosen, wait = self._choose()
            if chosen is None:  # every tenant's next group holds back for the batch delay
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), wait)
                except asyncio.TimeoutError:
                    pass
                continue  # look again: a group may be full now, or another tenant's may be queued
            self._shares.started(chosen.tenant)
            batch = self._take(chosen, self._limit(chosen))
            if batch:
                return chosen.tenant, batch

    async def _work(self) -> bool:
        """Wait until a call is queued; False once closed with nothing queued."""
        assert self._wakeup is not None
        while not self._queues:
            if self._closed:
                return False
            self._wakeup.clear()
            await self._wakeup.wait()
        return True

    def _observe(self, batch: list[Item]) -> Any:
        """Record the batch's queue metrics; return the compute-duration histogram's child."""
        lane = self._metrics.batch(batch[0].job.call.loss, self._device)
        started = self.clock()
        for item in batch:
            lane.queue_duration.observe(max(0.0, started - item.enqueued))
        lane.batch_requests.observe(len(batch))
        lane.batch_elements.observe(sum(item.elements for item in batch))
        return lane.compute_duration

    def _timed(self, jobs: Sequence[Job]) -> tuple[list[Result | ServiceError], float | None]:
        """``run_batch(jobs)`` and, where ``_sample`` takes it, the CPU seconds the thread that
        runs it spent on it: on a CPU, for one batch in ``policy.cpu_sample_every``, drawn at
        random (each measure is two system calls on every small call's path; a fixed stride could
        fall in step with the decider's exploration); else None."""
        every = self._policy.cpu_sample_every
        if self._policy.concatenate or (every > 1 and random.random() * every >= 1.0):
            return self._executor.run_batch(jobs), None
        begin = time.thread_time()
        results = self._executor.run_batch(jobs)
        return results, time.thread_time() - begin

    def _sample(self, loss: str, calls: int, seconds: float, cpu: float | None) -> None:
        """A computed batch's cost, a sample for the batching decision of its loss: its CPU time
        where each call computes as alone (a CPU), which a busy machine's other processes do not
        stretch (None: not measured, no sample); its compute time where calls concatenate (on a
        GPU the kernels and the synchronisation take the time, not this process's CPU)."""
        if self._policy.concatenate:
            self._decider.observe(loss, calls, seconds)
        elif cpu is not None:
            self._decider.observe(loss, calls, cpu)

    async def _compute(self, tenant: str | None, batch: list[Item]) -> None:
        assert self._slots is not None
        compute_duration = self._observe(batch)
        jobs = [item.job for item in batch]
        begin = self.clock()
        self._computing += 1
        try:
            try:
                results, cpu = await asyncio.get_running_loop().run_in_executor(self._pool, self._timed, jobs)
            finally:
                seconds = self.clock() - begin
                compute_duration.observe(seconds)
                self._charge(tenant, seconds)  # before the slot frees: the next choice sees it
                self._computing -= 1
                self._slots.release()
            self._sample(batch[0].job.call.loss, len(batch), seconds, cpu)
            resolve(batch, results)
        except Exception as exc:  # noqa: BLE001 - a bug or a CUDA error: every call of the batch gets it
            fail(batch, exc)

    def _compute_inline(self, tenant: str | None, batch: list[Item]) -> None:
        """``_compute`` on the event loop, for a batch too small to be worth a thread hop; it
        holds a compute slot, released when done."""
        assert self._slots is not None
        compute_duration = self._observe(batch)
        begin = self.clock()
        try:
            try:
                results, cpu = self._timed([item.job for item in batch])
            finally:
                seconds = self.clock() - begin
                compute_duration.observe(seconds)
                self._charge(tenant, seconds)
                self._slots.release()
            self._sample(batch[0].job.call.loss, len(batch), seconds, cpu)
            resolve(batch, results)
        except Exception as exc:  # noqa: BLE001 - as in _compute
            fail(batch, exc)

