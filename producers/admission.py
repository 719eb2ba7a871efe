"""Admission: whether the gateway takes a request now, or answers 429 with when to come back.

Per tenant (the API key's name when keys are on, else the ``tenant`` field or header, else the
session; ``configs/nexus.toml`` ``[tenants."<name>"]``, ``[tenants."*"]`` for the rest):

- ``requests_per_minute`` and ``tokens_per_minute``, over a sliding 60-second window of what this
  gateway accepted. Tokens are estimated before the model runs: the input's characters (prompt
  and every message) / 4, plus ``max_tokens`` (256 when unset);
- ``max_concurrent``: the tenant's requests waiting or running, as the workers' queue reports
  say, plus those accepted here in the last :data:`UNREPORTED_S` seconds that no report lists yet;
- a deadline (``timeout_ms``) shorter than the estimated wait in its model's queue: better told
  now than answered ``expired`` later.

``Retry-After`` is in whole seconds: for the windows, when enough of the window has passed for the
request to fit; for concurrency and deadlines, from the measured drain rate of the queue. Each
gateway counts its own window: with N gateways a tenant may send up to N times its rate.

A pure class: the clock and the queue picture (:class:`producers.queue.QueueBoard`) are given;
no I/O, tested in microseconds. 0 means unlimited for every limit.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from schemas import InferenceRequest

__all__ = [
    "DEFAULT_MAX_TOKENS", "UNREPORTED_S", "WINDOW_S", "Admission", "QueueState", "Rejection", "TenantLimits",
    "estimate_tokens",
]

WINDOW_S = 60.0  # the window of requests_per_minute and tokens_per_minute
UNREPORTED_S = 5.0  # how long an accepted request counts as active before a queue report lists it
DEFAULT_MAX_TOKENS = 256  # the answer's length assumed when a request sets no max_tokens
CHARS_PER_TOKEN = 4
MAX_RETRY_AFTER_S = 3600


class TenantLimits(Protocol):
    """What admission reads of :class:`nexus.settings.TenantSettings`."""

    @property
    def weight(self) -> float: ...
    @property
    def requests_per_minute(self) -> int: ...
    @property
    def tokens_per_minute(self) -> int: ...
    @property
    def max_concurrent(self) -> int: ...


class QueueState(Protocol):
    """What admission asks of the workers' schedules (:class:`producers.queue.QueueBoard` answers)."""

    def find(self, request_id: str, now: float) -> object | None: ...
    def active(self, tenant: str, now: float) -> int: ...
    def estimated_wait_s(self, model: str, priority: str, tenant: str, now: float,
                         weight: Callable[[str], float] = ...) -> float | None: ...
    def drain_per_s(self, tenant: str, now: float, weight: Callable[[str], float] = ...) -> float: ...


@dataclass(frozen=True)
class Rejection:
    """Why a request is not taken now. ``limit`` names the setting (``requests_per_minute``,
    ``tokens_per_minute``, ``max_concurrent``) or ``deadline``; ``retry_after_s`` is ``None`` when
    retrying cannot help (a request bigger than the whole tokens-per-minute budget: 413)."""

    limit: str
    message: str
    retry_after_s: int | None
    status: int = 429


def estimate_tokens(request: InferenceRequest) -> int:
    """The request's cost before it runs: input characters / 4 plus ``max_tokens`` (or 256)."""
    chars = len(request.input) + sum(len(m.content) for m in request.messages)
    answer = request.options.max_tokens or DEFAULT_MAX_TOKENS
    return chars // CHARS_PER_TOKEN + answer


def retry_after(seconds: float) -> int:
    """Whole seconds, rounded up past the nearest 10 ms, at least 1 (``Retry-After: 0`` invites a busy loop)."""
    return max(1, min(MAX_RETRY_AFTER_S, math.ceil(round(seconds, 2))))


@dataclass
class _Accepted:
    at: float
    tokens: int
    request_id: str


class Admission:
    """Per-tenant windows and counts; :meth:`admit` decides and records, :meth:`refund` undoes.

    ``limits(tenant)`` gives a tenant's settings; ``queue`` the workers' schedules (None: no
    reports read, so only the windows and this gateway's own recent requests count); ``clock``
    returns seconds since the epoch (the queue reports' clock).
    """

    def __init__(
        self,
        limits: Callable[[str], TenantLimits],
        queue: QueueState | None = None,
        clock: Callable[[], float] = time.time,
        *,
        window_s: float = WINDOW_S,
        unreported_s: float = UNREPORTED_S,
    ) -> None:
        self._limits = limits
        self._queue = queue
        self._clock = clock
        self._window_s = window_s
        self._unreported_s = unreported_s
        self._windows: dict[str, deque[_Accepted]] = {}  # tenant -> accepted within the window
        self._recent: dict[str, deque[_Accepted]] = {}  # tenant -> accepted within unreported_s
        self.rejected: dict[str, int] = {}  # limit -> count, for metrics and tests

    def _weight(self, tenant: str) -> float:
        return self._limits(tenant).weight

    def admit(self, request: InferenceRequest) -> Rejection | None:
        """Take ``request`` (recorded against its tenant) or say why not. Its ``tenant`` must be set
        by the edge (:func:`schemas.validation.effective_tenant`)."""
        now = self._clock()
        tenant = request.tenant_or_session
        limits = self._limits(tenant)
        tokens = estimate_tokens(request)
        rejection = (
            self._rate(tenant, limits, tokens, now)
            or self._concurrency(tenant, limits, now)
            or self._deadline(request, tenant, now)
        )
        if rejection is not None:
            self.rejected[rejection.limit] = self.rejected.get(rejection.limit, 0) + 1
            return rejection
        accepted = _Accepted(now, tokens, request.id)
        if limits.requests_per_minute > 0 or limits.tokens_per_minute > 0:
            self._windows.setdefault(tenant, deque()).append(accepted)
        if limits.max_concurrent > 0:
            self._recent.setdefault(tenant, deque()).append(accepted)
        return None

    def refund(self, request: InferenceRequest) -> None:
        """Forget an admitted request that was not produced after all (Kafka refused it)."""
        tenant = request.tenant_or_session
        for table in (self._windows, self._recent):
            entries = table.get(tenant)
            if entries is None:
                continue
            kept = deque(e for e in entries if e.request_id != request.id)
            if kept:
                table[tenant] = kept
            else:
                del table[tenant]

    # -- the limits ------------------------------------------------------------------------

    def _window(self, tenant: str, now: float) -> deque[_Accepted]:
        entries = self._windows.get(tenant)
        if entries is None:
            return deque()
        while entries and entries[0].at <= now - self._window_s:
            entries.popleft()
        if not entries:
            del self._windows[tenant]
        return entries

    def _rate(self, tenant: str, limits: TenantLimits, tokens: int, now: float) -> Rejection | None:
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        if rpm <= 0 and tpm <= 0:
            return None
        entries = self._window(tenant, now)
        if rpm > 0 and len(entries) >= rpm:
            # Enough must leave the window that one more fits: the (n - rpm + 1)th oldest.
            frees_at = entries[len(entries) - rpm].at + self._window_s
            wait = retry_after(frees_at - now)
            return Rejection("requests_per_minute", f"tenant {tenant!r} is over its limit of {rpm} requests per "
                             f"minute; retry in {wait} s", wait)
        if tpm > 0:
            if tokens > tpm:
                return Rejection("tokens_per_minute", f"this request is estimated at {tokens} tokens, more than "
                                 f"tenant {tenant!r}'s whole limit of {tpm} tokens per minute: set a lower "
                                 "max_tokens or send less text", None, 413)
            used = sum(e.tokens for e in entries)
            if used + tokens > tpm:
                for entry in entries:  # oldest first: when has enough left?
                    used -= entry.tokens
                    if used + tokens <= tpm:
                        break
                wait = retry_after(entry.at + self._window_s - now)
                return Rejection("tokens_per_minute", f"tenant {tenant!r} is over its limit of {tpm} tokens per "
                                 f"minute (this request is estimated at {tokens}); retry in {wait} s", wait)
        return None

    def _unreported(self, tenant: str, now: float) -> int:
        """This gateway's recent requests of ``tenant`` that no queue report lists yet."""
        entries = self._recent.get(tenant)
        if entries is None:
            return 0
        while entries and entries[0].at <= now - self._unreported_s:
            entries.popleft()
        if not entries:
            del self._recent[tenant]
            return 0
        if self._queue is None:
            return len(entries)
        # Listed once: from then on the reports count it (and stop when it is answered).
        unlisted = deque(e for e in entries if self._queue.find(e.request_id, now) is None)
        if unlisted:
            self._recent[tenant] = unlisted
        else:
            del self._recent[tenant]
        return len(unlisted)

    def _concurrency(self, tenant: str, limits: TenantLimits, now: float) -> Rejection | None:
        limit = limits.max_concurrent
        if limit <= 0:
            return None
        reported = self._queue.active(tenant, now) if self._queue is not None else 0
        active = reported + self._unreported(tenant, now)
        if active < limit:
            return None
        drain = self._queue.drain_per_s(tenant, now, self._weight) if self._queue is not None else 0.0
        wait = retry_after((active - limit + 1) / drain if drain > 0 else 1.0)
        return Rejection("max_concurrent", f"tenant {tenant!r} has {active} requests waiting or running, its limit "
                         f"is {limit}; retry in {wait} s", wait)

    def _deadline(self, request: InferenceRequest, tenant: str, now: float) -> Rejection | None:
        if request.deadline is None or self._queue is None:
            return None
        left = request.deadline.timestamp() - now
        wait = self._queue.estimated_wait_s(request.model_id, request.priority, tenant, now, self._weight)
        if wait is None or wait <= left:
            return None
        retry = retry_after(wait - max(left, 0.0))
        return Rejection("deadline", f"model {request.model_id!r} has an estimated wait of {wait:.1f} s, longer "
                         f"than this request's deadline ({max(left, 0.0):.1f} s from now); retry in {retry} s "
                         "or allow more time (timeout_ms)", retry)
