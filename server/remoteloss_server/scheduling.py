"""``SchedulingPolicy``: every decision of where and when a call is worked on, in one frozen object.

Built once at start-up for the server's device (``for_device``) and injected: the servicer's
intake reads ``inline_bytes``, the batcher everything else, and the batcher alone decides whether a
call computes at once (on the event loop or on a compute thread) or waits in the queue for a batch.
Sizes are bytes (``_bytes``) or tensor elements (``_elements``); durations seconds (``_s``). No grpc
and no torch here.

The protobuf wire's own threshold, ``remoteloss._wire.SPLIT_BYTES`` (from which a message's tensors
are read and written in place), is a property of the wire format, shared with the SDK, and stays there.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SchedulingPolicy"]

_MiB = 1024 * 1024


@dataclass(frozen=True)
class SchedulingPolicy:
    """Where a call is decoded, computed and encoded, and how calls share a batch."""

    batching: bool = True  # compute queued calls of one batch key together; False: each alone
    # How a batch computes. False (a CPU): each call as it would alone (torch's own function and
    # reduction, so every answer is torch's bits), the calls of one loss in one turn of the
    # compute thread or event loop. True (a GPU): concatenated along the batch dimension with
    # reduction="none", and a call alone takes the same route as a batch of one (docs/DESIGN.md).
    concatenate: bool = False
    # Whether to batch is decided per loss and per load from measured costs (adaptive.py); this
    # many decisions in a row follow the estimates, then one tries the other route again.
    explore_every: int = 32
    # On a CPU a cost sample is the compute thread's CPU time, two system calls a batch: one batch
    # in this many (drawn at random) is measured. The decider keeps medians of recent samples, so
    # it needs them, not every one.
    cpu_sample_every: int = 8
    max_batch_size: int = 64  # calls in one batch
    # Tensor elements in one batch (one call may pass it alone). On a CPU, batches larger than
    # about 2**18 elements fall out of cache and compute slower than their calls alone; on a GPU,
    # batching pays until kernels are large enough to hide their launch.
    max_batch_elements: int = 2**18
    max_batch_delay_s: float = 0.0  # how long a batch may wait for more calls; 0: only what queued meanwhile
    concurrency: int = 1  # batches computing at once (compute threads)
    # A batch of at most this many elements computes on the event loop: on a CPU it takes less
    # time than the hop to a compute thread and back (about 0.1 ms on loopback). 0: never (a GPU,
    # whose synchronisation would block the event loop).
    inline_elements: int = 2**16
    # Requests up to this size are decoded and checked on the event loop, and answers up to it
    # encoded there; larger ones on a helper thread. Below a few MiB the hop costs more than the work.
    inline_bytes: int = 4 * _MiB
    # A call's batch key (digests of its shared tensors) is made on the event loop up to this many
    # elements, on a helper thread above.
    plan_inline_elements: int = 2**20
    # A shared tensor (class weights, a linear_weight) larger than this runs its call alone:
    # comparing it by digest with other calls' would cost more than batching saves.
    max_shared_elements: int = 2**22

    @classmethod
    def for_device(
        cls,
        device_type: str,
        *,
        batching: bool = True,
        max_batch_size: int = 64,
        max_batch_elements: int = 0,
        max_batch_delay_s: float = 0.0,
        concurrency: int = 1,
    ) -> SchedulingPolicy:
        """The policy for a ``"cpu"`` or ``"cuda"`` device; ``max_batch_elements=0`` takes the device's."""
        gpu = device_type == "cuda"
        return cls(
            batching=batching,
            concatenate=gpu,
            max_batch_size=max_batch_size,
            max_batch_elements=max_batch_elements or (2**24 if gpu else 2**18),
            max_batch_delay_s=max_batch_delay_s,
            concurrency=concurrency,
            inline_elements=0 if gpu else 2**16,
        )
