"""The calls for one request: a slot from the model's waiting line, one call through the
backend, its outcome reported back; retries on other endpoints, then the fallback model,
all within the request's deadline.

Retries bound repeated model work: a call that never connected spent none, so it does
not count. Against endpoints that are all down, a request then waits for a recovery
(their circuits open) until its deadline instead of failing at once; with a fallback
model it goes there as soon as every circuit of its own model is open.

A backend that refuses the request (its 400: tools for a model without tool support, a
schema it cannot follow) says the request is wrong, not the endpoint: the calls end at once,
no retry, no fallback, its circuit untouched, and the request is answered as a bad request
with the backend's own words.

An endpoint that answers "model not found" did no model work either: the model goes to
its other endpoints (that endpoint's inventory is asked again at once, see
:mod:`~streams.answering.residency`), then to the fallback. When no endpoint of any model
tried has it, the request fails as ``model_not_found``, saying what each endpoint has.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from nexus.settings import ModelSettings
from schemas import InferenceRequest, ToolCall

from streams.answering.clock import Clock
from streams.answering.prompt import PromptTemplate
from streams.answering.residency import Residency
from streams.answering.routing import ModelRouter, backoff_seconds
from streams.answering.scheduling import Ticket, prompt_tokens
from streams.answering.waiting import Expired, Slot, Unavailable, WaitingLine
from streams.backends.base import Backend, BackendError, Generation
from streams.metrics import WorkerMetrics

DEADLINE_SLACK_S = 0.01  # timers may fire this early; a call cut at its deadline is expired


class TokenSink(Protocol):
    """Where the chunks of a streamed answer go, in order."""

    started: bool  # a chunk was given: the answer can no longer be retried elsewhere

    async def chunk(self, text: str, tool_calls: tuple[ToolCall, ...] = (), *, flush: bool = False) -> None:
        """Add a chunk: its text (may be "") and the tool calls that came with it."""
        ...


@dataclass
class Called:
    """How the calls for one request ended: a generation, or the reasons there is none."""

    reasons: list[str] = field(default_factory=list)  # every failure, in order
    retries: int = 0  # calls made after the first, reported in the response
    generation: Generation | None = None
    model: ModelSettings | None = None  # which answered: the request's model or its fallback
    url: str | None = None
    expired: bool = False  # the deadline passed first
    nowhere: list[str] = field(default_factory=list)  # models tried that no endpoint has
    models_tried: int = 0
    bad_request: str | None = None  # the backend refused the request: its own words
    queue_s: float = 0.0  # waited for its first slot: the schedule's doing

    @property
    def model_not_found(self) -> bool:
        """Nothing answered because no model tried is on any of its endpoints."""
        return self.generation is None and not self.expired and 0 < len(self.nowhere) == self.models_tried


def nowhere_reason(router: ModelRouter, answered: dict[str, str]) -> str:
    """Why ``router``'s model cannot be answered: what each of its endpoints has instead."""
    parts = []
    for e in router.endpoints.values():
        if e.inventory is not None:
            parts.append(f"{e.url} has {sorted(e.inventory.available)}")
        elif e.url in answered:
            parts.append(f"{answered[e.url]}")
        else:
            parts.append(f"{e.url} has (unknown)")
    model = router.model.id
    return f"model {model!r} is not on any endpoint of {model!r}: {'; '.join(parts)}"


def ticket_of(request: InferenceRequest) -> Ticket:
    """``request``'s place in its model's schedule. Its deadline there is the one it was sent with
    (epoch seconds, as in the record, so equal deadlines compare equal and arrival decides); one
    without is ordered after those with one."""
    chars = len(request.input) + sum(len(m.content) for m in request.messages)
    return Ticket(
        request.id,
        request.tenant_or_session,
        request.priority,
        request.deadline.timestamp() if request.deadline is not None else math.inf,
        prompt_tokens=prompt_tokens(chars),
        max_tokens=request.options.max_tokens,
        session_id=request.context.session_id,
    )


class Caller:
    def __init__(
        self,
        backend: Backend,
        lines: Mapping[str, WaitingLine],
        template: PromptTemplate,
        metrics: WorkerMetrics,
        clock: Clock,
        rng: random.Random,
        residency: Residency | None = None,
    ) -> None:
        self._backend = backend
        self._residency = residency
        self._lines = lines
        self._template = template
        self._metrics = metrics
        self._clock = clock
        self._rng = rng

    async def call(
        self,
        request: InferenceRequest,
        models: Sequence[ModelSettings],
        deadline: float,
        sink: TokenSink | None = None,
        calling: Callable[[], None] | None = None,
    ) -> Called:
        """Try ``models`` in order (the request's, then its fallback) until one answers."""
        called = Called()
        try:
            for i, model in enumerate(models):
                called.models_tried += 1
                answered, retries = await self._call_model(
                    request, model, deadline, sink, called, i + 1 < len(models), calling
                )
                called.retries += retries
                if answered is not None:
                    called.generation, called.url = answered
                    called.model = model
                    return called
                if called.bad_request is not None:
                    break  # the request's fault: the fallback would be asked the same
                if sink is not None and sink.started:
                    break  # chunks are out: a second answer would not concatenate to one output
        except Expired:
            called.expired = True
        return called

    async def _call_model(
        self,
        request: InferenceRequest,
        model: ModelSettings,
        deadline: float,
        sink: TokenSink | None,
        called: Called,
        can_fall_back: bool,
        calling: Callable[[], None] | None,
    ) -> tuple[tuple[Generation, str] | None, int]:
        """The answer and its endpoint, or ``None``; and the calls made after the first."""
        reasons = called.reasons
        line = self._lines[model.id]
        endpoints = len(line.router.endpoints)
        tried: set[str] = set()
        lacking: dict[str, str] = {}  # endpoints that answered "model not found", and how
        attempts = 0
        spent = 0  # calls that reached an endpoint: what model.retries bounds
        while spent <= model.retries:
            # Prefer endpoints not tried yet; once all were, any will do.
            exclude = frozenset(tried) if len(tried) < endpoints else frozenset()
            started = self._clock()
            try:
                slot = await line.acquire(
                    request.context.session_id, deadline, exclude, can_fall_back, frozenset(lacking),
                    ticket_of(request),
                )
            except Expired:
                if attempts == 0 and called.models_tried == 1:
                    called.queue_s = self._clock() - started  # it waited its turn until its deadline
                raise
            except Unavailable:
                if line.router.nowhere(self._clock()) or len(lacking) == endpoints:
                    # One reason says it all: what every endpoint has instead.
                    reasons[:] = [r for r in reasons if r not in lacking.values()]
                    reasons.append(nowhere_reason(line.router, lacking))
                    called.nowhere.append(model.id)
                else:
                    reasons.append(f"every endpoint of {model.id!r} has an open circuit")
                return None, max(attempts - 1, 0)
            attempts += 1
            if attempts == 1 and called.models_tried == 1:
                called.queue_s = self._clock() - started
            try:
                if calling is not None:
                    calling()
                generation = await self._attempt(slot, request, model, deadline, sink)
            except BackendError as exc:
                reasons.append(str(exc))
                if exc.bad_request:
                    # What the request asks, the backend refuses: no endpoint is to blame, none would do it.
                    slot.failed(str(exc), counts_against_endpoint=False)
                    self._record_failure(model, slot)
                    called.bad_request = exc.client_message
                    return None, attempts - 1
                if self._clock() >= deadline - DEADLINE_SLACK_S:
                    # The sender's deadline cut the call short: not the endpoint's fault.
                    slot.failed(str(exc), counts_against_endpoint=False)
                    self._record_failure(model, slot)
                    raise Expired() from None
                if exc.missing_model:
                    # No model work was done, and the endpoint is fine: try the model elsewhere.
                    slot.lacks(str(exc))
                    self._record_failure(model, slot)
                    lacking[slot.url] = str(exc)
                    if self._residency is not None:
                        await self._residency.refresh(slot.url)
                    continue
                if exc.busy:
                    slot.busy(str(exc))
                else:
                    slot.failed(str(exc), counts_against_endpoint=exc.retryable)
                self._record_failure(model, slot)
                if not exc.retryable or (sink is not None and sink.started):
                    return None, attempts - 1
                tried.add(slot.url)
                spent += exc.reached
                if spent <= model.retries:
                    self._metrics.retries.labels(model=model.id).inc()
                    pause = backoff_seconds(attempts - 1, self._rng)
                    if self._clock() + pause >= deadline:
                        raise Expired() from None
                    await self._clock.sleep(pause)
                continue
            except BaseException:
                slot.released()
                raise
            slot.succeeded(generation)
            self._record_success(model, slot, generation)
            return (generation, slot.url), attempts - 1
        return None, attempts - 1

    async def _attempt(
        self, slot: Slot, request: InferenceRequest, model: ModelSettings, deadline: float, sink: TokenSink | None
    ) -> Generation:
        """One call to the slot's endpoint, cut at the model's timeout or the request's deadline."""
        return await self._backend.generate(
            slot.url,
            model.id,
            request,
            self._template.system_prompt(request.context),
            min(model.timeout_s, max(0.001, deadline - self._clock())),
            sink.chunk if sink is not None else None,
            # Only a rate limit needs to know when the request went on the wire.
            slot.sent if slot.endpoint.settings.max_rps is not None else None,
        )

    # -- metrics ------------------------------------------------------------------------

    def _record_success(self, model: ModelSettings, slot: Slot, generation: Generation) -> None:
        m, url = self._metrics, slot.url
        m.backend_seconds.labels(model=model.id, endpoint=url).observe(generation.seconds)
        if generation.ttft_s is not None:
            m.ttft_seconds.labels(model=model.id, endpoint=url).observe(generation.ttft_s)
        tokens_per_second = slot.endpoint.tokens_per_second()
        if tokens_per_second is not None:
            m.tokens_per_second.labels(model=model.id, endpoint=url).set(tokens_per_second)
        m.backend_requests.labels(model=model.id, endpoint=url, outcome="ok").inc()

    def _record_failure(self, model: ModelSettings, slot: Slot) -> None:
        self._metrics.backend_requests.labels(model=model.id, endpoint=slot.url, outcome="error").inc()
