"""Answer one decoded request: pick an endpoint, call Ollama, build the response.

No Kafka here: the Faust agent in :mod:`streams.app` feeds requests in and
publishes what comes out, so this runs the same in tests and in the worker.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import httpx

from nexus.settings import ModelSettings, Settings
from schemas import InferenceRequest, InferenceResponse, utcnow

from .metrics import WorkerMetrics
from .ollama import BackendError, generate
from .prompt import PromptTemplate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    response: InferenceResponse
    # Why the request also belongs in the dead-letter topic, when it failed.
    dead_letter_reason: str | None = None


class EndpointLoad:
    """Picks the endpoint of a model with the fewest requests in flight."""

    def __init__(self) -> None:
        self._in_flight: Counter[str] = Counter()

    def acquire(self, model: ModelSettings) -> str:
        endpoint = min(model.endpoints, key=lambda e: self._in_flight[e])
        self._in_flight[endpoint] += 1
        return endpoint

    def release(self, endpoint: str) -> None:
        self._in_flight[endpoint] -= 1


class Inference:
    def __init__(self, settings: Settings, http: httpx.AsyncClient, metrics: WorkerMetrics) -> None:
        self._settings = settings
        self._http = http
        self._metrics = metrics
        self._template = PromptTemplate(settings.worker.prompt_template)
        self._load = EndpointLoad()

    async def answer(self, request: InferenceRequest) -> Answer:
        model = self._settings.model(request.model_id)
        if model is None:
            reason = (
                f"unknown model {request.model_id!r}; this worker serves "
                f"{sorted(self._settings.model_ids)}"
            )
            return self._failed(request, reason, endpoint=None, backend_ms=0)
        endpoint = self._load.acquire(model)
        self._metrics.in_flight.labels(model=model.id).inc()
        try:
            generation = await generate(
                self._http,
                endpoint,
                model.id,
                request.input,
                self._template.system_prompt(request.context),
                request.options,
                model.timeout_s,
            )
        except BackendError as exc:
            return self._failed(request, str(exc), endpoint=endpoint, backend_ms=0)
        except Exception as exc:  # a bug must still answer the sender, never drop the request
            log.exception("unexpected failure answering %s", request.id)
            return self._failed(request, f"internal error: {exc!r}", endpoint=endpoint, backend_ms=0)
        finally:
            self._load.release(endpoint)
            self._metrics.in_flight.labels(model=model.id).dec()
        self._metrics.backend_seconds.labels(model=model.id).observe(generation.seconds)
        return Answer(
            self._response(
                request,
                status="ok",
                output=generation.text,
                endpoint=endpoint,
                backend_ms=round(generation.seconds * 1000),
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
                done_reason=generation.done_reason,
            )
        )

    def _failed(
        self, request: InferenceRequest, reason: str, endpoint: str | None, backend_ms: int
    ) -> Answer:
        response = self._response(
            request, status="error", error=reason, endpoint=endpoint, backend_ms=backend_ms
        )
        return Answer(response, dead_letter_reason=reason)

    def _response(self, request: InferenceRequest, **fields) -> InferenceResponse:  # type: ignore[no-untyped-def]
        completed = utcnow()
        latency_ms = max(0, round((completed - request.created_at).total_seconds() * 1000))
        response = InferenceResponse(
            id=request.id,
            model_id=request.model_id,
            context=request.context,
            completed_at=completed,
            latency_ms=latency_ms,
            backend_latency_ms=fields.pop("backend_ms"),
            **fields,
        )
        # Unknown model ids come from senders; keep them out of label values.
        label = request.model_id if self._settings.model(request.model_id) else "unknown"
        self._metrics.requests.labels(model=label, status=response.status).inc()
        self._metrics.latency_seconds.labels(model=label).observe(latency_ms / 1000)
        return response
