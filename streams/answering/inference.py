"""Answer one request: the cache, then the calls, then the response.

No Kafka here: the Faust agent in :mod:`streams.app` feeds decoded requests in, gives a
sink for streamed chunks and a cache store, and publishes the answer. A request's path
reads in one direction, one module per step:

1. :mod:`~streams.answering.cache` decides whether a cached answer may do;
2. :mod:`~streams.answering.calling` makes the calls, each with
3. a slot from the model's :mod:`~streams.answering.waiting` line, chosen by the
   :mod:`~streams.answering.routing` router (pure decisions), and
4. one call through the :class:`~streams.backends.base.Backend` (Ollama, or in memory);
5. :mod:`~streams.answering.responses` builds and counts the response.

:mod:`~streams.answering.probes` runs beside them: it probes open circuits; and
:mod:`~streams.answering.residency` asks the endpoints which models they have and have loaded.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Protocol


from nexus.settings import ModelSettings, Settings
from schemas import BAD_REQUEST, MODEL_NOT_FOUND, InferenceRequest, utcnow

from streams.answering import cache
from streams.answering.calling import DEADLINE_SLACK_S, Called, Caller, TokenSink
from streams.answering.clock import Clock, as_clock
from streams.answering.probes import PROBE_POLL_S, PROBE_TIMEOUT_S, CircuitProbes
from streams.answering.prompt import PromptTemplate
from streams.answering.residency import Residency
from streams.answering.responses import Answer, Responses
from streams.answering.routing import ModelRouter
from streams.answering.waiting import Expired, Unavailable, WaitingLine
from streams.backends.base import Backend, BackendError, Generation
from streams.backends.endpoints import EndpointsBackend
from streams.backends.http import HttpClient
from streams.metrics import WorkerMetrics

__all__ = [
    "Answer", "BackendError", "CacheStore", "DEADLINE_SLACK_S", "Expired", "Generation", "Inference",
    "PROBE_POLL_S", "PROBE_TIMEOUT_S", "TokenSink", "Unavailable",
]

log = logging.getLogger(__name__)


class CacheStore(Protocol):
    def get(self, key: bytes) -> cache.CacheEntry | None: ...

    async def put(self, request: InferenceRequest, key: bytes, entry: cache.CacheEntry) -> None: ...


class Inference:
    """Answers requests for every configured model; one per worker.

    ``backend`` is what the endpoints are called through (Ollama over ``http`` unless
    given); ``clock`` is a ``() -> float`` of monotonic seconds or a
    :class:`~streams.answering.clock.Clock`, which then also does every wait.
    """

    def __init__(
        self,
        settings: Settings,
        http: HttpClient | None,
        metrics: WorkerMetrics,
        store: CacheStore,
        clock: Callable[[], float] | Clock = time.monotonic,
        rng: random.Random | None = None,
        *,
        backend: Backend | None = None,
    ) -> None:
        if backend is None:
            if http is None:
                raise TypeError("Inference needs an HTTP client for Ollama, or a backend")
            backend = EndpointsBackend.from_settings(settings, http)
        self._settings = settings
        self._metrics = metrics
        # Tenants labelled by name in the metrics: configured ones and API keys' names.
        metrics.known_tenants = frozenset(n for n in settings.tenants if n != "*") | {
            k.name for k in settings.access.keys
        }
        self._store = store
        self._clock = as_clock(clock)
        self._rng = rng or random.Random()
        self.routers = {m.id: ModelRouter(m, self._rng) for m in settings.models}
        self._probes = CircuitProbes(backend, self._clock)
        self.lines = {
            model_id: WaitingLine(router, self._clock, metrics, self._probes, lambda t: settings.tenant(t).weight)
            for model_id, router in self.routers.items()
        }
        self.residency = Residency(backend, self.routers, self._clock)
        self._caller = Caller(
            backend, self.lines, PromptTemplate(settings.worker.prompt_template), metrics, self._clock, self._rng,
            self.residency,
        )
        self._responses = Responses(settings, metrics)

    async def answer(
        self, request: InferenceRequest, sink: TokenSink | None = None, calling: Callable[[], None] | None = None
    ) -> Answer:
        """Answer ``request``; ``calling`` is told when a model call is about to start (until then,
        cancelling the answer wastes no model work)."""
        self.watch()
        model = self._settings.model(request.model_id)
        if model is None:
            return self.failed(
                request,
                f"unknown model {request.model_id!r}; this worker serves {sorted(self._settings.model_ids)}",
                error_kind=MODEL_NOT_FOUND,
            )
        deadline = self._deadline(request, model)
        cacheable = cache.should_look_up(request, model) or cache.should_store(request, model)
        key = cache.cache_key(request) if cacheable else b""
        if cache.should_look_up(request, model):
            entry = self._store.get(key)
            if entry is not None and entry.fresh(time.time()):
                self._metrics.cache.labels(model=model.id, result="hit").inc()
                return await self._from_cache(request, entry, sink)
            self._metrics.cache.labels(model=model.id, result="miss").inc()
        try:
            called = await self._caller.call(request, self._models_to_try(model), deadline, sink, calling)
        except Exception as exc:  # a bug must still answer the sender, never drop the request
            log.exception("unexpected failure answering %s", request.id)
            return self.failed(request, f"internal error: {exc!r}")
        answer = self._answer_of(request, model, called)
        if answer.response.status == "ok" and cache.should_store(request, model):
            await self._store.put(request, key, self._responses.entry(answer.response, model))
        return answer

    def watch(self) -> None:
        """Start the background work (a no-op once running): probing open circuits, and asking
        the endpoints which models they have, now and every few seconds."""
        self._probes.watch(self.lines.values())
        self.residency.watch()

    def failed(
        self, request: InferenceRequest, reason: str, retries: int = 0, error_kind: str | None = None
    ) -> Answer:
        """An error answer for ``request``; it belongs in the dead-letter topic too."""
        return self._responses.failed(request, reason, retries=retries, error_kind=error_kind)

    def cancelled(self, request: InferenceRequest, reason: str, output: str = "") -> Answer:
        """The answer to a request its sender cancelled."""
        return self._responses.cancelled(request, reason, output)

    @property
    def clock(self) -> Clock:
        return self._clock

    def snapshot(self) -> dict[str, list[dict[str, object]]]:
        """Live state of every endpoint, for ``GET /models``."""
        return {model_id: [e.snapshot() for e in r.endpoints.values()] for model_id, r in self.routers.items()}

    def missing(self) -> dict[str, dict[str, list[str] | None]]:
        """Models some endpoint lacks: for each, the endpoints and what they have instead."""
        return self.residency.missing()

    async def aclose(self) -> None:
        """Stop probing and asking (before the HTTP client they use is closed)."""
        await self._probes.aclose()
        await self.residency.aclose()
        for line in self.lines.values():
            await line.aclose()

    # -- steps --------------------------------------------------------------------------

    def _deadline(self, request: InferenceRequest, model: ModelSettings) -> float:
        """The monotonic time by which the request must be answered."""
        if request.deadline is not None:
            wall = request.deadline
        else:
            wall = request.created_at + timedelta(seconds=model.timeout_s * (model.retries + 1))
        return self._clock() + (wall - utcnow()).total_seconds()

    def _models_to_try(self, model: ModelSettings) -> list[ModelSettings]:
        models = [model]
        if model.fallback:
            fallback = self._settings.model(model.fallback)
            if fallback is not None:
                models.append(fallback)
        return models

    async def _from_cache(self, request: InferenceRequest, entry: cache.CacheEntry, sink: TokenSink | None) -> Answer:
        if sink is not None:
            pieces = cache.chunks_of(entry.output)
            for i, piece in enumerate(pieces):
                # A cached answer is all there at once: one record per chunk, not one in all;
                # its tool calls come with the last, as a backend sends them after the text.
                await sink.chunk(piece, entry.tool_calls if i == len(pieces) - 1 else (), flush=True)
        return self._responses.cached(request, entry)

    def _answer_of(self, request: InferenceRequest, model: ModelSettings, called: Called) -> Answer:
        queue_ms = round(called.queue_s * 1000)
        if called.expired:
            reason = self._expired_reason(model, called.reasons)
            return self._responses.expired(request, reason, called.retries, queue_ms)
        if called.bad_request is not None:
            # The client gets the backend's own words; the dead letter says which endpoint said them.
            return self._responses.failed(
                request, called.bad_request, retries=called.retries, error_kind=BAD_REQUEST,
                dead_letter_reason="; ".join(called.reasons), queue_ms=queue_ms,
            )
        if called.generation is None or called.url is None:
            kind = MODEL_NOT_FOUND if called.model_not_found else None
            return self._responses.failed(
                request, "; ".join(called.reasons), retries=called.retries, error_kind=kind, queue_ms=queue_ms
            )
        return self._responses.ok(request, called.generation, called.url, called.retries, queue_ms)

    def _expired_reason(self, model: ModelSettings, reasons: list[str]) -> str:
        states = ", ".join(
            f"{e.url} {e.circuit.value}" + (f" (last error: {e.last_error})" if e.last_error else "")
            for m in self._models_to_try(model)
            for e in self.routers[m.id].endpoints.values()
        )
        tried = f"; failures: {'; '.join(reasons)}" if reasons else ""
        return f"expired: deadline passed before an endpoint of {model.id!r} answered; endpoints: {states}{tried}"
