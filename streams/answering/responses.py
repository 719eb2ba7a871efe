"""Building the response to a request, and counting it: ok, cached, or an error.

Every response the worker publishes is built here, so the request metrics count each
exactly once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from nexus.settings import ModelSettings, Settings
from schemas import InferenceRequest, InferenceResponse, utcnow

from streams.answering import cache
from streams.backends.base import Generation
from streams.metrics import WorkerMetrics


@dataclass(frozen=True)
class Answer:
    response: InferenceResponse
    # Why the request also belongs in the dead-letter topic, when it failed.
    dead_letter_reason: str | None = None


class Responses:
    def __init__(self, settings: Settings, metrics: WorkerMetrics) -> None:
        self._settings = settings
        self._metrics = metrics

    def ok(
        self, request: InferenceRequest, generation: Generation, url: str, retries: int, queue_ms: int = 0
    ) -> Answer:
        return Answer(self._response(
            request,
            status="ok",
            queue_ms=queue_ms,
            output=generation.text,
            endpoint=url,
            backend_latency_ms=round(generation.seconds * 1000),
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
            done_reason=generation.done_reason,
            time_to_first_token_ms=None if generation.ttft_s is None else round(generation.ttft_s * 1000),
            retries=retries,
            tool_calls=generation.tool_calls,
        ))

    def cached(self, request: InferenceRequest, entry: cache.CacheEntry) -> Answer:
        return Answer(self._response(
            request,
            status="ok",
            output=entry.output,
            endpoint=entry.endpoint,
            prompt_tokens=entry.prompt_tokens,
            completion_tokens=entry.completion_tokens,
            done_reason=entry.done_reason,
            cached=True,
            tool_calls=entry.tool_calls,
        ))

    def failed(
        self,
        request: InferenceRequest,
        reason: str,
        retries: int = 0,
        error_kind: str | None = None,
        dead_letter_reason: str | None = None,
        queue_ms: int = 0,
    ) -> Answer:
        """An error answer for ``request``; it belongs in the dead-letter topic too, as
        ``dead_letter_reason`` (``reason`` unless told). ``error_kind`` says what kind of error it
        is, when clients tell them apart (``MODEL_NOT_FOUND``, ``BAD_REQUEST``)."""
        return Answer(
            self._response(
                request, status="error", error=reason, retries=retries, error_kind=error_kind, queue_ms=queue_ms
            ),
            dead_letter_reason or reason,
        )

    def expired(self, request: InferenceRequest, reason: str, retries: int = 0, queue_ms: int = 0) -> Answer:
        """Its deadline passed before a model could answer it (usually while it waited its turn).
        It goes to the dead-letter topic too: it was accepted and got no answer."""
        self._count(self._metrics.expired, request)
        return Answer(
            self._response(request, status="expired", error=reason, retries=retries, queue_ms=queue_ms), reason
        )

    def cancelled(self, request: InferenceRequest, reason: str, output: str = "", queue_ms: int = 0) -> Answer:
        """Its sender cancelled it: never started, or its model call was stopped (``output`` is
        what was streamed until then). Not a failure: no dead letter."""
        self._count(self._metrics.cancelled, request)
        return Answer(self._response(request, status="cancelled", error=reason, output=output, queue_ms=queue_ms))

    def _count(self, counter: Any, request: InferenceRequest) -> None:
        model = request.model_id if self._settings.model(request.model_id) else "unknown"
        counter.labels(model, request.priority, self._metrics.tenant(request.tenant_or_session)).inc()

    @staticmethod
    def entry(response: InferenceResponse, model: ModelSettings) -> cache.CacheEntry:
        """The cache entry of an ``ok`` response."""
        return cache.CacheEntry(
            output=response.output,
            prompt_tokens=response.prompt_tokens,
            completion_tokens=response.completion_tokens,
            done_reason=response.done_reason,
            endpoint=response.endpoint,
            expires_at=time.time() + model.cache_ttl_s,
            tool_calls=response.tool_calls,
        )

    def _response(self, request: InferenceRequest, **fields: Any) -> InferenceResponse:
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
            priority=request.priority,
            tenant=request.tenant_or_session,
            **fields,
        )
        # Unknown model ids come from senders; keep them out of label values.
        label = request.model_id if self._settings.model(request.model_id) else "unknown"
        self._metrics.requests.labels(model=label, status=response.status).inc()
        self._metrics.latency_seconds.labels(model=label).observe(latency_ms / 1000)
        return response
