"""Answer one request: cache, route, call Ollama, retry, fall back, build the response.

No Kafka here: the Faust agent in :mod:`streams.app` feeds decoded requests in,
gives a sink for streamed chunks and a cache store, and publishes the answer.
The decisions live in :mod:`streams.answering.routing` and :mod:`streams.answering.cache`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import aiohttp

from nexus.settings import ModelSettings, Settings
from schemas import InferenceRequest, InferenceResponse, utcnow

from streams.answering import cache
from streams.metrics import WorkerMetrics
from streams.backends.ollama import BackendError, Generation, generate
from streams.answering.prompt import PromptTemplate
from streams.answering.routing import Circuit, ModelRouter, backoff_seconds

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0
PROBE_POLL_S = 0.25  # how often open circuits are checked for a due probe
DEADLINE_SLACK_S = 0.01  # timers may fire this early; a call cut at its deadline is expired


class TokenSink(Protocol):
    """Where the chunks of a streamed answer go, in order."""

    started: bool  # a chunk was given: the answer can no longer be retried elsewhere

    async def chunk(self, text: str, *, flush: bool = False) -> None: ...


class CacheStore(Protocol):
    def get(self, key: bytes) -> cache.CacheEntry | None: ...

    async def put(self, request: InferenceRequest, key: bytes, entry: cache.CacheEntry) -> None: ...


@dataclass(frozen=True)
class Answer:
    response: InferenceResponse
    # Why the request also belongs in the dead-letter topic, when it failed.
    dead_letter_reason: str | None = None


class Expired(Exception):
    """The request's deadline passed before it could be answered."""


class Unavailable(Exception):
    """Every endpoint of a model has an open circuit: move on to the fallback, don't wait."""


class _Waiter:
    """One request waiting for a slot; queued while it is in its model's waiting line."""

    __slots__ = ("event", "queued")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.queued = False


class Inference:
    def __init__(
        self,
        settings: Settings,
        http: aiohttp.ClientSession,
        metrics: WorkerMetrics,
        store: CacheStore,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._http = http
        self._metrics = metrics
        self._store = store
        self._clock = clock
        self._rng = rng or random.Random()
        self._template = PromptTemplate(settings.worker.prompt_template)
        self.routers = {m.id: ModelRouter(m, self._rng) for m in settings.models}
        # Requests waiting for a slot, per model, oldest first: a freed slot wakes one.
        self._waiting: dict[str, deque[_Waiter]] = {m.id: deque() for m in settings.models}
        self._probes: set[asyncio.Task[None]] = set()
        self._watcher: asyncio.Task[None] | None = None

    # -- the request --------------------------------------------------------------------

    async def answer(
        self, request: InferenceRequest, sink: TokenSink | None = None, calling: Callable[[], None] | None = None
    ) -> Answer:
        """Answer ``request``; ``calling`` is told when a model call is about to start (until then,
        cancelling the answer wastes no model work)."""
        self._watch_circuits()
        model = self._settings.model(request.model_id)
        if model is None:
            return self.failed(
                request,
                f"unknown model {request.model_id!r}; this worker serves {sorted(self._settings.model_ids)}",
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
        reasons: list[str] = []
        try:
            answer = await self._answer_with(request, model, deadline, sink, reasons, calling)
        except Expired:
            return self.failed(request, self._expired_reason(model, reasons))
        except Exception as exc:  # a bug must still answer the sender, never drop the request
            log.exception("unexpected failure answering %s", request.id)
            return self.failed(request, f"internal error: {exc!r}")
        if answer.response.status == "ok" and cache.should_store(request, model):
            await self._store.put(request, key, self._entry(answer.response, model))
        return answer

    def _deadline(self, request: InferenceRequest, model: ModelSettings) -> float:
        """The monotonic time by which the request must be answered."""
        if request.deadline is not None:
            wall = request.deadline
        else:
            wall = request.created_at + timedelta(seconds=model.timeout_s * (model.retries + 1))
        return self._clock() + (wall - utcnow()).total_seconds()

    def _expired_reason(self, model: ModelSettings, reasons: list[str]) -> str:
        states = ", ".join(
            f"{e.url} {e.circuit.value}" + (f" (last error: {e.last_error})" if e.last_error else "")
            for m in self._models_to_try(model)
            for e in self.routers[m.id].endpoints.values()
        )
        tried = f"; failures: {'; '.join(reasons)}" if reasons else ""
        return f"expired: deadline passed before an endpoint of {model.id!r} answered; endpoints: {states}{tried}"

    async def _answer_with(
        self,
        request: InferenceRequest,
        model: ModelSettings,
        deadline: float,
        sink: TokenSink | None,
        reasons: list[str],
        calling: Callable[[], None] | None = None,
    ) -> Answer:
        retries = 0
        models = self._models_to_try(model)
        for i, candidate in enumerate(models):
            outcome = await self._try_model(request, candidate, deadline, sink, reasons, i + 1 < len(models), calling)
            retries += outcome[1]
            if outcome[0] is not None:
                generation, url = outcome[0]
                return Answer(self._ok(request, candidate, generation, url, retries))
            if sink is not None and sink.started:
                break  # chunks are out: a second answer would not concatenate to one output
        return self.failed(request, "; ".join(reasons), retries=retries)

    def _models_to_try(self, model: ModelSettings) -> list[ModelSettings]:
        models = [model]
        if model.fallback:
            fallback = self._settings.model(model.fallback)
            if fallback is not None:
                models.append(fallback)
        return models

    async def _try_model(
        self,
        request: InferenceRequest,
        model: ModelSettings,
        deadline: float,
        sink: TokenSink | None,
        reasons: list[str],
        can_fall_back: bool = False,
        calling: Callable[[], None] | None = None,
    ) -> tuple[tuple[Generation, str] | None, int]:
        router = self.routers[model.id]
        tried: set[str] = set()
        attempts = 0  # calls made, reported as the response's retries
        # Retries bound repeated model work: a call that never connected spent none, so it
        # does not count. Against endpoints that are all down, the request then waits for
        # a recovery (their circuits open) until its deadline, instead of failing at once.
        spent = 0
        while spent <= model.retries:
            # Prefer endpoints not tried yet; once all were, any will do.
            exclude = frozenset(tried) if len(tried) < len(router.endpoints) else frozenset()
            try:
                url, chosen_at = await self._acquire(router, request, deadline, exclude, can_fall_back)
                if calling is not None:
                    calling()
            except Unavailable:
                reasons.append(f"every endpoint of {model.id!r} has an open circuit")
                return None, max(attempts - 1, 0)
            attempts += 1
            started = self._clock()
            try:
                generation = await generate(
                    self._http,
                    url,
                    model.id,
                    request.input,
                    self._template.system_prompt(request.context),
                    request.options,
                    min(model.timeout_s, max(0.001, deadline - started)),
                    sink.chunk if sink is not None else None,
                    # Only a rate limit needs to know when the request went on the wire.
                    (lambda: router.sent(url, chosen_at, self._clock()))  # noqa: B023 (used within this iteration)
                    if router.endpoints[url].settings.max_rps is not None else None,
                )
            except BackendError as exc:
                if self._clock() >= deadline - DEADLINE_SLACK_S:
                    # The sender's deadline cut the call short: not the endpoint's fault.
                    router.failed(url, self._clock(), str(exc), counts_against_endpoint=False)
                    self._record_failure(model, url, exc)
                    self._notify(router)
                    reasons.append(str(exc))
                    raise Expired() from None
                if exc.busy:
                    router.busy(url, str(exc))
                else:
                    router.failed(url, self._clock(), str(exc), counts_against_endpoint=exc.retryable)
                self._record_failure(model, url, exc)
                self._notify(router)
                reasons.append(str(exc))
                if not exc.retryable or (sink is not None and sink.started):
                    return None, attempts - 1
                tried.add(url)
                spent += exc.reached
                if spent <= model.retries:
                    self._metrics.retries.labels(model=model.id).inc()
                    pause = backoff_seconds(attempts - 1, self._rng)
                    if self._clock() + pause >= deadline:
                        raise Expired()
                    await asyncio.sleep(pause)
                continue
            except BaseException:
                router.released(url)
                self._notify(router)
                raise
            router.succeeded(url, generation.seconds, generation.completion_tokens, generation.ttft_s)
            self._record_success(model, url, generation)
            self._notify(router)
            return (generation, url), attempts - 1
        return None, attempts - 1

    async def _acquire(
        self,
        router: ModelRouter,
        request: InferenceRequest,
        deadline: float,
        exclude: frozenset[str],
        can_fall_back: bool = False,
    ) -> tuple[str, float]:
        """A slot on the best endpoint and when it was taken; waits, holding none, while all
        are full or down. With somewhere else to go, an all-down model raises Unavailable."""
        queued = self._clock()
        waiting = self._waiting[router.model.id]
        waiter: _Waiter | None = None
        acquired = False
        try:
            while True:
                now = self._clock()
                if now >= deadline:
                    raise Expired()
                chosen = router.choose(now, request.context.session_id, exclude)
                if chosen is None and exclude:
                    chosen = router.choose(now, request.context.session_id)
                if chosen is not None:
                    self._metrics.queue_wait.labels(model=router.model.id).observe(now - queued)
                    self._metrics.in_flight.labels(model=router.model.id, endpoint=chosen.url).set(chosen.in_flight)
                    acquired = True
                    return chosen.url, now
                if can_fall_back and router.all_down():
                    raise Unavailable()
                for endpoint in router.probe_candidates(now):
                    self._probe(router, endpoint.url)
                if waiter is None:
                    waiter = _Waiter()
                    waiting.append(waiter)
                elif not waiter.queued:  # woken, but a newcomer took the slot: keep its turn
                    waiting.appendleft(waiter)
                waiter.queued = True
                waiter.event.clear()
                try:  # woken by a freed slot, or when the clock alone may change something
                    await asyncio.wait_for(waiter.event.wait(), timeout=min(router.wait_hint(now), deadline - now))
                except asyncio.TimeoutError:
                    pass
        finally:
            if waiter is not None and waiter.queued:
                waiting.remove(waiter)  # got a slot without its wake-up, or gave up
            elif waiter is not None and waiter.event.is_set() and not acquired:
                self._notify(router)  # woken for a slot it leaves unused (expired, cancelled): pass it on

    def _notify(self, router: ModelRouter, slots: int = 1) -> None:
        """Wake the ``slots`` oldest requests waiting for one of ``router``'s endpoints.

        One per freed slot, not all of them: with hundreds waiting, waking everyone on
        every answer cost more CPU than the answers themselves.
        """
        waiting = self._waiting[router.model.id]
        if router.all_down():
            slots = len(waiting)  # those with a fallback go there now, the others wait again
        while slots > 0 and waiting:
            waiter = waiting.popleft()
            waiter.queued = False
            waiter.event.set()
            slots -= 1

    async def aclose(self) -> None:
        """Stop probing (before the HTTP client it uses is closed)."""
        tasks = [t for t in (self._watcher, *self._probes) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _watch_circuits(self) -> None:
        """Keep probing open circuits in the background (started with the first request).

        Probing only when a request waits would leave a recovered endpoint shut for good
        while its siblings keep up with the traffic, and show it open with no traffic.
        """
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.ensure_future(self._probe_loop())

    async def _probe_loop(self) -> None:
        while True:
            now = self._clock()
            for router in self.routers.values():
                for endpoint in router.probe_candidates(now):
                    self._probe(router, endpoint.url)
            await asyncio.sleep(PROBE_POLL_S)

    def _probe(self, router: ModelRouter, url: str) -> None:
        router.probe_started(url)
        self._publish_circuit(router, url)

        async def probe() -> None:
            ok = False
            try:
                timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
                async with self._http.get(f"{url}/api/version", timeout=timeout) as response:
                    ok = response.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                ok = False
            finally:
                router.probe_finished(url, ok, self._clock())
                self._publish_circuit(router, url)
                self._notify(router, router.endpoints[url].capacity() if ok else 0)

        task = asyncio.ensure_future(probe())
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    # -- responses ----------------------------------------------------------------------

    async def _from_cache(
        self, request: InferenceRequest, entry: cache.CacheEntry, sink: TokenSink | None
    ) -> Answer:
        if sink is not None:
            for piece in cache.chunks_of(entry.output):
                # A cached answer is all there at once: one record per chunk, not one in all.
                await sink.chunk(piece, flush=True)
        return Answer(
            self._response(
                request,
                status="ok",
                output=entry.output,
                endpoint=entry.endpoint,
                prompt_tokens=entry.prompt_tokens,
                completion_tokens=entry.completion_tokens,
                done_reason=entry.done_reason,
                cached=True,
            )
        )

    def _entry(self, response: InferenceResponse, model: ModelSettings) -> cache.CacheEntry:
        return cache.CacheEntry(
            output=response.output,
            prompt_tokens=response.prompt_tokens,
            completion_tokens=response.completion_tokens,
            done_reason=response.done_reason,
            endpoint=response.endpoint,
            expires_at=time.time() + model.cache_ttl_s,
        )

    def _ok(
        self, request: InferenceRequest, model: ModelSettings, generation: Generation, url: str, retries: int
    ) -> InferenceResponse:
        return self._response(
            request,
            status="ok",
            output=generation.text,
            endpoint=url,
            backend_latency_ms=round(generation.seconds * 1000),
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
            done_reason=generation.done_reason,
            time_to_first_token_ms=None if generation.ttft_s is None else round(generation.ttft_s * 1000),
            retries=retries,
        )

    def failed(self, request: InferenceRequest, reason: str, retries: int = 0) -> Answer:
        """An error answer for ``request``; it belongs in the dead-letter topic too."""
        return Answer(self._response(request, status="error", error=reason, retries=retries), reason)

    def _response(self, request: InferenceRequest, **fields) -> InferenceResponse:  # type: ignore[no-untyped-def]
        completed = utcnow()
        latency_ms = max(0, round((completed - request.created_at).total_seconds() * 1000))
        response = InferenceResponse(
            id=request.id,
            model_id=request.model_id,
            context=request.context,
            completed_at=completed,
            latency_ms=latency_ms,
            reply_to=request.reply_to,
            key_name=request.key_name,
            **fields,
        )
        # Unknown model ids come from senders; keep them out of label values.
        label = request.model_id if self._settings.model(request.model_id) else "unknown"
        self._metrics.requests.labels(model=label, status=response.status).inc()
        self._metrics.latency_seconds.labels(model=label).observe(latency_ms / 1000)
        return response

    # -- metrics ------------------------------------------------------------------------

    def _record_success(self, model: ModelSettings, url: str, generation: Generation) -> None:
        m = self._metrics
        m.backend_seconds.labels(model=model.id, endpoint=url).observe(generation.seconds)
        if generation.ttft_s is not None:
            m.ttft_seconds.labels(model=model.id, endpoint=url).observe(generation.ttft_s)
        state = self.routers[model.id].endpoints[url]
        if state.tokens_per_second() is not None:
            m.tokens_per_second.labels(model=model.id, endpoint=url).set(state.tokens_per_second())
        m.in_flight.labels(model=model.id, endpoint=url).set(state.in_flight)
        m.backend_requests.labels(model=model.id, endpoint=url, outcome="ok").inc()

    def _record_failure(self, model: ModelSettings, url: str, exc: BackendError) -> None:
        router = self.routers[model.id]
        self._metrics.backend_requests.labels(model=model.id, endpoint=url, outcome="error").inc()
        self._metrics.in_flight.labels(model=model.id, endpoint=url).set(router.endpoints[url].in_flight)
        self._publish_circuit(router, url)

    def _publish_circuit(self, router: ModelRouter, url: str) -> None:
        state = router.endpoints[url].circuit
        value = {Circuit.CLOSED: 0, Circuit.HALF_OPEN: 1, Circuit.OPEN: 2}[state]
        self._metrics.circuit_state.labels(model=router.model.id, endpoint=url).set(value)

    def snapshot(self) -> dict[str, list[dict[str, object]]]:
        """Live state of every endpoint, for ``GET /models``."""
        return {model_id: [e.snapshot() for e in r.endpoints.values()] for model_id, r in self.routers.items()}
