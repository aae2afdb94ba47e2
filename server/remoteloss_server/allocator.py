"""glibc malloc tuning for large tensors, applied once when ``remoteloss-server`` starts.

By default glibc serves every allocation above its mmap threshold (128 KiB, adjusted upward up to
32 MiB as such blocks are freed) with a fresh ``mmap`` and gives it back with ``munmap`` when
freed, and it returns free memory at the top of the heap to the kernel once more than twice that
threshold is free. A request of tens of MiB is copied several times on its way through gRPC,
protobuf and torch, so every large request then pays page faults for each copy, on fresh pages
the kernel must zero. ``configure(threshold)`` raises the mmap threshold to ``threshold`` bytes
and the trim threshold to twice that, so buffers up to ``threshold`` are reused from the heap;
the cost is that memory freed after a burst stays with the process (up to the trim threshold
per arena) instead of going back to the kernel at once; ``trim()`` gives it back, and the server
calls it when it is quiet, with ``trim_thread_arenas`` for what ``trim()`` cannot reach: the free
memory at the top of each helper and compute thread's own arena.

``bench/RESULTS.md`` has the measurements behind the default. Only glibc has ``mallopt``;
elsewhere ``configure`` does nothing. No torch and no grpc here.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

__all__ = [
    "MAX_THRESHOLD_BYTES",
    "TrimmablePool",
    "configure",
    "free_heap_bytes",
    "give_back_when_quiet",
    "is_glibc",
    "resident_bytes",
    "trim",
    "trim_thread_arenas",
]

logger = logging.getLogger(__name__)

# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1
MAX_THRESHOLD_BYTES = 2**30  # mallopt takes a C int, and the trim threshold is twice this
QUIET_BYTES = 1024 * 1024  # bytes in flight under which the server counts as quiet
TRIM_SLACK_BYTES = 16 * 1024 * 1024  # a change in free heap bytes or RSS that makes another trim worth it
# Freed into a thread's arena, a block this large (glibc: from 64 KiB, merged) makes glibc look at
# the arena's top; it is also the trim threshold while trim_thread_arenas runs.
_TOP_TRIM_BLOCK_BYTES = 128 * 1024
_BARRIER_S = 0.1  # how long a pool's threads wait for each other in trim_thread_arenas
# New threads that trim_thread_arenas starts for the arenas of exited threads: glibc makes at most
# 8 arenas per CPU on 64-bit hosts, but gRPC's threads that come and go leave a few.
_SPARE_THREADS = 8
_trim_threshold_bytes = 0  # what configure() set; 0: glibc's own thresholds, which trim thread arenas themselves


def is_glibc() -> bool:
    """Whether this process runs on glibc (not musl, not macOS)."""
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError):
        return False


def configure(mmap_threshold_bytes: int) -> bool:
    """Set glibc's mmap threshold to ``mmap_threshold_bytes`` and its trim threshold to twice
    that (at most INT_MAX); 0 leaves glibc's defaults. Returns whether anything was set.

    Raises ValueError for a value outside [0, MAX_THRESHOLD_BYTES].
    """
    if not 0 <= mmap_threshold_bytes <= MAX_THRESHOLD_BYTES:
        raise ValueError(f"mmap threshold must be in [0, {MAX_THRESHOLD_BYTES}] bytes, got {mmap_threshold_bytes}")
    if mmap_threshold_bytes == 0:
        return False
    if not is_glibc():
        logger.info("event=malloc_tuning applied=false reason=not_glibc")
        return False
    libc = ctypes.CDLL(None)  # the C library this process already uses
    trim = min(2 * mmap_threshold_bytes, _INT_MAX)
    applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold_bytes)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, trim)
    )
    global _trim_threshold_bytes
    _trim_threshold_bytes = trim if applied and mmap_threshold_bytes > _TOP_TRIM_BLOCK_BYTES else 0
    logger.info(
        "event=malloc_tuning applied=%s mmap_threshold_bytes=%d trim_threshold_bytes=%d",
        str(applied).lower(), mmap_threshold_bytes, trim,
    )
    return applied


def trim() -> bool:
    """Give the heap's free memory back to the kernel (``malloc_trim(0)``: every arena, free
    pages inside the heap too); glibc only. Returns whether any memory was released.

    It holds each arena's lock while it works (milliseconds for a heap of hundreds of MiB), so
    the server calls it off the event loop, and only when quiet (``give_back_when_quiet``).
    """
    if not is_glibc():
        return False
    return bool(ctypes.CDLL(None).malloc_trim(0))


class TrimmablePool(ThreadPoolExecutor):
    """A ThreadPoolExecutor that counts the threads it has started (``started``), so that
    ``trim_thread_arenas`` can reach each of them."""

    def __init__(self, max_workers: int | None = None, thread_name_prefix: str = "") -> None:
        self.started = 0
        self._counting = threading.Lock()
        super().__init__(max_workers, thread_name_prefix, initializer=self._count)

    def _count(self) -> None:
        with self._counting:
            self.started += 1


async def trim_thread_arenas(pools: Sequence[TrimmablePool]) -> None:
    """Give back the free memory at the top of each pool thread's own arena, and of each arena
    whose threads have exited, which ``trim()`` leaves: glibc trims a thread arena's top only
    when a block is freed into that arena while the top exceeds the trim threshold, and
    ``configure`` sets that threshold high (without this, the buffers of a burst of large
    requests stay with the helper and compute threads: 42-60 MiB in all after 100 unread 16 MiB
    answers; and with the arenas that gRPC's own threads, which come and go, left: 26-115 MiB
    after bursts of 8 callers' 32 MiB requests). So, for the moment, the threshold is lowered,
    and every thread of each pool frees one block of its own; the threads wait for each other
    (at most ``_BARRIER_S``) so that each takes one. Then ``_SPARE_THREADS`` new threads do
    the same: glibc gives a starting thread an arena that no thread holds, if there is one.
    Does nothing unless ``configure`` applied a threshold."""
    restore = _trim_threshold_bytes
    if restore == 0:
        return
    libc = ctypes.CDLL(None)
    loop = asyncio.get_running_loop()
    libc.mallopt(_M_TRIM_THRESHOLD, _TOP_TRIM_BLOCK_BYTES)
    try:
        for pool in pools:
            if threads := pool.started:
                barrier = threading.Barrier(threads)
                await asyncio.gather(*(loop.run_in_executor(pool, _free_a_block, barrier) for _ in range(threads)))
        await asyncio.to_thread(_free_in_spare_threads, _SPARE_THREADS)
    finally:
        libc.mallopt(_M_TRIM_THRESHOLD, restore)


def _free_in_spare_threads(count: int) -> None:
    """``count`` new threads, alive at once, each freeing a block of its own arena; and this
    thread too (it may be new, and have taken such an arena itself)."""
    barrier = threading.Barrier(count)
    threads = [threading.Thread(target=_free_a_block, args=(barrier,), name="remoteloss-trim") for _ in range(count)]
    started = []
    for thread in threads:
        try:
            thread.start()
        except RuntimeError:  # no more threads may start now: those that did still trim
            barrier.abort()
            break
        started.append(thread)
    for thread in started:
        thread.join()
    _free_a_block(threading.Barrier(1))


def _free_a_block(barrier: threading.Barrier) -> None:
    """On a pool thread (or a spare one), once the others have all arrived (a busy one is not
    waited for long): a block of this thread's arena, freed, so that glibc trims that arena's top."""
    try:
        barrier.wait(_BARRIER_S)
    except threading.BrokenBarrierError:
        pass
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.free(libc.malloc(_TOP_TRIM_BLOCK_BYTES))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
    )]


def free_heap_bytes() -> int:
    """Bytes the heap holds free (``mallinfo2().fordblks``: kept for reuse, whether or not a trim
    has handed their pages back); 0 where glibc lacks ``mallinfo2`` (before 2.33)."""
    if not is_glibc():
        return 0
    mallinfo2 = getattr(ctypes.CDLL(None), "mallinfo2", None)
    if mallinfo2 is None:
        return 0
    mallinfo2.restype = _MallInfo2
    return int(mallinfo2().fordblks)


def resident_bytes() -> int:
    """This process's resident set size, from ``/proc/self/statm`` (0 where there is none)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


async def give_back_when_quiet(
    take_peak: Callable[[], int], interval_s: float = 2.0, pools: Sequence[TrimmablePool] = ()
) -> None:
    """Give freed memory back to the kernel once the server is quiet, as jemalloc's background
    purging does: every ``interval_s``, when no more than ``QUIET_BYTES`` were in flight since the
    last look (``take_peak()``, the server's in-flight budgets) and, since the last trim, the heap's
    free bytes changed or the process grew by ``TRIM_SLACK_BYTES``, ``trim()`` (on a thread, as the
    look at the heap: both take glibc's arena locks), then ``trim_thread_arenas(pools)``. Without
    it, the heap a burst grew (glibc keeps up to its trim threshold) stays with the process after
    the callers are gone, also after bytes that gRPC alone held, such as stalled requests. Runs
    until cancelled."""
    free_at, resident_at = 0, 0  # after the last trim
    while True:
        await asyncio.sleep(interval_s)
        if take_peak() > QUIET_BYTES:
            continue
        free = await asyncio.to_thread(free_heap_bytes)
        if abs(free - free_at) < TRIM_SLACK_BYTES and resident_bytes() - resident_at < TRIM_SLACK_BYTES:
            continue
        await asyncio.to_thread(trim)
        await trim_thread_arenas(pools)
        free_at, resident_at = free, resident_bytes()
