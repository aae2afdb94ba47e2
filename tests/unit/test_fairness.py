"""FairShares: virtual times by weight, where an arriving tenant starts, debts kept."""

from __future__ import annotations

from remoteloss_server.fairness import FairShares


def test_charges_divide_by_the_weight_and_unlisted_tenants_weigh_1() -> None:
    shares = FairShares({"alice": 4.0})
    for tenant in ("alice", "bob", None):
        shares.activate(tenant)
        shares.charge(tenant, 2.0)
    assert [shares.virtual_time(t) for t in ("alice", "bob", None)] == [0.5, 2.0, 2.0]


def test_an_arriving_tenant_starts_at_the_last_batch_started_and_keeps_a_debt() -> None:
    shares = FairShares()
    shares.activate("alice")
    for _ in range(10):
        shares.started("alice")
        shares.charge("alice", 1.0)
    assert shares.now == 9.0  # alice's tenth batch started at 9
    shares.activate("bob")
    assert shares.virtual_time("bob") == 9.0  # not 0: ten seconds of credit would starve alice
    shares.activate("alice")
    assert shares.virtual_time("alice") == 10.0  # ahead of now: kept
