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
    decider = BatchDecider(explore_every=4, window=3)
    decider.observe("mse_loss", 1, 0.001)
    decider.observe("mse_loss", 4, 0.002)
    assert [decider.decide("mse_loss", 4) for _ in range(8)] == [BATCH, BATCH, BATCH, ALONE] * 2
    for _ in range(3):  # batches became slow: the estimate follows, and so does the decision
        decider.observe("mse_loss", 4, 0.1)
    assert [decider.decide("mse_loss", 4) for _ in range(4)] == [ALONE, ALONE, ALONE, BATCH]


def test_the_estimate_is_the_median_of_recent_samples() -> None:
    decider = BatchDecider(window=3)
    for seconds in (0.002, 0.050, 0.004):  # one batch stretched by a busy machine
        decider.observe("mse_loss", 2, seconds)
    assert decider.estimate("mse_loss", 2) == pytest.approx(0.002)  # per call: 1, 25, 2 ms
    decider.observe("mse_loss", 2, 0.006)  # the oldest sample leaves the window
    assert decider.estimate("mse_loss", 2) == pytest.approx(0.003)  # 25, 2, 3 ms
    assert decider.estimate("mse_loss", 1) is None and decider.estimate("l1_loss", 2) is None


def test_batching_keeps_its_place_unless_alone_is_clearly_cheaper() -> None:
    decider = BatchDecider(explore_every=1000, margin=0.1)
    decider.observe("mse_loss", 1, 0.00100)
    decider.observe("mse_loss", 2, 0.00210)  # 1.05 ms per call: within the margin
    assert decider.decide("mse_loss", 2) == BATCH
    decider.observe("mse_loss", 2, 0.00240)
    decider.observe("mse_loss", 2, 0.00240)  # median 1.2 ms per call: alone is clearly cheaper
    assert decider.decide("mse_loss", 2) == ALONE


def test_explore_every_must_leave_room_for_the_estimates() -> None:
    with pytest.raises(ValueError, match="explore_every"):
        BatchDecider(explore_every=1)
