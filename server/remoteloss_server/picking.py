"""``Picker``: how the batcher picks its next batch (a base class of ``Batcher``, which holds the
queues): which tenant's group goes next, whether a group is ready, and how many of its calls the
batch takes, per the caps and the per-loss decision of ``adaptive.BatchDecider``. No grpc."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Iterable

from remoteloss_server.adaptive import ALONE, BatchDecider
from remoteloss_server.errors import DeadlineExceededError
from remoteloss_server.fairness import FairShares
from remoteloss_server.metrics import Metrics
from remoteloss_server.queued import Group, Item
from remoteloss_server.scheduling import SchedulingPolicy

__all__ = ["Picker"]


class Picker:
    """The batcher's state that picking reads, and the picking."""

    _queues: dict[str | None, dict[Hashable, Group]]  # by tenant, then batch key
    _shares: FairShares
    _policy: SchedulingPolicy
    _decider: BatchDecider
    _metrics: Metrics
    _seq: itertools.count[int]
    _closed: bool
    clock: Callable[[], float]

    def _drop(self, group: Group) -> None:
        """Remove an empty group; a tenant without queued groups is no longer active."""
        groups = self._queues[group.tenant]
        del groups[group.key]
        if not groups:
            del self._queues[group.tenant]

    def _choose(self) -> tuple[Group | None, float]:
        """The group to take now: of the tenants with a group ready, the one with the least
        virtual time, and its oldest ready group (then the oldest across tenants); else None and
        the seconds until a group is ready."""
        now = self.clock()
        best: tuple[float, int] | None = None
        chosen: Group | None = None
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

    def _ready(self, groups: dict[Hashable, Group], now: float) -> tuple[Group | None, float]:
        """A tenant's oldest group that is ready: any without a batch delay (or while closing),
        else a full one or one whose oldest call has waited ``max_batch_delay_s``. Else None and
        the seconds until one is ready. (Full groups do not go first: a stream of large calls,
        each a full group alone, would starve a small call's group.)"""
        if self._policy.max_batch_delay_s <= 0 or self._closed:
            return min(groups.values(), key=lambda g: g.seq), 0.0
        ready: Group | None = None
        wait = float("inf")
        for group in groups.values():
            left = 0.0 if self._full(group) else group.items[0].enqueued + self._policy.max_batch_delay_s - now
            if left > 0:
                wait = min(wait, left)
            elif ready is None or group.seq < ready.seq:
                ready = group
        return ready, wait

    def _full(self, group: Group) -> bool:
        calls, elements = self._caps(group)
        return len(group.items) >= calls or group.elements >= elements

    def _caps(self, group: Group) -> tuple[int, int]:
        """The calls and elements a batch of ``group`` may hold. Calls that each compute on the
        event loop take no more than it computes at once (more would add a hop to a compute
        thread that each call alone would not take)."""
        elements = self._policy.max_batch_elements
        inline = self._policy.inline_elements
        if inline and group.items[0].elements <= inline:
            elements = min(elements, inline)
        return self._policy.max_batch_size, elements

    def _limit(self, group: Group) -> tuple[int, int]:
        """How many calls and elements the next batch of ``group`` takes: the caps, or one call
        where the measured costs say the loss's calls are cheaper one at a time (``adaptive``);
        each decision counts in ``remoteloss_batch_decisions_total``."""
        calls, elements = self._caps(group)
        items = group.items
        if not self._policy.batching or len(items) < 2 or items[0].elements + items[1].elements > elements:
            return calls, elements  # no batch of two could form: nothing to decide
        loss = items[0].job.call.loss
        decision = self._decider.decide(loss, _fitting(items, calls, elements))
        self._metrics.child(self._metrics.batch_decisions, loss, decision).inc()
        return (1, elements) if decision == ALONE else (calls, elements)

    def _take(self, group: Group, limit: tuple[int, int]) -> list[Item]:
        """Up to ``limit`` (calls, elements) of ``group``'s calls, oldest first; drops cancelled
        and expired ones."""
        now = self.clock()
        batch: list[Item] = []
        elements = 0
        max_calls, max_elements = limit
        while group.items and len(batch) < max_calls:
            item = group.items[0]
            if batch and not item.future.done() and elements + item.elements > max_elements:
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


def _fitting(items: Iterable[Item], calls: int, elements: int) -> int:
    """How many of ``items``, oldest first, one batch would take within the caps."""
    count = total = 0
    for item in items:
        total += item.elements
        if count >= calls or (count and total > elements):
            break
        count += 1
    return count
