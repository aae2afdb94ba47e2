"""The Batcher's queue with a stand-in executor: flush rules, grouping, dropping, draining.

Deterministic: a gate holds the stand-in's first batch, so calls queue behind it in a known
order; deadlines use an injected clock; the one delay test waits in tens of milliseconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from remoteloss import codec
from remoteloss.v1 import loss_pb2 as pb
from remoteloss_server.batcher import Batcher
from remoteloss_server.errors import DeadlineExceededError, ServiceError, UnavailableError
from remoteloss_server.executor import Job, Result
from remoteloss_server.losses import LOSSES, Call
from remoteloss_server.metrics import Metrics
from remoteloss_server.scheduling import SchedulingPolicy


class Runner:
    """Records each batch; the first batch waits at ``gate`` when ``hold`` is set."""

    device = torch.device("cpu")

    def __init__(self, hold: bool = False, fail: BaseException | None = None) -> None:
        self.batches: list[list[Call]] = []
        self.plans: list[Any] = []
        self.started = threading.Event()
        self.gate = threading.Event()
        if not hold:
            self.gate.set()
        self.fail = fail

    def run_batch(self, jobs: Sequence[Job]) -> list[Result | ServiceError]:
        self.batches.append([job.call for job in jobs])
        self.plans.extend(job.plan for job in jobs)
        self.started.set()
        self.gate.wait(10)
        if self.fail is not None:
            raise self.fail
        return [Result(job.call.tensors["input"].sum(), {}, []) for job in jobs]

    def sizes(self) -> list[int]:
        return [len(batch) for batch in self.batches]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def mse(rows: int = 2, value: float = 0.0, loss: str = "mse_loss") -> Call:
    """A prepared call with ``rows`` samples of 2 values (4 * rows elements with its target)."""
    message = getattr(pb, {"mse_loss": "MseLoss", "l1_loss": "L1Loss"}[loss])(
        input=codec.encode(torch.full((rows, 2), value)), target=codec.encode(torch.zeros(rows, 2))
    )
    return LOSSES[loss].prepare(message, "cpu")


def run(test: Callable[..., Awaitable[None]], runner: Runner, *, alone: bool = False, **options: Any) -> Metrics:
    """Run ``test(batcher)`` with a started batcher around ``runner``; close it afterwards.
    ``options`` are the batcher's and its ``SchedulingPolicy``'s; ``alone``: every call is the only
    one in flight (as the server says when nothing else is)."""
    metrics = Metrics()
    fields = {f.name for f in dataclasses.fields(SchedulingPolicy)}
    policy = SchedulingPolicy(**{
        "inline_elements": getattr(runner, "inline_elements", 0), "max_batch_elements": 2**24, "concatenate": True,
        "cpu_sample_every": 1,  # every batch is a cost sample, as the tests of the decision expect
        **{k: v for k, v in options.items() if k in fields},
    })
    others = {k: v for k, v in options.items() if k not in fields}

    async def main() -> None:
        with ThreadPoolExecutor(max_workers=1) as pool:
            batcher = Batcher(runner, pool, metrics, policy, alone=lambda: alone, **others)
            await batcher.start()
            try:
                await test(batcher)
            finally:
                runner.gate.set()
                await batcher.close()

    asyncio.run(main())
    return metrics


async def hold(batcher: Batcher, runner: Runner) -> asyncio.Task[Result]:
    """Occupy the only compute slot with an l1_loss call until ``runner.gate`` opens."""
    task = asyncio.create_task(batcher.submit(mse(loss="l1_loss")))
    await asyncio.to_thread(runner.started.wait, 10)
    return task


async def settle() -> None:
    """Let submitted coroutines reach the queue."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_lone_call_runs_at_once_and_gets_its_result() -> None:
    runner = Runner()

    async def test(batcher: Batcher) -> None:
        result = await asyncio.wait_for(batcher.submit(mse(value=1.0)), 5)
        assert float(result.loss) == 4.0

    run(test, runner)
    assert runner.sizes() == [1]


class InlineRunner(Runner):
    inline_elements = 16  # batches this small compute on the event loop, as a CPU executor's do


def test_a_lone_call_on_an_idle_batcher_is_computed_on_the_spot() -> None:
    runner = InlineRunner()

    async def test(batcher: Batcher) -> None:
        call = mse(value=1.0)
        assert batcher.idle
        submitted = batcher.submit(call)
        with pytest.raises(StopIteration) as finished:  # it never waits: no turn, no queue, no hop
            submitted.send(None)
        assert float(finished.value.value.loss) == 4.0

    metrics = run(test, runner, alone=True)
    assert runner.sizes() == [1]
    assert metrics.registry.get_sample_value("remoteloss_batch_requests_count", {"loss": "mse_loss"}) == 1


def test_a_lone_call_too_large_for_the_event_loop_goes_straight_to_a_compute_thread() -> None:
    runner = InlineRunner(hold=True)

    async def test(batcher: Batcher) -> None:
        lone = asyncio.create_task(batcher.submit(mse(rows=5)))  # 20 elements: on a thread
        await asyncio.to_thread(runner.started.wait, 10)
        assert batcher.queued == 0 and not batcher.idle  # never queued; computing now
        others = [asyncio.create_task(batcher.submit(mse(rows=5, value=i))) for i in (1, 2)]
        await settle()
        assert batcher.queued == 2  # the lone call holds the only slot: these wait in the queue
        lone.cancel()  # its caller goes away; the slot stays taken until the thread is done
        await settle()
        assert batcher.queued == 2
        runner.gate.set()
        results = await asyncio.wait_for(asyncio.gather(*others), 5)
        assert [float(r.loss) for r in results] == [10.0, 20.0]

    run(test, runner, alone=True)
    assert runner.sizes() == [1, 2]  # the two queued calls batched


def test_a_lone_call_queues_behind_a_busy_batcher_and_batches() -> None:
    runner = InlineRunner(hold=True)

    async def test(batcher: Batcher) -> None:
        blocker = asyncio.create_task(batcher.submit(mse(rows=5, loss="l1_loss")))  # on a compute thread
        await asyncio.to_thread(runner.started.wait, 10)
        calls = [mse(rows=1, value=i) for i in range(3)]  # 12 elements: one batch on the event loop
        assert not batcher.idle
        tasks = [asyncio.create_task(batcher.submit(call)) for call in calls]
        await settle()
        assert batcher.queued == 3
        runner.gate.set()
        await asyncio.wait_for(asyncio.gather(blocker, *tasks), 5)

    run(test, runner, alone=True)
    assert runner.sizes() == [1, 3]


def test_a_batch_delay_turns_the_spot_computation_off() -> None:
    async def test(batcher: Batcher) -> None:
        assert not batcher.idle

    run(test, InlineRunner(), max_batch_delay_s=0.01)


def test_what_queued_while_a_batch_computed_forms_the_next_batch() -> None:
    runner = Runner(hold=True)

    async def test(batcher: Batcher) -> None:
        blocker = await hold(batcher, runner)
        calls = [mse(rows=1 + i % 3, value=i) for i in range(5)]  # one key: batch sizes may differ
        tasks = [asyncio.create_task(batcher.submit(call)) for call in calls]
        await settle()
        assert batcher.queued == 5
        runner.gate.set()
        results = await asyncio.wait_for(asyncio.gather(blocker, *tasks), 5)
        assert [float(r.loss) for r in results[1:]] == [float(c.tensors["input"].sum()) for c in calls]
        assert runner.batches[1] == calls  # oldest first

    metrics = run(test, runner)
    assert runner.sizes() == [1, 5]
    assert metrics.registry.get_sample_value("remoteloss_batch_requests_sum", {"loss": "mse_loss"}) == 5
    assert metrics.registry.get_sample_value("remoteloss_batch_requests_count", {"loss": "mse_loss"}) == 1
    assert metrics.registry.get_sample_value("remoteloss_batch_elements_sum", {"loss": "mse_loss"}) == 4 * 9
    assert metrics.registry.get_sample_value("remoteloss_queue_duration_seconds_count", {"loss": "mse_loss"}) == 5
    assert (
        metrics.registry.get_sample_value(
            "remoteloss_compute_duration_seconds_count", {"loss": "mse_loss", "device": "cpu"}
        )
        == 1
    )
    assert metrics.registry.get_sample_value("remoteloss_queue_depth") == 0


def test_groups_by_key_oldest_group_first() -> None:
    runner = Runner(hold=True)

    async def test(batcher: Batcher) -> None:
        blocker = await hold(batcher, runner)
        first, other, second = mse(value=1), mse(rows=2, value=2, loss="l1_loss"), mse(value=3)
        mismatched = mse(rows=1, value=4)
        mismatched = Call(  # one more column: another per-sample shape, another key
            "mse_loss", mismatched.function, {n: torch.zeros(1, 3) for n in ("input", "target")}, mismatched.options, ()
        )
        tasks = [asyncio.create_task(batcher.submit(c)) for c in (first, other, second, mismatched)]
        await settle()
        runner.gate.set()
        await asyncio.wait_for(asyncio.gather(blocker, *tasks), 5)
        assert runner.batches[1:] == [[first, second], [other], [mismatched]]

    run(test, runner)


def test_flush_on_size_leaves_the_rest_for_the_next_batch() -> None:
    runner = Runner(hold=True)

    async def test(batcher: Batcher) -> None:
        blocker = await hold(batcher, runner)
        tasks = [asyncio.create_task(batcher.submit(mse(value=i))) for i in range(5)]
        await settle()
        runner.gate.set()
        await asyncio.wait_for(asyncio.gather(blocker, *tasks), 5)

    run(test, runner, max_batch_size=2)
    assert runner.sizes() == [1, 2, 2, 1]


def test_a_full_group_does_not_wait_for_the_delay() -> None:
    runner = Runner()

    async def test(batcher: Batcher) -> None:
        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(batcher.submit(mse(value=i)) for i in range(3))), 5)
        assert time.monotonic() - started < 5

    run(test, runner, max_batch_size=3, max_batch_delay_s=60.0)
    assert runner.sizes() == [3]


def test_flush_on_elements() -> None:
    runner = Runner(hold=True)

    async def test(batcher: Batcher) -> None:
        blocker = await hold(batcher, runner)
        # 8, 8, 8 and 24 elements with a cap of 16: [8, 8], [8], [24] (a call alone may exceed it)
        calls = [mse(rows=2), mse(rows=2), mse(rows=2), mse(rows=6)]
        tasks = [asyncio.create_task(batcher.submit(c)) for c in calls]
        await settle()
        runner.gate.set()
        await asyncio.wait_for(asyncio.gather(blocker, *tasks), 5)

    run(test, runner, max_batch_elements=16)
    assert runner.sizes() == [1, 2, 1, 1]


def test_flush_on_delay_gathers_calls_that_arrive_within_it() -> None:
    runner = Runner()
    loads: list[float] = []

    async def test(batcher: Batcher) -> None:
        started = time.monotonic()
        first = asyncio.create_task(batcher.submit(mse(value=1)))
        await asyncio.sleep(0.02)
        second = asyncio.create_task(batcher.submit(mse(value=2)))
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        loads.append(time.monotonic() - started)

    run(test, runner, max_batch_delay_s=0.1)
    assert runner.sizes() == [2]
    assert loads[0] >= 0.1


def test_without_delay_an_idle_batcher_does_not_wait() -> None:
    runner = Runner()

    async def test(batcher: Batcher) -> None:
        first = asyncio.create_task(batcher.submit(mse(value=1)))
        await asyncio.wait_for(first, 5)
        await asyncio.wait_for(batcher.submit(mse(value=2)), 5)

    run(test, runner)
    assert runner.sizes() == [1, 1]


def test_cancelled_calls_are_skipped() -> None:
    runner = Runner(hold=True)

    async def test(batcher: Batcher) -> None:
        blocker = await hold(batcher, runner)
        kept, dropped = mse(value=1), mse(value=2)
        tasks = [asyncio.create_task(batcher.submit(c)) for c in (dropped, kept)]
        await settle()
        tasks[0].cancel()
        await settle()
        runner.gate.set()
        result = await asyncio.wait_for(tasks[1], 5)
        assert float(result.loss) == 4.0
        await blocker
        with pytest.raises(asyncio.CancelledError):
            await tasks[0]
        assert runner.batches[1] == [kept]

    metrics = run(test, runner)
    assert metrics.registry.get_sample_value("remoteloss_queue_depth") == 0


def test_expired_calls_fail_with_deadline_exceeded_before_compute() -> None:
    runner = Runner(hold=True)
    clock = Clock()

    async def test(batcher: Batcher) -> None:
        blocker = await hold(batcher, runner)
        late, timely, open_ended = mse(value=1), mse(value=2), mse(value=3)
        tasks = [
            asyncio.create_task(batcher.submit(late, deadline=clock() + 1.0)),
            asyncio.create_task(batcher.submit(timely, deadline=clock() + 10.0)),
            asyncio.create_task(batcher.submit(open_ended)),
        ]
        await settle()
        clock.now += 5.0
        runner.gate.set()
        with pytest.raises(DeadlineExceededError, match="mse_loss: the deadline passed"):
            await asyncio.wait_for(tasks[0], 5)
        await asyncio.wait_for(asyncio.gather(blocker, *tasks[1:]), 5)
        assert runner.batches[1] == [timely, open_ended]

    run(test, runner, clock=clock)


def test_close_drains_the_queue_then_refuses_new_calls() -> None:
    runner = Runner()
    metrics = Metrics()

    async def main() -> None:
        with ThreadPoolExecutor(max_workers=1) as pool:
            policy = SchedulingPolicy(max_batch_size=2, max_batch_delay_s=60.0, inline_elements=0)
            batcher = Batcher(runner, pool, metrics, policy)
            with pytest.raises(UnavailableError, match="not running"):
                await batcher.submit(mse())
            await batcher.start()
            tasks = [asyncio.create_task(batcher.submit(mse(value=i))) for i in range(3)]
            await settle()  # two go at once (a full batch); the third waits for the delay
            closing = asyncio.create_task(batcher.close())
            await settle()
            with pytest.raises(UnavailableError, match="shutting down"):
                await batcher.submit(mse())
            await asyncio.wait_for(closing, 5)  # no waiting for the delay while draining
            assert all(task.done() for task in tasks)
            await asyncio.gather(*tasks)

    asyncio.run(main())
    assert runner.sizes() == [2, 1]


def test_without_batching_each_call_is_its_own_batch() -> None:
    runner = Runner(hold=True)

    async def test(batcher: Batcher) -> None:
        blocker = await hold(batcher, runner)
        tasks = [asyncio.create_task(batcher.submit(mse(value=i))) for i in range(3)]
        await settle()
        runner.gate.set()
        await asyncio.wait_for(asyncio.gather(blocker, *tasks), 5)

    metrics = run(test, runner, batching=False)
    assert runner.sizes() == [1, 1, 1, 1]
    assert metrics.registry.get_sample_value(
        "remoteloss_batch_decisions_total", {"loss": "mse_loss", "decision": "batch"}
    ) is None  # nothing to decide


def test_on_a_cpu_calls_of_one_loss_share_a_batch_whatever_their_shapes() -> None:
    """Without concatenation (a CPU) each call computes as alone, so the group is the loss."""
    runner = Runner(hold=True)

    async def test(batcher: Batcher) -> None:
        blocker = await hold(batcher, runner)
        calls = [mse(rows=1), mse(rows=2, loss="l1_loss"), mse(rows=3), mse(rows=4)]
        calls[2] = Call("mse_loss", calls[2].function, {n: torch.zeros(3, 5) for n in ("input", "target")},
                        calls[2].options, ("input",))  # another per-sample shape, and a gradient
        tasks = [asyncio.create_task(batcher.submit(c)) for c in calls]
        await settle()
        runner.gate.set()
        await asyncio.wait_for(asyncio.gather(blocker, *tasks), 5)
        assert runner.batches[1:] == [[calls[0], calls[2], calls[3]], [calls[1]]]
        assert all(job_plan is None for job_plan in runner.plans)  # no plan: nothing is concatenated
        # Each batch's compute time is a cost sample of its loss, by batch size class.
        assert batcher._decider.estimate("mse_loss", 3) is not None
        assert batcher._decider.estimate("l1_loss", 1) is not None

    metrics = run(test, runner, concatenate=False)
    assert metrics.registry.get_sample_value(
        "remoteloss_batch_decisions_total", {"loss": "mse_loss", "decision": "batch"}
    ) == 1


def test_calls_that_each_compute_on_the_event_loop_batch_no_more_than_it_takes_at_once() -> None:
    runner = InlineRunner(hold=True)

    async def test(batcher: Batcher) -> None:
        blocker = asyncio.create_task(batcher.submit(mse(rows=5, loss="l1_loss")))  # on a compute thread
        await asyncio.to_thread(runner.started.wait, 10)
        tasks = [asyncio.create_task(batcher.submit(mse(value=i))) for i in range(3)]  # 8 elements each
        await settle()
        runner.gate.set()
        await asyncio.wait_for(asyncio.gather(blocker, *tasks), 5)

    run(test, runner, alone=True)
    assert runner.sizes() == [1, 2, 1]  # 16 elements at most: on the event loop, as each alone would be


def test_where_batches_cost_more_per_call_the_calls_go_one_at_a_time() -> None:
    runner = Runner(hold=True)

    async def test(batcher: Batcher) -> None:
        for calls in (2, 4):  # measured: alone 1 ms per call, in batches 4 ms per call
            batcher._decider.observe("mse_loss", calls, 0.004 * calls)
        batcher._decider.observe("mse_loss", 1, 0.001)
        blocker = await hold(batcher, runner)
        tasks = [asyncio.create_task(batcher.submit(mse(value=i))) for i in range(4)]
        await settle()
        runner.gate.set()
        await asyncio.wait_for(asyncio.gather(blocker, *tasks), 5)

    metrics = run(test, runner)
    assert runner.sizes() == [1, 1, 1, 1, 1]
    decisions = {
        decision: metrics.registry.get_sample_value(
            "remoteloss_batch_decisions_total", {"loss": "mse_loss", "decision": decision}
        )
        for decision in ("batch", "alone")
    }
    assert decisions == {"batch": None, "alone": 3}  # 4, 3 and 2 calls queued; the last one alone


def test_unexpected_failures_reach_every_call_of_the_batch() -> None:
    runner = Runner(fail=KeyError("bug"))

    async def test(batcher: Batcher) -> None:
        outcomes = await asyncio.gather(*(batcher.submit(mse(value=i)) for i in range(2)), return_exceptions=True)
        assert all(isinstance(o, KeyError) for o in outcomes)
        runner.fail = None
        assert float((await batcher.submit(mse(value=1))).loss) == 4.0  # the loop goes on

    run(test, runner)


def test_concurrency_runs_batches_side_by_side() -> None:
    runner = Runner(hold=True)
    metrics = Metrics()

    async def main() -> None:
        with ThreadPoolExecutor(max_workers=2) as pool:
            batcher = Batcher(runner, pool, metrics, SchedulingPolicy(concurrency=2, inline_elements=0))
            await batcher.start()
            blocker = await hold(batcher, runner)
            other = asyncio.create_task(batcher.submit(mse()))
            for _ in range(100):  # the second slot takes it while the first batch is held
                if len(runner.batches) == 2:
                    break
                await asyncio.sleep(0.01)
            assert len(runner.batches) == 2
            runner.gate.set()
            await asyncio.gather(blocker, other)
            await batcher.close()

    asyncio.run(main())


# ------------------------------------------------------------------------------------ tenants


class CostRunner(Runner):
    """Each batch costs ``cost`` seconds of the injected clock, so compute charges are exact."""

    def __init__(self, clock: Clock, cost: float = 1.0, hold: bool = False) -> None:
        super().__init__(hold=hold)
        self.clock = clock
        self.cost = cost

    def run_batch(self, jobs: Sequence[Job]) -> list[Result | ServiceError]:
        results = super().run_batch(jobs)
        self.clock.now += self.cost
        return results


def tenant_of(calls: dict[int, str | None], batch: list[Call]) -> str | None:
    (tenant,) = {calls[id(call)] for call in batch}  # a batch holds one tenant's calls
    return tenant


async def queue(
    batcher: Batcher, calls: dict[int, str | None], tenant: str | None, n: int
) -> list[asyncio.Task[Result]]:
    tasks = []
    for i in range(n):
        call = mse(value=i)
        calls[id(call)] = tenant
        tasks.append(asyncio.create_task(batcher.submit(call, tenant=tenant)))
    await settle()
    return tasks


def test_tenants_share_compute_time_by_weight() -> None:
    clock = Clock()
    runner = CostRunner(clock, hold=True)
    calls: dict[int, str | None] = {}

    async def test(batcher: Batcher) -> None:
        blocker = await hold(batcher, runner)
        tasks = [*await queue(batcher, calls, "alice", 30), *await queue(batcher, calls, "bob", 30)]
        runner.gate.set()
        await asyncio.wait_for(asyncio.gather(blocker, *tasks), 5)

    metrics = run(test, runner, max_batch_size=1, tenant_weights={"alice": 3.0}, clock=clock)
    order = [tenant_of(calls, batch) for batch in runner.batches[1:]]
    assert order[:16].count("alice") == 12 and order[16:32].count("alice") == 12  # 3:1 while both queue
    assert order[-20:] == ["bob"] * 20  # alice is done: bob gets it all, nothing is held back
    assert metrics.registry.get_sample_value("remoteloss_tenant_compute_seconds_total", {"tenant": "alice"}) == 30
    assert metrics.registry.get_sample_value("remoteloss_tenant_compute_seconds_total", {"tenant": "none"}) == 1


def test_a_tenant_that_was_idle_banks_no_credit() -> None:
    clock = Clock()
    runner = CostRunner(clock, hold=True)
    calls: dict[int, str | None] = {}

    async def test(batcher: Batcher) -> None:
        runner.gate.set()
        for _ in range(10):  # alice alone for 10 s of compute, while bob is idle
            await batcher.submit(mse(), tenant="alice")
        runner.gate.clear()
        runner.started.clear()
        blocker = asyncio.create_task(batcher.submit(mse(), tenant="alice"))
        await asyncio.to_thread(runner.started.wait, 10)
        tasks = [*await queue(batcher, calls, "alice", 4), *await queue(batcher, calls, "bob", 4)]
        assert batcher.virtual_time("bob") == batcher.virtual_time("alice") == 10.0
        runner.gate.set()
        await asyncio.wait_for(asyncio.gather(blocker, *tasks), 5)

    run(test, runner, max_batch_size=1, clock=clock)
    order = [tenant_of(calls, batch) for batch in runner.batches[11:]]
    assert order == ["bob", "alice"] * 4  # turns from the start, not bob's 10 s first


def test_a_light_tenant_goes_next_after_the_current_batch() -> None:
    clock = Clock()
    runner = CostRunner(clock, hold=True)
    calls: dict[int, str | None] = {}

    async def test(batcher: Batcher) -> None:
        heavy = await queue(batcher, calls, "heavy", 1)
        await asyncio.to_thread(runner.started.wait, 10)
        heavy += await queue(batcher, calls, "heavy", 20)  # 20 queued behind the one computing
        light = await queue(batcher, calls, "light", 1)
        runner.gate.set()
        await asyncio.wait_for(asyncio.gather(*heavy, *light), 5)

    run(test, runner, max_batch_size=1, clock=clock)
    order = [tenant_of(calls, batch) for batch in runner.batches]
    assert order[:3] == ["heavy", "light", "heavy"]


def test_tenants_never_share_a_batch() -> None:
    runner = Runner(hold=True)
    calls: dict[int, str | None] = {}

    async def test(batcher: Batcher) -> None:
        blocker = await hold(batcher, runner)
        tasks = [*await queue(batcher, calls, "alice", 3), *await queue(batcher, calls, "bob", 2),
                 *await queue(batcher, calls, "alice", 1)]
        runner.gate.set()
        await asyncio.wait_for(asyncio.gather(blocker, *tasks), 5)

    run(test, runner)
    assert [(tenant_of(calls, b), len(b)) for b in runner.batches[1:]] == [("alice", 4), ("bob", 2)]


def test_a_lone_call_is_charged_to_its_tenant() -> None:
    clock = Clock()
    runner = CostRunner(clock, cost=0.5)

    async def test(batcher: Batcher) -> None:
        await batcher.submit(mse(), tenant="alice")
        await batcher.submit(mse(rows=5), tenant="alice")  # too large for the event loop
        assert batcher.virtual_time("alice") == 1.0 / 4

    metrics = run(test, runner, alone=True, tenant_weights={"alice": 4.0}, clock=clock)
    assert metrics.registry.get_sample_value("remoteloss_tenant_compute_seconds_total", {"tenant": "alice"}) == 1.0


def test_a_tenant_waiting_out_the_batch_delay_lets_another_go() -> None:
    clock = Clock()
    runner = CostRunner(clock, cost=0.1, hold=True)
    calls: dict[int, str | None] = {}

    async def test(batcher: Batcher) -> None:
        first = await queue(batcher, calls, "early", 2)  # a full group: computes at once, held at the gate
        await asyncio.to_thread(runner.started.wait, 10)
        late = await queue(batcher, calls, "late", 1)  # older, but not full: it waits out its delay
        more = await queue(batcher, calls, "early", 2)
        runner.gate.set()
        await asyncio.wait_for(asyncio.gather(*first, *more), 5)
        assert not late[0].done()
        clock.now += 2.0  # past its delay: the loop sees it when its timer (1 s, as it computed) fires
        await asyncio.wait_for(asyncio.gather(*late), 5)

    run(test, runner, max_batch_size=2, max_batch_delay_s=1.0, clock=clock)
    assert [tenant_of(calls, b) for b in runner.batches] == ["early", "early", "late"]


def test_large_calls_do_not_starve_a_small_one_queued_before_them() -> None:
    runner = Runner(hold=True)

    async def test(batcher: Batcher) -> None:
        blocker = await hold(batcher, runner)
        large = [mse(rows=6, value=i) for i in range(4)]  # 24 elements each, over the cap: each group full
        small = mse(rows=1, loss="l1_loss")  # another key; never full
        tasks = [asyncio.create_task(batcher.submit(c)) for c in (large[0], small, *large[1:])]
        await settle()
        runner.gate.set()
        await asyncio.wait_for(asyncio.gather(blocker, *tasks), 5)
        assert [batch[0] for batch in runner.batches[1:3]] == [large[0], small]  # in arrival order

    run(test, runner, max_batch_elements=16, max_batch_size=1)
