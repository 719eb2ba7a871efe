"""A model's waiting line for endpoint slots: take one, give it back, wake the next.

The router (:mod:`streams.answering.routing`) decides which endpoint has room; this line
holds the requests for which none has, oldest first, and wakes one per freed slot. A
:class:`Slot` is a request's hold on one endpoint until its call ends; reporting how it
ended (succeeded, failed, busy, released) updates the router and frees the slot for the
next in line. Open circuits whose cool-down is over are probed from here too: a probe
that closes a circuit frees that endpoint's slots.
"""

from __future__ import annotations

import asyncio
from collections import deque
from functools import partial
from typing import TYPE_CHECKING

from nexus.errors import NexusError
from streams.answering.clock import Clock
from streams.answering.routing import Circuit, EndpointState, ModelRouter
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
    """One request waiting for a slot; queued while it is in the waiting line."""

    __slots__ = ("event", "queued")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.queued = False


class Slot:
    """A request's slot on one endpoint, from :meth:`WaitingLine.acquire` until its call
    ends: report exactly one outcome, which frees it."""

    __slots__ = ("url", "chosen_at", "_line")

    def __init__(self, line: WaitingLine, url: str, chosen_at: float) -> None:
        self.url = url
        self.chosen_at = chosen_at
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
        line.publish_in_flight(self.url)
        line.wake()

    def failed(self, error: str, counts_against_endpoint: bool = True) -> None:
        """The endpoint failed the call; when it was the endpoint's fault, repeated failures open its circuit."""
        line = self._line
        line.router.failed(self.url, line.clock(), error, counts_against_endpoint=counts_against_endpoint)
        line.publish_in_flight(self.url)
        line.publish_circuit(self.url)
        line.wake()

    def lacks(self, error: str) -> None:
        """It answered "model not found": the model goes elsewhere; not held against the endpoint."""
        line = self._line
        line.router.lacks(self.url, line.clock(), error)
        line.publish_in_flight(self.url)
        line.wake()

    def busy(self, error: str) -> None:
        """It answered "server busy": it holds fewer requests from now on."""
        line = self._line
        line.router.busy(self.url, error)
        line.publish_in_flight(self.url)
        line.publish_circuit(self.url)
        line.wake()

    def released(self) -> None:
        """The call ended without telling anything about the endpoint (cancelled)."""
        self._line.router.released(self.url)
        self._line.wake()


class WaitingLine:
    """The requests waiting for a slot on one of a model's endpoints, oldest first."""

    def __init__(self, router: ModelRouter, clock: Clock, metrics: WorkerMetrics, probes: CircuitProbes) -> None:
        self.router = router
        self.clock = clock
        self._metrics = metrics
        self._probes = probes
        self._waiting: deque[_Waiter] = deque()

    def __len__(self) -> int:
        """Requests waiting now."""
        return len(self._waiting)

    async def acquire(
        self,
        session_id: str | None,
        deadline: float,
        exclude: frozenset[str] = frozenset(),
        can_fall_back: bool = False,
        avoid: frozenset[str] = frozenset(),
    ) -> Slot:
        """A slot on the best endpoint (one not in ``exclude`` if any has room, never one in
        ``avoid``); waits, holding none, while all are full or down. Raises :class:`Expired` at
        ``deadline``, :class:`Unavailable` when no endpoint has the model (every one lacks it or
        is avoided) and, with somewhere else to go, when every circuit is open."""
        router = self.router
        queued = self.clock()
        waiter: _Waiter | None = None
        acquired = False
        try:
            while True:
                now = self.clock()
                if now >= deadline:
                    raise Expired()
                if router.nowhere(now) or avoid.issuperset(router.endpoints):
                    raise Unavailable()
                chosen = router.choose(now, session_id, exclude | avoid)
                if chosen is None and exclude:
                    chosen = router.choose(now, session_id, avoid)
                if chosen is not None:
                    self._metrics.queue_wait.labels(model=router.model.id).observe(now - queued)
                    self._metrics.in_flight.labels(model=router.model.id, endpoint=chosen.url).set(chosen.in_flight)
                    acquired = True
                    return Slot(self, chosen.url, now)
                if can_fall_back and router.all_down():
                    raise Unavailable()
                self.probe_due(now)
                if waiter is None:
                    waiter = _Waiter()
                    self._waiting.append(waiter)
                elif not waiter.queued:  # woken, but a newcomer took the slot: keep its turn
                    self._waiting.appendleft(waiter)
                waiter.queued = True
                waiter.event.clear()
                # Woken by a freed slot, or when the clock alone may change something.
                await self.clock.wait_for(waiter.event, min(router.wait_hint(now), deadline - now))
        finally:
            if waiter is not None and waiter.queued:
                self._waiting.remove(waiter)  # got a slot without its wake-up, or gave up
            elif waiter is not None and waiter.event.is_set() and not acquired:
                self.wake()  # woken for a slot it leaves unused (expired, cancelled): pass it on

    def wake(self, slots: int = 1) -> None:
        """Wake the ``slots`` oldest waiting requests.

        One per freed slot, not all of them: with hundreds waiting, waking everyone on
        every answer cost more CPU than the answers themselves.
        """
        if self.router.all_down():
            slots = len(self._waiting)  # those with a fallback go there now, the others wait again
        while slots > 0 and self._waiting:
            waiter = self._waiting.popleft()
            waiter.queued = False
            waiter.event.set()
            slots -= 1

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
