"""A small call alone on an idle batcher, computed on the spot (no grpc).

What ``Batcher`` does with a batch of one on the event loop, without a queue item, a future, a
list or a turn of the event loop: the path of most calls at low load, and of most at high load
too, while requests seldom overlap (each is answered before the next one starts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from remoteloss_server.errors import ServiceError
from remoteloss_server.executor import Job, Result
from remoteloss_server.metrics import Metrics

__all__ = ["compute_alone"]


def compute_alone(
    timed: Callable[[Sequence[Job]], tuple[list[Result | ServiceError], float | None]],
    job: Job,
    elements: int,
    tenant: str | None,
    *,
    metrics: Metrics,
    device: str,
    clock: Callable[[], float],
    charge: Callable[[str | None, float], None],
    sample: Callable[[str, int, float, float | None], None],
) -> Result:
    """``job``'s result (its ServiceError raised), computed now by ``timed`` (the batcher's
    ``run_batch`` that also gives the CPU seconds it took, when it measured them), with the
    metrics of a batch of one (no time queued), its compute time ``charge``d to ``tenant`` and,
    once computed, its cost given to ``sample`` (loss, calls, seconds, CPU seconds or None), as
    the batcher's batches have theirs."""
    loss = job.call.loss
    lane = metrics.batch(loss, device)
    lane.queue_duration.observe(0.0)
    lane.batch_requests.observe(1)
    lane.batch_elements.observe(elements)
    begin = clock()
    try:
        (result,), cpu = timed((job,))
    finally:
        seconds = clock() - begin
        lane.compute_duration.observe(seconds)
        charge(tenant, seconds)
    sample(loss, 1, seconds, cpu)
    if isinstance(result, BaseException):
        raise result
    return result
