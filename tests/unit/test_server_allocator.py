"""allocator.configure (glibc's mallopt) and the ``malloc_mmap_threshold_bytes`` setting."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest
from remoteloss_server import allocator, app, cli
from remoteloss_server.config import ServerConfig

glibc_only = pytest.mark.skipif(not allocator.is_glibc(), reason="mallopt is glibc's")


def test_zero_keeps_glibc_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda *a: pytest.fail("mallopt must not be called"))
    assert allocator.configure(0) is False


@pytest.mark.parametrize("value", [-1, allocator.MAX_THRESHOLD_BYTES + 1])
def test_out_of_range(value: int) -> None:
    with pytest.raises(ValueError, match="mmap threshold"):
        allocator.configure(value)


def test_elsewhere_than_glibc_nothing_happens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "is_glibc", lambda: False)
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda *a: pytest.fail("mallopt must not be called"))
    assert allocator.configure(64 * 1024 * 1024) is False


@glibc_only
def test_large_blocks_come_from_the_heap_once_configured() -> None:
    """In a fresh interpreter (the setting is process-wide): a 48 MiB block is mmapped by default
    (mallinfo2's hblks counts mmapped blocks) and comes from the heap after configure(64 MiB)."""
    script = textwrap.dedent(
        """
        import ctypes, sys
        from remoteloss_server import allocator

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in
                        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = MallInfo2
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]

        def mmapped_by(size):
            before = libc.mallinfo2().hblks
            block = libc.malloc(size)
            after = libc.mallinfo2().hblks
            libc.free(block)
            return after - before

        default = mmapped_by(48 << 20)
        applied = allocator.configure(64 << 20)
        print(default, applied, mmapped_by(48 << 20))
        """
    )
    answer = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert answer.stdout.split() == ["1", "True", "0"]


@pytest.mark.parametrize("value", [-1, 2**30 + 1])
def test_config_rejects(value: int) -> None:
    with pytest.raises(ValueError, match="^malloc_mmap_threshold_bytes must be in"):
        ServerConfig(malloc_mmap_threshold_bytes=value).validate()


def test_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[ServerConfig] = []
    monkeypatch.setattr(app, "serve", served.append)
    monkeypatch.setenv("REMOTELOSS_MALLOC_MMAP_THRESHOLD_BYTES", "1048576")
    assert cli.main([]) == 0
    assert cli.main(["--malloc-mmap-threshold-bytes", "0"]) == 0
    assert [config.malloc_mmap_threshold_bytes for config in served] == [1048576, 0]
    assert ServerConfig().malloc_mmap_threshold_bytes == 256 * 1024 * 1024


def test_serve_configures_the_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    configured: list[int] = []

    async def no_server(*args: Any) -> None:
        return None

    monkeypatch.setattr(allocator, "configure", configured.append)
    monkeypatch.setattr(app, "_serve", no_server)
    app.serve(ServerConfig(port=0, malloc_mmap_threshold_bytes=12345))
    assert configured == [12345]


@glibc_only
def test_thread_arenas_give_back_their_tops() -> None:
    """In a fresh interpreter, once configured: two pool threads each write and free 32 MiB, which
    stays at the top of each one's arena; ``trim()`` leaves it there, ``trim_thread_arenas`` gives
    it back."""
    script = textwrap.dedent(
        """
        import asyncio, ctypes
        from remoteloss_server import allocator

        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        MiB = 1 << 20

        def burst():
            block = libc.malloc(32 * MiB)
            ctypes.memset(block, 1, 32 * MiB)
            libc.free(block)

        async def main():
            pool = allocator.TrimmablePool(2)
            await allocator.trim_thread_arenas([pool])  # no thread yet: nothing to do
            allocator.configure(256 * MiB)
            start = allocator.resident_bytes()
            loop = asyncio.get_running_loop()
            barrier = __import__("threading").Barrier(2)
            await asyncio.gather(*(loop.run_in_executor(pool, lambda: (barrier.wait(), burst())) for _ in range(2)))
            kept = allocator.resident_bytes()
            allocator.trim()
            trimmed = allocator.resident_bytes()
            await allocator.trim_thread_arenas([pool])
            print(pool.started, (kept - start) // MiB, (trimmed - start) // MiB, (allocator.resident_bytes() - start) // MiB)

        asyncio.run(main())
        """
    )
    answer = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    started, kept, trimmed, after = map(int, answer.stdout.split())
    assert started == 2
    assert kept >= 60 and trimmed >= 60, answer.stdout  # trim() does not reach a thread arena's top
    assert after <= 8, answer.stdout


@glibc_only
def test_the_arenas_of_exited_threads_give_back_their_tops() -> None:
    """In a fresh interpreter, once configured: two threads of no pool (as gRPC's own) each write
    and free 32 MiB, then exit; their arenas keep it, and no thread holds them. ``trim()`` leaves
    it, ``trim_thread_arenas`` gives it back (through the threads it starts)."""
    script = textwrap.dedent(
        """
        import asyncio, ctypes, threading
        from remoteloss_server import allocator

        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        MiB = 1 << 20

        def burst(barrier):
            barrier.wait()
            block = libc.malloc(32 * MiB)
            ctypes.memset(block, 1, 32 * MiB)
            libc.free(block)

        async def main():
            allocator.configure(256 * MiB)
            start = allocator.resident_bytes()
            barrier = threading.Barrier(2)
            threads = [threading.Thread(target=burst, args=(barrier,)) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            kept = allocator.resident_bytes()
            allocator.trim()
            trimmed = allocator.resident_bytes()
            await allocator.trim_thread_arenas([])
            print((kept - start) // MiB, (trimmed - start) // MiB, (allocator.resident_bytes() - start) // MiB)

        asyncio.run(main())
        """
    )
    answer = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    kept, trimmed, after = map(int, answer.stdout.split())
    assert kept >= 60 and trimmed >= 60, answer.stdout  # trim() does not reach a thread arena's top
    assert after <= 8, answer.stdout
