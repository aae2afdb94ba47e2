"""Dynamic batching: a queue of calls, grouped by their batch key and computed together.

``Batcher.submit(call, grad_output, deadline)`` queues a call and waits for its ``Result``.
A loop takes the oldest waiting call's group whenever a compute slot is free (one slot per
compute thread), so a batch forms from what queued while the previous batch computed: no
added latency at low load. ``max_batch_delay_s`` (default 0) holds a group back until its
oldest call has waited that long, unless the group is already full. ``max_batch_size``
(calls) and ``max_batch_elements`` (tensor elements) cap a batch; a larger group leaves the
rest for the next one. Calls whose caller went away are dropped, and calls whose deadline
passed fail with DEADLINE_EXCEEDED, both before anything is computed. ``close()`` refuses new
calls (UNAVAILABLE), computes everything queued and returns when the last batch is done.

Every knob comes from one ``SchedulingPolicy`` (``scheduling``), and the batcher alone decides
where a call computes: a batch of at most ``policy.inline_elements`` tensor elements (a small
batch on a CPU) on the event loop itself, since it takes less time than the hop to a compute
thread and back; larger ones on a compute thread. A call alone in the server (``alone()``, which
the server answers from its in-flight count) that finds the batcher idle is computed at once as a
batch of one, on the spot or on a compute thread (taking a compute slot, as any batch does): at
low load the queue would only add its hops. The loop holds a slot only once work is queued.

Tenants (``submit(..., tenant=...)``, the API key's tenant; None without keys) share the
compute slots by weight (``tenant_weights``, ``fairness.FairShares``): a batch holds one
tenant's calls, its measured compute time (on ``clock``) is charged to that tenant, and the next
batch comes from the tenant with the least virtual time among those with a batch ready to go,
then as above (its oldest ready group). A tenant that was idle starts level with the others,
so a light tenant's call goes next after the batches computing now. Without keys every call is
one tenant, in the order above.

With ``batching=False`` each call is its own batch. Batch keys and the batched computation
come from each loss's ``BatchRule`` (``losses.batching``) and ``Executor.run_batch``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Executor as Pool
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from remoteloss_server.errors import DeadlineExceededError, ServiceError, UnavailableError
from remoteloss_server.executor import Job, Result
from remoteloss_server.fairness import FairShares
from remoteloss_server.losses import LOSSES, Call
from remoteloss_server.losses.batching import Plan
from remoteloss_server.metrics import NO_TENANT, Metrics
from remoteloss_server.scheduling import SchedulingPolicy

__all__ = ["Batcher", "Runner"]

logger = logging.getLogger(__name__)

_DEFAULT_POLICY = SchedulingPolicy()


def _never_alone() -> bool:
    return False



class Runner(Protocol):
    """What the batcher needs of an ``Executor``."""

    device: torch.device

    def run_batch(self, jobs: Sequence[Job]) -> list[Result | ServiceError]: ...


@dataclass(eq=False)
class _Item:
    job: Job
    elements: int
    deadline: float | None
    enqueued: float
    future: asyncio.Future[Result]


@dataclass(eq=False)
class _Group:
    """Queued calls of one tenant with one batch key, oldest first."""

    seq: int  # when the group's oldest call arrived, in arrival order across groups
    tenant: str | None
    key: Hashable
    items: deque[_Item] = field(default_factory=deque)
    elements: int = 0


class Batcher:
    """Groups queued calls by batch key and computes each group on ``pool`` as one batch."""

    def __init__(
        self,
        executor: Runner,
        pool: Pool,
        metrics: Metrics,
        policy: SchedulingPolicy = _DEFAULT_POLICY,
        *,
        alone: Callable[[], bool] = _never_alone,
        tenant_weights: Mapping[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._executor = executor
        self._pool = pool
        self._metrics = metrics
        self._policy = policy
        self._batching = policy.batching
        self._max_size = policy.max_batch_size
        self._max_elements = policy.max_batch_elements
        self._delay = policy.max_batch_delay_s
        self._concurrency = policy.concurrency
        self._alone = alone  # whether the caller of submit() is the only request in flight
        self.clock = clock  # deadlines passed to submit() are on this clock
        self._device = str(executor.device)
        self._queues: dict[str | None, dict[Hashable, _Group]] = {}  # by tenant, then batch key
        self._shares = FairShares(tenant_weights)
        self._seq = itertools.count()
        self._closed = False
        self._wakeup: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self._inline_elements = policy.inline_elements  # batches this small compute on the event loop
        self._children: dict[str, tuple[Any, Any, Any, Any]] = {}  # metrics' label children by loss
        self._computing = 0  # batches computing now

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
        self._slots = asyncio.Semaphore(self._concurrency)
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

        ``tenant``: whose call it is (the API key's tenant; None without keys): its batch holds
        only that tenant's calls, and its compute time is charged to that tenant.

        A call that is alone in the server (``alone()``, still so after one turn of the event
        loop, which lets requests that arrived with it show themselves) on an idle batcher has
        nothing to wait for: it computes at once, without the queue's hops, on the event loop when
        small enough (``policy.inline_elements``), else on a compute thread.

        Raises the call's ServiceError; DeadlineExceededError when the deadline passes before
        its batch starts; UnavailableError once ``close()`` has been called.
        """
        if self._closed or self._loop_task is None or self._wakeup is None:
            raise UnavailableError("the server is shutting down" if self._closed else "the batcher is not running")
        if self.idle and self._alone():
            await asyncio.sleep(0)
        if self.idle and self._alone():
            return await self._compute_now(call, grad_output, deadline, tenant)
        plan = await self._plan(call)
        seq = next(self._seq)
        key: Hashable = plan.key if plan is not None else ("alone", seq)
        elements = max(plan.elements, call.implied_elements) if plan is not None else call.elements
        item = _Item(
            Job(call, grad_output, plan), elements, deadline, self.clock(), asyncio.get_running_loop().create_future()
        )
        groups = self._queues.get(tenant)
        if groups is None:  # the tenant becomes active
            self._shares.activate(tenant)
            groups = self._queues[tenant] = {}
        group = groups.get(key)
        if group is None:
            group = groups[key] = _Group(seq, tenant, key)
        group.items.append(item)
        group.elements += elements
        self._metrics.queue_depth.inc()
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
        """A call alone on an idle batcher, as a batch of one: on the spot when small, else on a
        compute thread, holding a compute slot as the loop's batches do."""
        item = _Item(Job(call, grad_output), call.elements, deadline, self.clock(),
                     asyncio.get_running_loop().create_future())
        self._shares.activate(tenant)
        if item.elements <= self._inline_elements:
            self._compute_inline(tenant, [item], acquired=False)
            return item.future.result()
        assert self._slots is not None
        await self._slots.acquire()  # free (idle), so this does not wait
        self._start_compute(tenant, [item])  # its own task, as the loop's batches: it keeps the slot
        return await item.future  # until the thread is done, even if this caller goes away

    async def _plan(self, call: Call) -> Plan | None:
        """How ``call`` joins a batch (None: alone); a large call's key (digests of its shared
        tensors) is made off the event loop."""
        rule = LOSSES[call.loss].batch if self._batching else None
        if rule is None:
            return None
        large = sum(t.numel() for t in call.tensors.values()) > self._policy.plan_inline_elements
        shared = self._policy.max_shared_elements
        plan = await asyncio.to_thread(rule.plan, call, shared) if large else rule.plan(call, shared)
        if self._closed:
            raise UnavailableError("the server is shutting down")
        return plan

    @property
    def idle(self) -> bool:
        """Whether a call alone in the server would compute at once, without the queue: nothing is
        queued or computing, a compute slot is free and no batch delay is set."""
        slots = self._slots
        return not (self._queues or self._computing or self._delay > 0 or self._closed
                    or slots is None or slots.locked())

    def _forget(self, group: _Group, item: _Item) -> None:
        """Take a cancelled call out of the queue, unless a batch has taken it already."""
        if self._queues.get(group.tenant, {}).get(group.key) is not group or item not in group.items:
            return
        group.items.remove(item)
        group.elements -= item.elements
        self._metrics.queue_depth.dec()
        if not group.items:
            self._drop(group)

    def _drop(self, group: _Group) -> None:
        """Remove an empty group; a tenant without queued groups is no longer active."""
        groups = self._queues[group.tenant]
        del groups[group.key]
        if not groups:
            del self._queues[group.tenant]

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
            if self._inline_elements and sum(item.elements for item in batch) <= self._inline_elements:
                self._compute_inline(tenant, batch)
                continue
            self._start_compute(tenant, batch)

    def _start_compute(self, tenant: str | None, batch: list[_Item]) -> None:
        """``_compute(batch)`` as a task of its own, holding an acquired slot until it is done."""
        task = asyncio.create_task(self._compute(tenant, batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _next_batch(self) -> tuple[str | None, list[_Item]] | None:
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
            batch = self._take(chosen)
            if batch:
                return chosen.tenant, batch

    def _choose(self) -> tuple[_Group | None, float]:
        """The group to take now: of the tenants with a group ready, the one with the least
        virtual time, and its oldest ready group (then the oldest across tenants); else None and
        the seconds until a group is ready."""
        now = self.clock()
        best: tuple[float, int] | None = None
        chosen: _Group | None = None
        wait = float("inf")
        for tenant, groups in self._queues.items():
            group, left = self._ready(groups, now)
            if group is None:
                wait = min(wait, left)
                continue
            rank = (self._shares.virtual_time(tenant), group.seq)
            if best is None or rank < best:
                best, chosen = rank, group
        return chosen, wait

    def _ready(self, groups: dict[Hashable, _Group], now: float) -> tuple[_Group | None, float]:
        """A tenant's oldest group that is ready: any without a batch delay (or while closing),
        else a full one or one whose oldest call has waited ``max_batch_delay_s``. Else None and
        the seconds until one is ready. (Full groups do not go first: a stream of large calls,
        each a full group alone, would starve a small call's group.)"""
        if self._delay <= 0 or self._closed:
            return min(groups.values(), key=lambda g: g.seq), 0.0
        ready: _Group | None = None
        wait = float("inf")
        for group in groups.values():
            left = 0.0 if self._full(group) else group.items[0].enqueued + self._delay - now
            if left > 0:
                wait = min(wait, left)
            elif ready is None or group.seq < ready.seq:
                ready = group
        return ready, wait

    async def _work(self) -> bool:
        """Wait until a call is queued; False once closed with nothing queued."""
        assert self._wakeup is not None
        while not self._queues:
            if self._closed:
                return False
            self._wakeup.clear()
            await self._wakeup.wait()
        return True

    def _full(self, group: _Group) -> bool:
        return len(group.items) >= self._max_size or group.elements >= self._max_elements

    def _take(self, group: _Group) -> list[_Item]:
        """Up to the caps of ``group``'s calls, oldest first; drops cancelled and expired ones."""
        now = self.clock()
        batch: list[_Item] = []
        elements = 0
        while group.items and len(batch) < self._max_size:
            item = group.items[0]
            if batch and not item.future.done() and elements + item.elements > self._max_elements:
                break
            group.items.popleft()
            group.elements -= item.elements
            self._metrics.queue_depth.dec()
            if item.future.done():  # the caller went away
                continue
            if item.deadline is not None and item.deadline <= now:
                item.future.set_exception(
                    DeadlineExceededError(f"{item.job.call.loss}: the deadline passed while the request was queued")
                )
                continue
            batch.append(item)
            elements += item.elements
        if not group.items:
            self._drop(group)
        elif batch:
            group.seq = next(self._seq)  # the rest waits behind the groups queued meanwhile
        return batch

    def _observe(self, batch: list[_Item]) -> Any:
        """Record the batch's queue metrics; return the compute-duration histogram's child."""
        loss = batch[0].job.call.loss
        children = self._children.get(loss)
        if children is None:
            m = self._metrics
            children = self._children[loss] = (
                m.queue_duration.labels(loss), m.batch_requests.labels(loss),
                m.batch_elements.labels(loss), m.compute_duration.labels(loss, self._device),
            )
        queue_duration, batch_requests, batch_elements, compute_duration = children
        started = self.clock()
        for item in batch:
            queue_duration.observe(max(0.0, started - item.enqueued))
        batch_requests.observe(len(batch))
        batch_elements.observe(sum(item.elements for item in batch))
        return compute_duration

    async def _compute(self, tenant: str | None, batch: list[_Item]) -> None:
        assert self._slots is not None
        compute_duration = self._observe(batch)
        jobs = [item.job for item in batch]
        begin = self.clock()
        self._computing += 1
        try:
            try:
                results = await asyncio.get_running_loop().run_in_executor(self._pool, self._executor.run_batch, jobs)
            finally:
                seconds = self.clock() - begin
                compute_duration.observe(seconds)
                self._charge(tenant, seconds)  # before the slot frees: the next choice sees it
                self._computing -= 1
                self._slots.release()
            _resolve(batch, results)
        except Exception as exc:  # noqa: BLE001 - a bug or a CUDA error: every call of the batch gets it
            _fail(batch, exc)

    def _compute_inline(self, tenant: str | None, batch: list[_Item], *, acquired: bool = True) -> None:
        """``_compute`` on the event loop, for a batch too small to be worth a thread hop.
        ``acquired``: the batch holds a compute slot, to release when done."""
        assert self._slots is not None
        compute_duration = self._observe(batch)
        begin = self.clock()
        try:
            try:
                results = self._executor.run_batch([item.job for item in batch])
            finally:
                seconds = self.clock() - begin
                compute_duration.observe(seconds)
                self._charge(tenant, seconds)
                if acquired:
                    self._slots.release()
            _resolve(batch, results)
        except Exception as exc:  # noqa: BLE001 - as in _compute
            _fail(batch, exc)


def _resolve(batch: list[_Item], results: Sequence[Result | ServiceError]) -> None:
    for item, result in zip(batch, results, strict=True):
        if item.future.done():
            continue
        if isinstance(result, BaseException):
            item.future.set_exception(result)
        else:
            item.future.set_result(result)


def _fail(batch: list[_Item], exc: Exception) -> None:
    for item in batch:
        if not item.future.done():
            item.future.set_exception(exc)
