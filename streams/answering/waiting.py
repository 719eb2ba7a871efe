"""A model's waiting line for endpoint slots: take one, give it back, start the next.

The router (:mod:`streams.answering.routing`) decides which endpoint has room; this line
holds the requests for which none has, in the order the model's
:class:`~streams.answering.scheduling.Schedule` says (class, then the tenants' fair shares,
then deadline), and wakes one per freed slot. A request arriving while others wait queues
behind them even if a slot is free at that instant: the slot is theirs by the schedule. A
:class:`Slot` is a request's hold on one endpoint until its call ends; reporting how it
ended (succeeded, failed, busy, released) updates the router and frees the slot for the
next in line. Open circuits whose cool-down is over are probed from here too: a probe
that closes a circuit frees that endpoint's slots.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from nexus.errors import NexusError
from streams.answering.clock import Clock
from streams.answering.routing import Circuit, EndpointState, ModelRouter
from streams.answering.scheduling import Schedule, Ticket, start_estimates
from streams.backends.base import Generation
from streams.metrics import WorkerMetrics

if TYPE_CHECKING:
    from streams.answering.probes import CircuitProbes

_CIRCUIT_GAUGE = {Circuit.CLOSED: 0, Circuit.HALF_OPEN: 1, Circuit.OPEN: 2}


class Expired(NexusError):
    """The request's deadline passed before it could be answered."""


class Unavailable(NexusError):
    """Every endpoint of a model has an open circuit: move on to the fallback, don't wait."""


class _Waiter:
    """One request waiting for a slot; ``woken`` once the schedule gave it its turn."""

    __slots__ = ("event", "woken")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.woken = False


class Slot:
    """A request's slot on one endpoint, from :meth:`WaitingLine.acquire` until its call
    ends: report exactly one outcome, which frees it."""

    __slots__ = ("url", "chosen_at", "ticket", "_line")

    def __init__(self, line: WaitingLine, url: str, chosen_at: float, ticket: Ticket) -> None:
        self.url = url
        self.chosen_at = chosen_at
        self.ticket = ticket
        self._line = line

    @property
    def endpoint(self) -> EndpointState:
        return self._line.router.endpoints[self.url]

    def sent(self) -> None:
        """The call went on the wire: a rate limit counts it from now."""
        self._line.router.sent(self.url, self.chosen_at, self._line.clock())

    def succeeded(self, generation: Generation) -> None:
        line = self._line
        line.router.succeeded(self.url, generation.seconds, generation.completion_tokens, generation.ttft_s)
        line.ended(self, generation.prompt_tokens + generation.completion_tokens)
        line.publish_in_flight(self.url)
        line.wake()

    def failed(self, error: str, counts_against_endpoint: bool = True) -> None:
        """The endpoint failed the call; when it was the endpoint's fault, repeated failures open its circuit."""
        line = self._line
        line.router.failed(self.url, line.clock(), error, counts_against_endpoint=counts_against_endpoint)
        line.ended(self, None)
        line.publish_in_flight(self.url)
        line.publish_circuit(self.url)
        line.wake()

    def lacks(self, error: str) -> None:
        """It answered "model not found": the model goes elsewhere; not held against the endpoint."""
        line = self._line
        line.router.lacks(self.url, line.clock(), error)
        line.ended(self, None)
        line.publish_in_flight(self.url)
        line.wake()

    def busy(self, error: str) -> None:
        """It answered "server busy": it holds fewer requests from now on."""
        line = self._line
        line.router.busy(self.url, error)
        line.ended(self, None)
        line.publish_in_flight(self.url)
        line.publish_circuit(self.url)
        line.wake()

    def released(self) -> None:
        """The call ended without telling anything about the endpoint (cancelled)."""
        self._line.router.released(self.url)
        self._line.ended(self, None)
        self._line.wake()


class WaitingLine:
    """The requests waiting for a slot on one of a model's endpoints, in the schedule's order.

    ``weight_of(tenant)`` is a tenant's share of the model relative to the others'.
    """

    def __init__(
        self,
        router: ModelRouter,
        clock: Clock,
        metrics: WorkerMetrics,
        probes: CircuitProbes,
        weight_of: Callable[[str], float] = lambda tenant: 1.0,
    ) -> None:
        self.router = router
        self.clock = clock
        self._metrics = metrics
        self._probes = probes
        self.schedule = Schedule(weight_of)
        self._waiters: dict[Ticket, _Waiter] = {}
        self._woken = 0  # waiters given their turn that have not taken it yet
        self._poller: asyncio.Future[None] | None = None
        self.running: dict[Slot, None] = {}  # slots held now, oldest first

    def __len__(self) -> int:
        """Requests waiting now."""
        return len(self._waiters)

    async def acquire(
        self,
        session_id: str | None,
        deadline: float,
        exclude: frozenset[str] = frozenset(),
        can_fall_back: bool = False,
        avoid: frozenset[str] = frozenset(),
        ticket: Ticket | None = None,
    ) -> Slot:
        """A slot on the best endpoint (one not in ``exclude`` if any has room, never one in
        ``avoid``) when it is ``ticket``'s turn; waits, holding none, while all are full or down
        or others come first. Raises :class:`Expired` at ``deadline``, :class:`Unavailable` when
        no endpoint has the model (every one lacks it or is avoided) and, with somewhere else to
        go, when every circuit is open."""
        router = self.router
        schedule = self.schedule
        if ticket is None:
            ticket = Ticket("", session_id or "", session_id=session_id or "")
        queued = self.clock()
        waiter: _Waiter | None = None
        try:
            while True:
                now = self.clock()
                if now >= deadline:
                    raise Expired()
                if router.nowhere(now) or avoid.issuperset(router.endpoints):
                    raise Unavailable()
                turn = waiter is not None and waiter.woken
                if turn and waiter is not None:
                    waiter.woken = False
                    self._woken -= 1
                if turn or (not self._waiters and not self._woken):
                    chosen = router.choose(now, session_id, exclude | avoid)
                    if chosen is None and exclude:
                        chosen = router.choose(now, session_id, avoid)
                    if chosen is not None:
                        if not turn:
                            schedule.started(ticket)  # no one waited: charged all the same
                        model = router.model.id
                        self._metrics.queue_wait.labels(model=model).observe(now - queued)
                        labels = (model, ticket.priority, self._metrics.tenant(ticket.tenant))
                        self._metrics.schedule_wait.labels(*labels).observe(now - queued)
                        self._metrics.dispatched.labels(*labels).inc()
                        self._metrics.in_flight.labels(model=model, endpoint=chosen.url).set(chosen.in_flight)
                        slot = Slot(self, chosen.url, now, ticket)
                        self.running[slot] = None
                        return slot
                    if turn:
                        schedule.giveback(ticket)  # woken, but no slot after all: keep the turn
                if can_fall_back and router.all_down():
                    raise Unavailable()
                self.probe_due(now)
                if waiter is None:
                    waiter = self._waiters[ticket] = _Waiter()
                    ticket.arrived = now
                    schedule.add(ticket)
                    if self._poller is None:
                        self._poller = asyncio.ensure_future(self._poll())
                waiter.event.clear()
                if not self._woken and router.has_room(now):
                    self.wake()  # a slot is free (a newcomer queued behind others, a rate window passed)
                    if waiter.woken:
                        continue
                # Woken in its turn (a freed slot, or the line's poll), or at its deadline.
                await self.clock.wait_for(waiter.event, deadline - now)
        finally:
            if waiter is not None:
                del self._waiters[ticket]
                if ticket.queued:
                    schedule.remove(ticket)  # gave up (expired, cancelled, moved to the fallback)
                elif waiter.woken:  # given its turn but leaves it unused: refund it, pass it on
                    self._woken -= 1
                    schedule.giveback(ticket)
                    schedule.remove(ticket)
                    self.wake()

    async def _poll(self) -> None:
        """While requests wait, look at what the clock alone changes (a rate window passing, a
        circuit's cool-down ending) every ``wait_hint``, and make good a lost wake-up.

        One poll per line, not one per waiter: a thousand waiters each polling twice a second
        cost the worker a third of a core.
        """
        try:
            while self._waiters:
                await self.clock.sleep(self.router.wait_hint(self.clock()))
                now = self.clock()
                self.probe_due(now)
                if self.router.all_down() or (not self._woken and self.router.has_room(now)):
                    self.wake()
        finally:
            self._poller = None

    async def aclose(self) -> None:
        """Stop the line's poll (the worker is stopping)."""
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)

    def wake(self, slots: int = 1) -> None:
        """Give the next ``slots`` waiting requests their turn, in the schedule's order.

        One per freed slot, not all of them: with hundreds waiting, waking everyone on
        every answer cost more CPU than the answers themselves.
        """
        schedule = self.schedule
        if self.router.all_down():
            slots = len(schedule)  # those with a fallback go there now, the others wait again
        while slots > 0:
            ticket = schedule.pop()
            if ticket is None:
                return
            waiter = self._waiters[ticket]
            waiter.woken = True
            self._woken += 1
            waiter.event.set()
            slots -= 1

    def ended(self, slot: Slot, tokens: float | None) -> None:
        """A call ended: its slot is free, and its tenant's share is corrected by what it cost."""
        if self.running.pop(slot, 0) is None:
            self.schedule.finished(slot.ticket, tokens)

    # -- what it looks like -------------------------------------------------------------

    def report(self, now: float, limit: int) -> tuple[list[dict[str, object]], list[dict[str, object]], float]:
        """(the waiting requests in the order they would start, with their estimated start; the
        running ones; the model's measured service rate in requests per second)."""
        router = self.router
        prior = router.prior_seconds()
        slots: list[tuple[float, float]] = []
        running_on: dict[str, list[Slot]] = {}
        for slot in self.running:
            running_on.setdefault(slot.url, []).append(slot)
        rate = 0.0
        for e in router.endpoints.values():
            if e.missing or e.circuit is not Circuit.CLOSED:
                continue
            seconds = e.seconds_per_request or prior
            capacity = e.capacity()
            rate += capacity / seconds
            # A call running longer than the endpoint's mean is not about to end for that: its
            # remaining time is taken as half a mean call rather than none.
            ends = (s.chosen_at + seconds for s in running_on.get(e.url, ()))
            busy = sorted(end if end > now else now + seconds / 2 for end in ends)[:capacity]
            slots.extend((at, seconds) for at in busy)
            slots.extend((now, seconds) for _ in range(capacity - len(busy)))
        order = self.schedule.order(limit)
        etas = start_estimates(now, slots, len(order))
        waiting: list[dict[str, object]] = [
            {"id": t.id, "session_id": t.session_id, "tenant": t.tenant, "priority": t.priority,
             "position": i, "eta_s": round(eta, 3) if eta != float("inf") else None, "waited_s": round(now - t.arrived, 3)}
            for i, (t, eta) in enumerate(zip(order, etas))
        ]
        running = [
            {"id": s.ticket.id, "session_id": s.ticket.session_id, "tenant": s.ticket.tenant,
             "priority": s.ticket.priority, "running_s": round(now - s.chosen_at, 3)}
            for s in self.running
        ]
        return waiting, running, rate

    # -- circuits -----------------------------------------------------------------------

    def probe_due(self, now: float) -> None:
        """Start a probe of every open circuit whose cool-down is over."""
        for endpoint in self.router.probe_candidates(now):
            self.router.probe_started(endpoint.url)
            self.publish_circuit(endpoint.url)
            self._probes.start(endpoint.url, partial(self._probed, endpoint.url))

    def _probed(self, url: str, ok: bool) -> None:
        self.router.probe_finished(url, ok, self.clock())
        self.publish_circuit(url)
        self.wake(self.router.endpoints[url].capacity() if ok else 0)

    # -- gauges -------------------------------------------------------------------------

    def publish_in_flight(self, url: str) -> None:
        self._metrics.in_flight.labels(model=self.router.model.id, endpoint=url).set(self.router.endpoints[url].in_flight)

    def publish_circuit(self, url: str) -> None:
        value = _CIRCUIT_GAUGE[self.router.endpoints[url].circuit]
        self._metrics.circuit_state.labels(model=self.router.model.id, endpoint=url).set(value)
