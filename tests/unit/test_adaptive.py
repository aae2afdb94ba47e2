"""The per-loss batching decision from measured costs (``adaptive``), with injected costs and times."""

from __future__ import annotations

import pytest

from remoteloss_server.adaptive import ALONE, BATCH, BatchDecider, size_class


def test_size_classes_are_powers_of_two() -> None:
    assert [size_class(n) for n in (1, 2, 3, 4, 7, 8, 63, 64, 100)] == [1, 2, 2, 4, 4, 8, 32, 64, 64]


def test_without_a_batch_estimate_it_batches() -> None:
    decider = BatchDecider()
    decider.observe("mse_loss", 1, 0.001)  # alone: 1 ms per call
    assert decider.decide("mse_loss", 8) == BATCH


def test_it_batches_while_batches_cost_less_per_call() -> None:
    decider = BatchDecider(explore_every=1000)
    decider.observe("mse_loss", 1, 0.001)
    decider.observe("mse_loss", 8, 0.004)  # 0.5 ms per call
    assert decider.estimate("mse_loss", 8) == pytest.approx(0.0005)
    assert [decider.decide("mse_loss", 8) for _ in range(10)] == [BATCH] * 10


def test_it_goes_alone_when_batches_cost_more_per_call() -> None:
    decider = BatchDecider(explore_every=1000)
    decider.observe("mse_loss", 1, 0.001)
    decider.observe("mse_loss", 8, 0.016)  # 2 ms per call
    assert decider.decide("mse_loss", 8) == ALONE
    assert decider.decide("mse_loss", 9) == ALONE  # the same size class
    assert decider.decide("mse_loss", 16) == BATCH  # another class, not measured yet


def test_decisions_are_per_loss() -> None:
    decider = BatchDecider(explore_every=1000)
    decider.observe("mse_loss", 1, 0.001)
    decider.observe("mse_loss", 4, 0.008)
    decider.observe("l1_loss", 1, 0.001)
    decider.observe("l1_loss", 4, 0.002)
    assert (decider.decide("mse_loss", 4), decider.decide("l1_loss", 4)) == (ALONE, BATCH)


def test_every_nth_decision_tries_the_other_route() -> None:
    decider = BatchDecider(explore_every=4)
    decider.observe("mse_loss", 1, 0.001)
    decider.observe("mse_loss", 4, 0.002)
    assert [decider.decide("mse_loss", 4) for _ in range(8)] == [BATCH, BATCH, BATCH, ALONE] * 2
    decider.observe("mse_loss", 4, 0.1)  # batches became slow: the estimate follows, and so does the decision
    for _ in range(20):
        decider.observe("mse_loss", 4, 0.1)
    assert [decider.decide("mse_loss", 4) for _ in range(4)] == [ALONE, ALONE, ALONE, BATCH]


def test_the_estimate_is_a_weighted_mean_that_follows_the_load() -> None:
    decider = BatchDecider(weight=0.5)
    decider.observe("mse_loss", 2, 0.004)  # 2 ms per call
    decider.observe("mse_loss", 2, 0.002)  # 1 ms per call
    assert decider.estimate("mse_loss", 2) == pytest.approx(0.0015)
    assert decider.estimate("mse_loss", 1) is None and decider.estimate("l1_loss", 2) is None


def test_explore_every_must_leave_room_for_the_estimates() -> None:
    with pytest.raises(ValueError, match="explore_every"):
        BatchDecider(explore_every=1)
