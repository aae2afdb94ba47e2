"""Request limits checked before any work is done on a request (no grpc, no torch).

- ``request_elements(message, max_dims=, where=)``: the tensor elements a request declares,
  summed over every ``Tensor`` in it, read from the shapes alone (the ``data`` bytes are never
  touched, so nothing is copied or decoded), each shape's rank checked first; the servicer
  rejects a request over ``max_request_elements`` with INVALID_ARGUMENT before it decodes anything.
- ``Admission``: the requests the server has accepted and not yet answered (queued or
  computing), bounded in number (``max_in_flight``) and in request bytes
  (``max_in_flight_bytes``). Past either bound a new request fails at once with
  RESOURCE_EXHAUSTED ("the server is saturated"), so a flood meets a refusal rather than a
  queue, and the memory the server holds for requests stays bounded. One request is always
  admitted when nothing else is in flight, however large (``max_message_bytes`` bounds it).
  A request frees its place when it is answered, fails, or its caller goes away. Used from the
  event loop only, so it needs no lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from remoteloss.v1 import loss_pb2 as pb

from remoteloss_server.errors import InvalidArgumentError, ResourceExhaustedError

__all__ = ["Admission", "Budget", "Ticket", "check_elements", "request_elements"]

_TENSOR = pb.Tensor.DESCRIPTOR


def request_elements(message: Message, *, max_dims: int | None = None, where: str = "request") -> int:
    """The elements of every ``Tensor`` in ``message`` (nested ones too), from their shapes.

    A negative dimension counts as 0 here; the codec rejects it later with its own message. A
    tensor of more than ``max_dims`` dimensions is refused here, before its shape is read (a
    packed ``shape`` of a million entries parses in C, but would be read one by one in Python),
    with InvalidArgumentError naming it as ``<where>: <field path>``. Only the fields that are
    set are visited (``ListFields``, one C call per message); a ``Tensor``'s own fields are never
    listed, since reading its ``data`` would copy it.
    """
    return _elements(message, max_dims, where, "")


def _elements(message: Message, max_dims: int | None, where: str, path: str) -> int:
    if message.DESCRIPTOR is _TENSOR:
        shape = message.shape  # type: ignore[attr-defined]
        if max_dims is not None and len(shape) > max_dims:
            name = f"{where}: {path}" if path else where
            raise InvalidArgumentError(
                f"{name}: shape has {len(shape)} dimensions, more than the limit of {max_dims}"
            )
        count = 1
        for size in shape:
            count *= size if size > 0 else 0
        return count
    total = 0
    for field, value in message.ListFields():
        kind = _KINDS.get(field)
        if kind is None:
            kind = _KINDS[field] = _kind(field)
        if kind == _SCALAR:
            continue
        inner = f"{path}.{field.name}" if path else field.name
        if kind == _SINGLE:
            total += _elements(value, max_dims, where, inner)
        else:
            for child in value.values() if kind == _MAP else value:
                if isinstance(child, Message):
                    total += _elements(child, max_dims, where, inner)
    return total


_SCALAR, _SINGLE, _REPEATED, _MAP = range(4)
_KINDS: dict[FieldDescriptor, int] = {}


def _kind(field: FieldDescriptor) -> int:
    if field.message_type is None:
        return _SCALAR
    if field.message_type.GetOptions().map_entry:
        return _MAP
    return _REPEATED if field.is_repeated else _SINGLE


def check_elements(loss: str, elements: int, limit: int | None) -> int:
    """``elements``, a request's declared count; InvalidArgumentError when more than ``limit``."""
    if limit is not None and elements > limit:
        raise InvalidArgumentError(
            f"{loss}: the request's tensors hold {elements} elements in all, more than this server's "
            f"max_request_elements of {limit}"
        )
    return elements


@dataclass
class _Usage:
    """What one holder of a budget (the server, a tenant, a connection) has in flight."""

    requests: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class Budget:
    """Bounds on what one holder may have in flight: requests, and request plus answer bytes."""

    requests: int
    bytes: int
    setting: str  # the settings' common stem, for messages: "max_in_flight", "max_tenant_in_flight", ...

    def __post_init__(self) -> None:
        if self.requests < 1 or self.bytes < 1:
            raise ValueError(f"{self.setting}: limits must be >= 1, got {self.requests} requests, {self.bytes} bytes")


class _Holder(NamedTuple):  # a tuple: made three times per request
    usage: _Usage
    budget: Budget
    who: str  # for messages: "the server", "tenant", "this connection"; see _who
    table: dict[str, _Usage] | None = None  # where ``usage`` lives, under ``name``; None: the server's
    name: str = ""


def _who(h: _Holder) -> str:
    return f"tenant {h.name}" if h.who == "tenant" else h.who


class Ticket:
    """One admitted request's place in every budget it counts against, from admission until its
    answer has left (``release``; idempotent). ``reserve`` counts, before the call computes, the
    answer it will make; ``answered`` replaces that by the answer's real size. An answer counts
    until gRPC has taken it: a caller that does not read its answers spends its own budget."""

    __slots__ = ("_admission", "_holders", "bytes", "_answer", "_pending")

    def __init__(self, admission: Admission, holders: tuple[_Holder, ...], size: int) -> None:
        self._admission = admission
        self._holders = holders
        self.bytes = size  # counted in every holder's usage: the request's, then its answer's too
        self._answer = 0  # of which reserved for, or taken by, the answer
        self._pending = True

    def reserve(self, answer: int, most: int, loss: str) -> None:
        """Before the call computes: count ``answer`` bytes for the answer it will make, and check
        that ``most`` bytes, the most it holds at once (the tensors it implies, its answer),
        could fit. InvalidArgumentError when ``most`` passes a budget on its own (the call can never
        run here); ResourceExhaustedError when the answer does not fit with what is in flight."""
        for h in self._holders:  # the common case first: everything fits
            if most > h.budget.bytes or (h.usage.requests > 1 and h.usage.bytes + answer > h.budget.bytes):
                break
        else:
            self._count(answer)
            return
        over = [h for h in self._holders if most > h.budget.bytes]
        if over:
            h = min(over, key=lambda h: h.budget.bytes)  # the tightest budget
            raise InvalidArgumentError(
                f"{loss}: the call would hold about {most} bytes (the tensors it implies and its answer), "
                f"more than {_who(h)}'s {h.budget.setting}_bytes of {h.budget.bytes}"
            )
        for h in self._holders:
            if h.usage.requests > 1 and h.usage.bytes + answer > h.budget.bytes:
                raise ResourceExhaustedError(
                    f"{_who(h)} is saturated: {h.usage.bytes} bytes in flight (requests, and answers not yet sent), "
                    f"and this {loss} call's answer would add {answer}, past its {h.budget.setting}_bytes of "
                    f"{h.budget.bytes}; {_ADVICE}"
                )
        self._count(answer)

    def answered(self, size: int) -> None:
        """The answer (``size`` bytes) is ready and waits for gRPC to send it."""
        self._count(size - self._answer)
        self._done_computing()

    def _count(self, delta: int) -> None:
        for h in self._holders:
            h.usage.bytes += delta
        self.bytes += delta
        self._answer += delta
        self._admission._peak = max(self._admission._peak, self._admission.bytes)

    def release(self) -> None:
        self._done_computing()
        for h in self._holders:
            h.usage.requests -= 1
            h.usage.bytes -= self.bytes
            if h.table is not None and not h.usage.requests:  # tables hold only who has something in flight
                del h.table[h.name]
        self._holders = ()

    def _done_computing(self) -> None:
        if self._pending:
            self._pending = False
            self._admission.pending -= 1


class Admission:
    """Bounds what is in flight, in the server as a whole, per tenant and per connection; see the
    module's docstring. ``admit(size, tenant=, connection=)`` returns a ``Ticket`` or raises
    ResourceExhaustedError naming the budget that is spent."""

    def __init__(
        self,
        max_requests: int,
        max_bytes: int,
        *,
        tenant: Budget | None = None,
        connection: Budget | None = None,
    ) -> None:
        self.total = Budget(max_requests, max_bytes, "max_in_flight")
        self._peak = 0  # the most bytes in flight since take_peak()
        self.tenant = tenant
        self.connection = connection
        self._all = _Usage()
        self._server = _Holder(self._all, self.total, "the server")
        self._tenants: dict[str, _Usage] = {}
        self._connections: dict[str, _Usage] = {}
        self.pending = 0  # admitted and not yet answered (queued or computing)

    @property
    def requests(self) -> int:
        """Requests admitted whose answers have not left yet."""
        return self._all.requests

    @property
    def bytes(self) -> int:
        """Their request and answer bytes."""
        return self._all.bytes

    def in_flight(self, *, tenant: str | None = None, connection: str | None = None) -> tuple[int, int]:
        """(requests, bytes) in flight for one tenant or connection (or the whole server)."""
        usage = (self._tenants.get(tenant) if tenant is not None else
                 self._connections.get(connection) if connection is not None else self._all)
        return (usage.requests, usage.bytes) if usage is not None else (0, 0)

    def admit(self, size: int, *, tenant: str | None = None, connection: str | None = None) -> Ticket:
        """A place for a request of ``size`` bytes in every budget it counts against, or
        ResourceExhaustedError at once. A holder with nothing in flight is always admitted one
        request, however large (``max_message_bytes`` bounds it)."""
        _check(self._all, self.total, "the server", size)
        places: list[tuple[Budget, str, dict[str, _Usage], str]] = []
        for name, budget, table, who in (
            (tenant, self.tenant, self._tenants, "tenant"),
            (connection, self.connection, self._connections, "this connection"),
        ):
            if name is not None and budget is not None:
                usage = table.get(name)
                if usage is not None:  # nothing in flight: always admitted
                    _check(usage, budget, f"tenant {name}" if who == "tenant" else who, size)
                places.append((budget, who, table, name))
        holders = [self._server]
        holders += [_Holder(table.setdefault(name, _Usage()), b, who, table, name) for b, who, table, name in places]
        for h in holders:
            h.usage.requests += 1
            h.usage.bytes += size
        self.pending += 1
        self._peak = max(self._peak, self._all.bytes)
        return Ticket(self, tuple(holders), size)

    def take_peak(self) -> int:
        """The most bytes that were in flight since the last call (or since the start)."""
        peak, self._peak = self._peak, self._all.bytes
        return peak


_ADVICE = "retry later with backoff, or send to another replica"


def _check(usage: _Usage, budget: Budget, who: str, size: int) -> None:
    if usage.requests >= budget.requests:
        raise ResourceExhaustedError(
            f"{who} is saturated: {usage.requests} requests in flight (answers not yet sent included), "
            f"its {budget.setting}; {_ADVICE}"
        )
    if usage.requests and usage.bytes + size > budget.bytes:
        raise ResourceExhaustedError(
            f"{who} is saturated: {usage.bytes} bytes in flight (requests, and answers not yet sent), and "
            f"{size} more would pass its {budget.setting}_bytes of {budget.bytes}; {_ADVICE}"
        )
