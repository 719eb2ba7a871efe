"""Which waiting request of a model starts next: its class, then a fair share among tenants,
then its deadline.

Pure decisions, no I/O and no clock of its own: the model's waiting line
(:mod:`streams.answering.waiting`) keeps one :class:`Schedule`, adds a :class:`Ticket` for each
request that finds no free slot, and asks it which to wake when a slot frees. The order:

1. **class**: every ``interactive`` request before any ``batch`` one;
2. **tenant**, within a class: the model's capacity is shared by weighted fair share of expected
   cost (tokens), by start-time fair queuing. Each tenant has a virtual time, the cost it was
   served divided by its weight; the backlogged tenant with the lowest starts next. A tenant that
   was idle comes back at the class's current virtual time, so idling banks no credit. A start is
   charged its expected cost, corrected by what the answer really cost when it ends;
3. **deadline**, within a tenant: the earliest deadline a request was sent with first, then
   arrival order (requests without one come after those with one).

Requests that start without waiting (a slot was free) are charged too (:meth:`Schedule.started`),
so a tenant that never waits is not favoured when the model becomes busy.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

__all__ = [
    "CLASSES", "DEFAULT_COMPLETION_TOKENS", "Schedule", "Ticket", "class_rank", "prompt_tokens", "start_estimates",
]

#: Priority classes, most urgent first. An unknown class (a future one) ranks with the first.
CLASSES = ("interactive", "batch")
_RANK = {name: rank for rank, name in enumerate(CLASSES)}

#: The expected completion of a request without ``max_tokens``, until answers were measured.
DEFAULT_COMPLETION_TOKENS = 256.0
_COMPLETION_EWMA = 0.1  # weight of the newest answer in the measured expectation
_SWEEP_AT = 1024  # tenants a class remembers before it forgets the idle ones


def class_rank(priority: str) -> int:
    return _RANK.get(priority, 0)


def prompt_tokens(text_chars: int) -> float:
    """A prompt's tokens, estimated from its length (about 4 characters a token)."""
    return text_chars / 4.0


@dataclass(eq=False)
class Ticket:
    """One request's place in a schedule."""

    id: str
    tenant: str
    priority: str = "interactive"
    deadline: float = float("inf")  # the request's own (epoch seconds); earliest first within a tenant
    prompt_tokens: float = 0.0
    max_tokens: int | None = None  # the request's cap on its completion, if it set one
    session_id: str = ""
    arrived: float = 0.0  # monotonic seconds, when it started waiting
    seq: int = -1  # arrival order, given by the schedule
    charged: float = 0.0  # the cost charged to its tenant when it started
    queued: bool = field(default=False, repr=False)


class _Tenant:
    __slots__ = ("name", "weight", "vtime", "tickets", "live", "version")

    def __init__(self, name: str, weight: float) -> None:
        self.name = name
        self.weight = weight
        self.vtime = 0.0
        self.tickets: list[tuple[float, int, Ticket]] = []  # a heap of (deadline, seq, ticket)
        self.live = 0  # tickets in the heap still queued
        self.version = 0

    def head(self) -> Ticket | None:
        while self.tickets and not self.tickets[0][2].queued:
            heapq.heappop(self.tickets)
        return self.tickets[0][2] if self.tickets else None


class _Class:
    __slots__ = ("vtime", "tenants", "order", "waiting")

    def __init__(self) -> None:
        self.vtime = 0.0  # the start tag of the last request started: where returning tenants resume
        self.tenants: dict[str, _Tenant] = {}
        self.order: list[tuple[float, int, int, str]] = []  # a heap of (vtime, head seq, version, tenant)
        self.waiting = 0


class Schedule:
    """The requests waiting for one model, in the order they should start.

    ``weight_of(tenant)`` gives a tenant's weight (its share, relative to the others'; > 0).
    """

    def __init__(self, weight_of: Callable[[str], float] = lambda tenant: 1.0) -> None:
        self._weight_of = weight_of
        self._classes = [_Class() for _ in CLASSES]
        self._seq = itertools.count()
        self.expected_completion = DEFAULT_COMPLETION_TOKENS

    def __len__(self) -> int:
        return sum(c.waiting for c in self._classes)

    def waiting_by_class(self) -> dict[str, int]:
        return {name: c.waiting for name, c in zip(CLASSES, self._classes)}

    def waiting_by_tenant(self) -> dict[tuple[str, str], int]:
        """{(class, tenant): requests waiting}."""
        return {(name, t.name): t.live for name, c in zip(CLASSES, self._classes)
                for t in c.tenants.values() if t.live}

    # -- costs --------------------------------------------------------------------------

    def expected_cost(self, ticket: Ticket) -> float:
        """Tokens the request is expected to cost: its prompt and its completion (its
        ``max_tokens`` if lower than what answers of this model measured)."""
        completion = self.expected_completion
        if ticket.max_tokens is not None:
            completion = min(completion, float(ticket.max_tokens))
        return ticket.prompt_tokens + completion

    # -- waiting ------------------------------------------------------------------------

    def add(self, ticket: Ticket) -> None:
        """Queue ``ticket`` (a new one, or one given back after :meth:`pop`, keeping its turn)."""
        if ticket.queued:
            return
        if ticket.seq < 0:
            ticket.seq = next(self._seq)
        klass = self._classes[class_rank(ticket.priority)]
        tenant = klass.tenants.get(ticket.tenant)
        if tenant is None:
            tenant = klass.tenants[ticket.tenant] = _Tenant(ticket.tenant, self._weight(ticket.tenant))
        if tenant.live == 0:
            tenant.vtime = max(tenant.vtime, klass.vtime)  # idle time banks no credit
        ticket.queued = True
        heapq.heappush(tenant.tickets, (ticket.deadline, ticket.seq, ticket))
        tenant.live += 1
        klass.waiting += 1
        self._reorder(klass, tenant)

    def remove(self, ticket: Ticket) -> bool:
        """Take ``ticket`` out (it expired, was cancelled, or found a slot by itself)."""
        if not ticket.queued:
            return False
        klass = self._classes[class_rank(ticket.priority)]
        tenant = klass.tenants[ticket.tenant]
        self._take(klass, tenant, ticket)
        if tenant.live == 0:
            self._forget_if_idle(klass, tenant)
        else:
            self._reorder(klass, tenant)
        return True

    def pop(self) -> Ticket | None:
        """The request that starts next, out of the schedule and charged to its tenant; None if
        nothing waits. Give it back with :meth:`giveback` if it cannot start after all."""
        for klass in self._classes:
            while klass.order:
                vtime, seq, version, name = klass.order[0]
                tenant = klass.tenants.get(name)
                if tenant is None or tenant.version != version or tenant.live == 0:
                    heapq.heappop(klass.order)
                    continue
                ticket = tenant.head()
                assert ticket is not None
                self._take(klass, tenant, ticket)
                self._charge(klass, tenant, ticket)
                return ticket
        return None

    def giveback(self, ticket: Ticket) -> None:
        """A popped ticket that found no slot: refund its charge, queue it again in its turn."""
        klass = self._classes[class_rank(ticket.priority)]
        tenant = klass.tenants.get(ticket.tenant)
        if tenant is not None:
            tenant.vtime -= ticket.charged / tenant.weight
        ticket.charged = 0.0
        self.add(ticket)

    def started(self, ticket: Ticket) -> None:
        """A request started without waiting: charge its tenant all the same."""
        klass = self._classes[class_rank(ticket.priority)]
        tenant = klass.tenants.get(ticket.tenant)
        if tenant is None:
            tenant = klass.tenants[ticket.tenant] = _Tenant(ticket.tenant, self._weight(ticket.tenant))
        if tenant.live == 0:
            tenant.vtime = max(tenant.vtime, klass.vtime)
        self._charge(klass, tenant, ticket)
        self._forget_if_idle(klass, tenant)

    def finished(self, ticket: Ticket, tokens: float | None) -> None:
        """A started request ended having cost ``tokens`` (None: unknown, e.g. it failed):
        correct its tenant's share, and learn what an answer of this model costs."""
        if tokens is None:
            return
        completion = max(0.0, tokens - ticket.prompt_tokens)
        self.expected_completion += _COMPLETION_EWMA * (completion - self.expected_completion)
        klass = self._classes[class_rank(ticket.priority)]
        tenant = klass.tenants.get(ticket.tenant)
        if tenant is None:
            return  # idle and forgotten: its past no longer counts
        tenant.vtime += (tokens - ticket.charged) / tenant.weight
        ticket.charged = tokens
        if tenant.live:
            self._reorder(klass, tenant)

    # -- what it looks like -------------------------------------------------------------

    def order(self, limit: int | None = None) -> list[Ticket]:
        """The waiting requests in the order they would start if nothing else arrived."""
        out: list[Ticket] = []
        for klass in self._classes:
            for ticket in self._class_order(klass):
                if limit is not None and len(out) >= limit:
                    return out
                out.append(ticket)
        return out

    def _class_order(self, klass: _Class) -> Iterator[Ticket]:
        expected = self.expected_cost
        lines = {}
        heap: list[tuple[float, int, str]] = []
        for name, tenant in klass.tenants.items():
            if tenant.live == 0:
                continue
            queued = sorted((t for t in tenant.tickets if t[2].queued), key=lambda t: (t[0], t[1]))
            lines[name] = (tenant.weight, [t[2] for t in queued], [0])
            heapq.heappush(heap, (tenant.vtime, queued[0][1], name))
        while heap:
            vtime, _, name = heapq.heappop(heap)
            weight, tickets, at = lines[name]
            ticket = tickets[at[0]]
            at[0] += 1
            yield ticket
            if at[0] < len(tickets):
                heapq.heappush(heap, (vtime + expected(ticket) / weight, tickets[at[0]].seq, name))

    # -- inside -------------------------------------------------------------------------

    def _weight(self, tenant: str) -> float:
        weight = self._weight_of(tenant)
        return weight if weight > 0 else 1.0

    @staticmethod
    def _take(klass: _Class, tenant: _Tenant, ticket: Ticket) -> None:
        ticket.queued = False
        tenant.live -= 1
        klass.waiting -= 1
        if tenant.live == 0:
            tenant.tickets.clear()

    def _charge(self, klass: _Class, tenant: _Tenant, ticket: Ticket) -> None:
        klass.vtime = max(klass.vtime, tenant.vtime)
        ticket.charged = self.expected_cost(ticket)
        tenant.vtime += ticket.charged / tenant.weight
        if tenant.live:
            self._reorder(klass, tenant)
        if len(klass.tenants) > _SWEEP_AT:
            # Many tenants come and go (one per session when clients name none): forget the idle
            # ones, forgiving what they were served ahead of the others (at most their last starts).
            for idle in [t for t in klass.tenants.values() if t.live == 0 and t is not tenant]:
                del klass.tenants[idle.name]

    def _reorder(self, klass: _Class, tenant: _Tenant) -> None:
        head = tenant.head()
        if head is None:
            return
        tenant.version += 1
        heapq.heappush(klass.order, (tenant.vtime, head.seq, tenant.version, tenant.name))

    def _forget_if_idle(self, klass: _Class, tenant: _Tenant) -> None:
        """An idle tenant behind the class's virtual time would resume at it anyway: drop it, so
        tenants that come and go (one per session) do not accumulate."""
        if tenant.live == 0 and tenant.vtime <= klass.vtime:
            del klass.tenants[tenant.name]


def start_estimates(now: float, slots: list[tuple[float, float]], n: int) -> list[float]:
    """When each of the next ``n`` waiting requests is expected to start, in seconds from ``now``.

    ``slots`` is every usable slot of the model's endpoints as (when it is expected to be free,
    the seconds a request takes there): the k-th waiting request starts when the k-th slot frees,
    each start keeping its slot busy for that endpoint's measured time per request.
    """
    if not slots:
        return [math.inf] * n
    free = [(max(now, at), seconds) for at, seconds in slots]
    heapq.heapify(free)
    out = []
    for _ in range(n):
        at, seconds = heapq.heappop(free)
        out.append(at - now)
        heapq.heappush(free, (at + seconds, seconds))
    return out
