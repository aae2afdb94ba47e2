"""What the batcher queues: one call waiting for its batch (``Item``), the calls of one tenant
with one batch key (``Group``), and how a computed batch's results reach their callers (no grpc)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from remoteloss_server.errors import ServiceError
from remoteloss_server.executor import Job, Result

__all__ = ["Group", "Item", "fail", "resolve"]


@dataclass(eq=False)
class Item:
    """One queued call: its job, its size in tensor elements, its deadline and arrival (on the
    batcher's clock), and the future its caller awaits."""

    job: Job
    elements: int
    deadline: float | None
    enqueued: float
    future: asyncio.Future[Result]


@dataclass(eq=False)
class Group:
    """Queued calls of one tenant with one batch key, oldest first."""

    seq: int  # when the group's oldest call arrived, in arrival order across groups
    tenant: str | None
    key: Hashable
    items: deque[Item] = field(default_factory=deque)
    elements: int = 0


def resolve(batch: list[Item], results: Sequence[Result | ServiceError]) -> None:
    """Each call's result (or error) to its caller, unless the caller went away."""
    for item, result in zip(batch, results, strict=True):
        if item.future.done():
            continue
        if isinstance(result, BaseException):
            item.future.set_exception(result)
        else:
            item.future.set_result(result)


def fail(batch: list[Item], exc: Exception) -> None:
    """``exc`` to every caller of a batch that failed as a whole."""
    for item in batch:
        if not item.future.done():
            item.future.set_exception(exc)
