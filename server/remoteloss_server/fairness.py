"""``FairShares``: weighted fair shares of compute time between tenants, by virtual time.

Each tenant's virtual time is the compute seconds charged to it divided by its weight (1 when
unlisted). The batcher serves, of the tenants with work ready, the one with the least virtual
time, and charges each batch's measured time to its tenant when the batch ends. A tenant that
becomes active (nothing of its own was queued) starts at ``now``, the virtual time of the last
batch started: it banks no credit while idle, and keeps a debt it ran up. No grpc, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["FairShares"]


class FairShares:
    """Virtual times by tenant (None: the one tenant without API keys)."""

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        self._weights = dict(weights or {})
        self._vtime: dict[str | None, float] = {}
        self.now = 0.0  # the virtual time of the last batch started

    def virtual_time(self, tenant: str | None) -> float:
        return self._vtime.get(tenant, self.now)

    def activate(self, tenant: str | None) -> None:
        """``tenant`` has work again, after none: it starts no earlier than ``now``."""
        self._vtime[tenant] = max(self.virtual_time(tenant), self.now)

    def started(self, tenant: str | None) -> None:
        """A batch of ``tenant``'s starts: ``now`` moves up to its virtual time."""
        self.now = max(self.now, self.virtual_time(tenant))

    def charge(self, tenant: str | None, seconds: float) -> None:
        """A batch of ``tenant``'s took ``seconds`` to compute."""
        weight = 1.0 if tenant is None else self._weights.get(tenant, 1.0)
        self._vtime[tenant] = self.virtual_time(tenant) + seconds / weight
