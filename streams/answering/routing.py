"""Choosing the endpoint that will answer soonest: plain state, no I/O, no clock of its own.

Every method takes ``now`` (monotonic seconds) so the decisions test in microseconds.

An endpoint is *eligible* when its circuit lets traffic through, it has a free slot
(``in_flight < capacity``) and starting one more request keeps it within
``max_rps`` over the last second, plus a 50 ms guard (counted from when each request went
on the wire).
The capacity is ``max_concurrency``, lowered to what the endpoint held when it
answered "server busy" and raised again one slot per window of successes (AIMD).
Among eligible endpoints the router picks the lowest expected completion time::

    (in_flight + 1) / capacity * observed_seconds_per_request / weight

where the observed time is an EWMA of the backend call's duration; an endpoint
without observations is assumed to take the mean of its observed siblings (1 s
when none is), so weights alone decide at first. Ties within 5% are broken at
random so no endpoint takes all traffic. A session's last endpoint is preferred while it
has a free slot (Ollama keeps that context warm). When nothing is eligible the
caller waits, holding no slot, and asks again.

Residency: each endpoint's :class:`~streams.backends.base.Inventory` (which models it
has, which are loaded), refreshed by :mod:`streams.answering.residency`, is given to the
router. An endpoint known to lack the model (its inventory, or a 404 "model not found"
for it) is never eligible; an unknown inventory allows it. Among eligible endpoints, those
where the model is known to be unloaded (a cold load) are chosen only when no other is.
"""

from __future__ import annotations

import bisect
import enum
import random
from collections import deque
from dataclasses import dataclass, field

from nexus.settings import EndpointSettings, ModelSettings
from streams.backends.base import Inventory

EWMA_ALPHA = 0.2
PRIOR_SECONDS_PER_REQUEST = 1.0
# max_rps counts starts over one second plus a guard: an endpoint stamps a request's arrival
# later than its send (its own scheduling, a new connection's setup; 22 ms seen on a loaded
# 2-core host), so a window of exactly a second lets it see max_rps + 1 within its second.
RATE_WINDOW_S = 1.05
TIE_TOLERANCE = 0.05
# A waiting request is woken when a slot frees; this bounds a sleep if a wake-up is missed.
MAX_WAIT_S = 0.5
MAX_STICKY_SESSIONS = 10_000
# A 404 "model not found" with no inventory to confirm it keeps the endpoint out this long.
MISSING_RECHECK_S = 30.0


class Circuit(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"  # one probe may go through


@dataclass
class EndpointState:
    """What the router knows of one endpoint of one model."""

    settings: EndpointSettings
    in_flight: int = 0
    seconds_per_request: float | None = None  # EWMA, end to end of the backend call
    ttft_s: float | None = None  # EWMA time to first token (streamed requests)
    seconds_per_token: float | None = None  # EWMA
    consecutive_failures: int = 0
    circuit: Circuit = Circuit.CLOSED
    opened_at: float = 0.0
    probing: bool = False
    starts: deque[float] = field(default_factory=deque)  # start times within the last second
    served: int = 0
    failed: int = 0
    last_error: str | None = None
    # Concurrency learnt from "server busy" answers, below max_concurrency; None: not limited.
    limit: float | None = None
    inventory: Inventory | None = None  # what the endpoint has, when last asked; None: unknown
    missing: bool = False  # it lacks this model: its inventory says so, or it answered 404 for it
    loaded: bool | None = None  # the model is loaded there now; None: unknown
    missing_at: float = 0.0  # when a call was answered "model not found"

    @property
    def url(self) -> str:
        return self.settings.url

    def rate_ok(self, now: float) -> bool:
        while self.starts and self.starts[0] <= now - RATE_WINDOW_S:
            self.starts.popleft()
        return self.settings.max_rps is None or len(self.starts) < self.settings.max_rps

    def capacity(self) -> int:
        """Requests it may hold at once: max_concurrency, or less after busy answers."""
        configured = self.settings.max_concurrency
        return configured if self.limit is None else max(1, min(configured, int(self.limit)))

    def has_slot(self) -> bool:
        return self.in_flight < self.capacity()

    def expected_seconds(self, prior: float = PRIOR_SECONDS_PER_REQUEST) -> float:
        per_request = self.seconds_per_request or prior
        load = (self.in_flight + 1) / self.capacity()
        return load * per_request / self.settings.weight

    def tokens_per_second(self) -> float | None:
        return 1.0 / self.seconds_per_token if self.seconds_per_token else None

    def snapshot(self) -> dict[str, object]:
        return {
            "url": self.url,
            "weight": self.settings.weight,
            "max_concurrency": self.settings.max_concurrency,
            "concurrency_limit": self.capacity(),
            "max_rps": self.settings.max_rps,
            "in_flight": self.in_flight,
            "ewma_seconds_per_request": self.seconds_per_request,
            "ewma_ttft_seconds": self.ttft_s,
            "tokens_per_second": self.tokens_per_second(),
            "circuit": self.circuit.value,
            "healthy": self.circuit is Circuit.CLOSED,
            "served": self.served,
            "failed": self.failed,
            "last_error": self.last_error,
            # Residency of this model there: None when the endpoint's inventory is unknown.
            "has_model": False if self.missing else True if self.inventory is not None else None,
            "loaded": self.loaded,
            "models": sorted(self.inventory.available) if self.inventory is not None else None,
        }


def _ewma(old: float | None, sample: float) -> float:
    return sample if old is None else (1 - EWMA_ALPHA) * old + EWMA_ALPHA * sample


class ModelRouter:
    """Routing state of one model's endpoints."""

    def __init__(
        self,
        model: ModelSettings,
        rng: random.Random | None = None,
        failure_threshold: int = 3,
        open_seconds: float = 5.0,
    ) -> None:
        self.model = model
        self.endpoints = {e.url: EndpointState(e) for e in model.endpoints}
        self._rng = rng or random.Random()
        self._failure_threshold = failure_threshold
        self._open_seconds = open_seconds
        self._sessions: dict[str, str] = {}

    # -- choosing ---------------------------------------------------------------------

    def _eligible(self, now: float, exclude: frozenset[str] = frozenset()) -> list[EndpointState]:
        self._recheck_missing(now)
        return [
            e for e in self.endpoints.values()
            if e.url not in exclude and not e.missing and e.circuit is Circuit.CLOSED and e.has_slot()
            and e.rate_ok(now)
        ]

    def has_room(self, now: float) -> bool:
        """Whether some endpoint could take a request now (nothing is held)."""
        return bool(self._eligible(now))

    def choose(self, now: float, session_id: str | None = None, exclude: frozenset[str] = frozenset()) -> EndpointState | None:
        """The endpoint to send to now, holding a slot on it; ``None`` means wait and ask again."""
        eligible = self._eligible(now, exclude)
        if not eligible:
            return None
        warm = [e for e in eligible if e.loaded is not False]
        eligible = warm or eligible  # a cold load only when no endpoint with room has it loaded
        sticky = self._sessions.get(session_id) if session_id else None
        chosen = next((e for e in eligible if e.url == sticky), None)
        if chosen is None:
            prior = self._prior()
            best = min(e.expected_seconds(prior) for e in eligible)
            near = [e for e in eligible if e.expected_seconds(prior) <= best * (1 + TIE_TOLERANCE)]
            chosen = self._rng.choice(near)
        self._start(chosen, now, session_id)
        return chosen

    def prior_seconds(self) -> float:
        """What a request is assumed to take on an endpoint not observed yet."""
        return self._prior()

    def _prior(self) -> float:
        """What an endpoint without observations is assumed to take: the mean of its observed
        siblings. A fixed pessimistic prior let the first endpoint observed take all the
        traffic below saturation, so the others were never observed at all."""
        observed = [e.seconds_per_request for e in self.endpoints.values() if e.seconds_per_request]
        return sum(observed) / len(observed) if observed else PRIOR_SECONDS_PER_REQUEST

    def wait_hint(self, now: float) -> float:
        """How long nothing can change by the clock alone (rate windows, open circuits)."""
        hints = [MAX_WAIT_S]
        for e in self.endpoints.values():
            if e.circuit is Circuit.OPEN:
                hints.append(max(0.001, e.opened_at + self._open_seconds - now))
            if e.starts and not e.rate_ok(now):
                hints.append(max(0.001, e.starts[0] + RATE_WINDOW_S - now))
        return min(hints)

    def sent(self, url: str, chosen_at: float, now: float) -> None:
        """The request chosen at ``chosen_at`` went on the wire at ``now``: count it from then.

        ``max_rps`` holds at the endpoint only if a start is counted from when the endpoint
        can see it; a busy event loop or a new connection can delay the send by tens of ms.
        """
        starts = self.endpoints[url].starts
        try:
            starts.remove(chosen_at)
        except ValueError:
            pass  # already out of the window; the send still counts from now
        bisect.insort(starts, now)

    def all_down(self) -> bool:
        """No endpoint that has the model lets traffic through: waiting means waiting for a recovery."""
        return all(e.circuit is not Circuit.CLOSED for e in self.endpoints.values() if not e.missing)

    def nowhere(self, now: float) -> bool:
        """Every endpoint lacks the model: no wait will get it answered here."""
        self._recheck_missing(now)
        return all(e.missing for e in self.endpoints.values())

    def missing_where(self) -> dict[str, list[str] | None]:
        """The endpoints that lack the model, each with the models it has (``None``: unknown)."""
        return {
            e.url: sorted(e.inventory.available) if e.inventory is not None else None
            for e in self.endpoints.values() if e.missing
        }

    # -- residency ----------------------------------------------------------------------

    def set_inventory(self, url: str, inventory: Inventory) -> None:
        """What the endpoint at ``url`` said it has: it is routed to only if it has the model."""
        e = self.endpoints[url]
        e.inventory = inventory
        e.missing = not inventory.has(self.model.id)
        e.loaded = False if e.missing else inventory.is_loaded(self.model.id)

    def _recheck_missing(self, now: float) -> None:
        """A "model not found" that no inventory confirmed is tried again after a while."""
        for e in self.endpoints.values():
            if e.missing and e.inventory is None and now >= e.missing_at + MISSING_RECHECK_S:
                e.missing = False

    def probe_candidates(self, now: float) -> list[EndpointState]:
        """Open circuits whose cool-down is over: they need a health probe before traffic."""
        return [
            e for e in self.endpoints.values()
            if e.circuit is Circuit.OPEN and now >= e.opened_at + self._open_seconds and not e.probing
        ]

    def _start(self, e: EndpointState, now: float, session_id: str | None) -> None:
        e.in_flight += 1
        e.starts.append(now)
        if session_id:
            self._sessions.pop(session_id, None)
            self._sessions[session_id] = e.url
            if len(self._sessions) > MAX_STICKY_SESSIONS:
                self._sessions.pop(next(iter(self._sessions)))

    # -- outcomes ---------------------------------------------------------------------

    def succeeded(
        self,
        url: str,
        seconds: float,
        completion_tokens: int = 0,
        ttft_s: float | None = None,
    ) -> None:
        e = self.endpoints[url]
        e.in_flight -= 1
        e.served += 1
        e.consecutive_failures = 0
        e.missing = False  # it answered: it has the model, and has it loaded now
        e.loaded = True
        if e.limit is not None:  # additive increase: about one slot back per limit's worth of answers
            e.limit += 1.0 / e.limit
            if e.limit >= e.settings.max_concurrency:
                e.limit = None
        e.seconds_per_request = _ewma(e.seconds_per_request, seconds)
        if ttft_s is not None:
            e.ttft_s = _ewma(e.ttft_s, ttft_s)
        if completion_tokens > 0:
            generating = seconds - (ttft_s or 0.0)
            e.seconds_per_token = _ewma(e.seconds_per_token, max(generating, 1e-6) / completion_tokens)

    def failed(self, url: str, now: float, error: str, counts_against_endpoint: bool = True) -> None:
        """Release the slot; repeated failures open the circuit."""
        e = self.endpoints[url]
        e.in_flight -= 1
        e.last_error = error
        if not counts_against_endpoint:
            return
        e.failed += 1
        e.consecutive_failures += 1
        if e.consecutive_failures >= self._failure_threshold and e.circuit is Circuit.CLOSED:
            e.circuit = Circuit.OPEN
            e.opened_at = now

    def lacks(self, url: str, now: float, error: str) -> None:
        """It answered "model not found": release the slot and route the model elsewhere until
        an inventory says it has it. Not a failure of the endpoint: its circuit stays as it is."""
        e = self.endpoints[url]
        e.in_flight -= 1
        e.last_error = error
        e.missing = True
        e.missing_at = now
        e.loaded = False
        if e.inventory is not None and e.inventory.has(self.model.id):
            e.inventory = None  # stale: it no longer has it

    def busy(self, url: str, error: str) -> None:
        """It answered "server busy" (Ollama's 503 when its queue is full): it works, but
        holds fewer requests than we sent. Release the slot and send no more than it holds
        now until successes raise the limit again; its circuit is not the answer."""
        e = self.endpoints[url]
        e.in_flight -= 1
        e.last_error = error
        e.limit = float(max(1, min(e.capacity(), e.in_flight)))

    def released(self, url: str) -> None:
        """The request ended without telling us about the endpoint (cancelled, deadline)."""
        self.endpoints[url].in_flight -= 1

    def probe_started(self, url: str) -> None:
        e = self.endpoints[url]
        e.probing = True
        e.circuit = Circuit.HALF_OPEN

    def probe_finished(self, url: str, ok: bool, now: float) -> None:
        e = self.endpoints[url]
        e.probing = False
        if ok:
            e.circuit = Circuit.CLOSED
            e.consecutive_failures = 0
        else:
            e.circuit = Circuit.OPEN
            e.opened_at = now


def backoff_seconds(attempt: int, rng: random.Random, base: float = 0.05, cap: float = 2.0) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0, min(cap, base * (2**attempt)))
