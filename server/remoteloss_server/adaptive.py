"""``BatchDecider``: whether the ready calls of one loss compute as one batch or one at a time,
decided per loss and per load from costs measured online. No grpc, no torch.

A cost sample is a batch's cost per call, as the batcher measures it (``Batcher._sample``): where
each call computes as alone (a CPU), the CPU time of the thread that computed the batch, which
other processes of a busy machine do not stretch (measured for one batch in
``SchedulingPolicy.cpu_sample_every``, drawn at random: two system calls each); where calls
concatenate (a GPU), its compute time as ``remoteloss_compute_duration_seconds`` has it, from the
hop to a compute thread until the results are back. A call computed at once on an idle batcher
is a sample of a call alone. An estimate is the median of the last ``window`` samples, per loss,
for calls alone and per batch size class (powers of two: 2-3, 4-7, ...): one stretched sample
moves no median on its own.

``decide(loss, ready)`` for a loss with ``ready`` >= 2 calls queued: batch unless the alone
estimate beats the batch estimate for that size class by more than ``margin`` (noise must not
take away what batching saves); batch when that class has no estimate yet; and every
``explore_every``-th decision, the other route, so that both estimates keep up with the load (a
route judged worse once is tried again).
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

__all__ = ["ALONE", "BATCH", "BatchDecider", "size_class"]

BATCH = "batch"
ALONE = "alone"


def size_class(calls: int) -> int:
    """The power of two at or below ``calls`` (1 for one call)."""
    return 1 << (max(calls, 1).bit_length() - 1)


@dataclass
class _Costs:
    """One loss's samples: seconds per call by size class (1: alone), and decisions made."""

    samples: dict[int, deque[float]] = field(default_factory=dict)
    decisions: int = 0

    def estimate(self, size: int) -> float | None:
        found = self.samples.get(size)
        return statistics.median(found) if found else None


class BatchDecider:
    """Per loss, the seconds per call alone and in batches (medians of recent samples), and the
    decision."""

    def __init__(self, *, explore_every: int = 32, window: int = 9, margin: float = 0.1) -> None:
        if explore_every < 2:
            raise ValueError("explore_every must be at least 2")
        self._explore_every = explore_every
        self._window = window
        self._margin = margin
        self._costs: dict[str, _Costs] = {}

    def estimate(self, loss: str, calls: int) -> float | None:
        """Seconds per call of a batch of ``calls`` calls (1: alone); None before any sample."""
        costs = self._costs.get(loss)
        return None if costs is None else costs.estimate(size_class(calls))

    def observe(self, loss: str, calls: int, seconds: float) -> None:
        """A batch of ``calls`` calls of ``loss`` took ``seconds`` of the scheduler's time."""
        if calls < 1 or seconds < 0:
            return
        samples = self._costs.setdefault(loss, _Costs()).samples
        found = samples.get(size_class(calls))
        if found is None:
            found = samples[size_class(calls)] = deque(maxlen=self._window)
        found.append(seconds / calls)

    def decide(self, loss: str, ready: int) -> str:
        """``BATCH`` or ``ALONE`` for ``ready`` (>= 2) calls of ``loss`` that could share a batch."""
        costs = self._costs.setdefault(loss, _Costs())
        costs.decisions += 1
        batched, alone = costs.estimate(size_class(ready)), costs.estimate(1)
        if batched is None:
            return BATCH
        preferred = ALONE if alone is not None and alone * (1 + self._margin) < batched else BATCH
        if costs.decisions % self._explore_every == 0:
            return ALONE if preferred == BATCH else BATCH
        return preferred

