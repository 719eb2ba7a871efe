"""The HTTP gateway: ``POST /infer`` onto Kafka, plus health, metrics and models.

A thin aiohttp shell: validation lives in :mod:`schemas.validation`, writing
to Kafka in :mod:`producers.client`, admission (429) in :mod:`producers.admission`.
Its three background readers (the endpoint state for ``GET /models``, the workers' queues
for ``GET /infer/{id}``, admission and ``GET /models``, the replies of the drop-in calls) are
restarted when they fail, and ``/health`` is red while one is down (:mod:`nexus.tasks`).

``GET /infer/{id}`` says where a request waits (position, estimated start) or that it runs;
``DELETE /infer/{id}`` cancels it (an ``InferenceCancel`` the worker holding it acts on).
The server runs with aiohttp's handler cancellation: a drop-in client that disconnects
cancels its request (:mod:`producers.gateway.dropin.call`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import httpx
from aiohttp import web
from aiokafka.errors import KafkaError
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from nexus import heap, tracing
from nexus.access import AccessPolicy, Forbidden
from nexus.metrics import role_registry
from nexus.kafka.topics import KafkaUnavailableError, TopicCreationError, ensure_topics
from nexus.settings import Settings
from nexus.startup import StartError, ensure_can_listen
from nexus.tasks import Background, TaskState
from schemas import InferenceRequest
from schemas.headers import PRIORITY_HEADER, TENANT_HEADER

from producers.gateway import access as access_http
from producers.client import RequestProducer, RequestTooLarge, SubmitError
from producers.admission import Admission, Rejection
from producers.gateway.dropin import add_dropin_routes
from producers.gateway.models import EndpointStateReader
from producers.gateway.page import add_page_routes
from producers.gateway.openapi import add_openapi_route
from producers.queue import QueueReader
from schemas import validation
from schemas.endpoint_state import model_key
from schemas.validation import RejectedRequest, effective_tenant, parse_json, request_from_json

log = logging.getLogger(__name__)

PRODUCER = web.AppKey("producer", RequestProducer)
HTTP = web.AppKey("http", httpx.AsyncClient)
MAX_BODY = web.AppKey("max_body", int)


class GatewayMetrics:
    """The gateway's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = role_registry()  # with process_* and python_*
        self.requests = Counter(
            "nexus_gateway_requests",
            "POST /infer requests by model and HTTP status.",
            ["model", "code"],
            registry=self.registry,
        )
        self.produce_seconds = Histogram(
            "nexus_gateway_produce_seconds",
            "Time until Kafka acknowledged a submitted request.",
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.rejected = Counter(
            "nexus_gateway_rejected",
            "Requests refused by admission (429, or 413 for one over the whole token budget), by model, "
            "priority, tenant and limit (requests_per_minute, tokens_per_minute, max_concurrent, deadline).",
            ["model", "priority", "tenant", "limit"],
            registry=self.registry,
        )
        self.cancels = Counter(
            "nexus_gateway_cancels",
            "Cancels produced by DELETE /infer/{id}.",
            registry=self.registry,
        )

    def reject(self, request: InferenceRequest, rejection: Rejection) -> None:
        self.rejected.labels(model=request.model_id, priority=request.priority, tenant=request.tenant_or_session,
                             limit=rejection.limit).inc()


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def rejection_response(rejection: Rejection) -> web.Response:
    """``POST /infer``'s 429: ``{"error", "retry_after_s"}`` and ``Retry-After`` (413 without them
    for a request bigger than its tenant's whole tokens-per-minute budget)."""
    if rejection.retry_after_s is None:
        return _error(rejection.status, rejection.message)
    return web.json_response({"error": rejection.message, "retry_after_s": rejection.retry_after_s}, status=429,
                             headers={"Retry-After": str(rejection.retry_after_s)})


def infer_body(body: bytes, headers: Any) -> Any:
    """The ``POST /infer`` JSON with ``X-Nexus-Priority``/``X-Nexus-Tenant`` filled in where the
    body does not give ``priority``/``tenant`` (the body wins); a bad header is a 400 naming it."""
    data = parse_json(body)
    if not isinstance(data, dict):
        return data  # refused by request_from_json with its message
    for field, header, check in (("priority", PRIORITY_HEADER, validation.priority),
                                 ("tenant", TENANT_HEADER, validation.tenant)):
        value = headers.get(header)
        if value is not None and data.get(field) is None:
            data[field] = check(value, header)
    return data


@web.middleware
async def _json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error the gateway answers is ``{"error": "..."}``, aiohttp's own ones too."""
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[MAX_BODY]
        return _error(413, f"body larger than the {limit}-byte limit")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason)


def create_app(settings: Settings, metrics: GatewayMetrics | None = None) -> web.Application:
    """Build the gateway application; Kafka is connected on startup."""
    metrics = metrics or GatewayMetrics()
    tracing.setup("nexus-gateway")  # spans exported only with an OTLP endpoint (docs/observability.md)
    app = web.Application(client_max_size=settings.gateway.max_body_bytes, middlewares=[_json_errors])
    app[MAX_BODY] = settings.gateway.max_body_bytes
    access_http.install(app, AccessPolicy(settings.access))  # API keys: docs/security.md
    known_models = set(settings.model_ids)
    background = Background()
    endpoint_state = EndpointStateReader(settings, background)
    queue = QueueReader(settings, background)
    admission = Admission(settings.tenant, queue.board)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await ensure_topics(settings.kafka)
        producer = RequestProducer(settings.kafka)
        await producer.start()
        app[PRODUCER] = producer
        app[HTTP] = httpx.AsyncClient(timeout=settings.gateway.health_timeout_s)
        await endpoint_state.start()
        await queue.start()
        yield
        await queue.stop()
        await endpoint_state.stop()
        await background.aclose()
        await app[HTTP].aclose()
        await producer.stop()

    async def infer(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            infer_request = request_from_json(infer_body(body, request.headers), known_models)
        except RejectedRequest as exc:
            metrics.requests.labels(model="", code=str(exc.status)).inc()
            return _error(exc.status, exc.message)
        try:
            access_http.authorize(request, infer_request.model_id)
        except Forbidden:
            metrics.requests.labels(model=infer_request.model_id, code="403").inc()
            raise  # the access middleware answers 403
        key_name = AccessPolicy.owner(access_http.key_of(request))
        infer_request = dataclasses.replace(
            infer_request, key_name=key_name,
            tenant=effective_tenant(key_name, infer_request.tenant, infer_request.context.session_id))
        rejection = admission.admit(infer_request)
        if rejection is not None:
            metrics.reject(infer_request, rejection)
            metrics.requests.labels(model=infer_request.model_id, code=str(rejection.status)).inc()
            return rejection_response(rejection)
        started = time.perf_counter()
        try:
            # Shielded: a client that disconnects meanwhile does not leave it half-produced.
            # The call's traceparent goes with the record (a new trace without one): nexus/tracing.py.
            await asyncio.shield(app[PRODUCER].submit(infer_request, **tracing.call_trace(request.headers)))
        except RequestTooLarge as exc:  # refused before producing: nothing was written
            admission.refund(infer_request)
            metrics.requests.labels(model=infer_request.model_id, code="413").inc()
            return _error(413, str(exc))
        except SubmitError as exc:
            admission.refund(infer_request)
            metrics.requests.labels(model=infer_request.model_id, code="503").inc()
            return _error(503, str(exc))
        metrics.produce_seconds.observe(time.perf_counter() - started)
        metrics.requests.labels(model=infer_request.model_id, code="202").inc()
        return web.json_response({"id": infer_request.id, "status": "submitted"}, status=202)

    def request_id_of(request: web.Request) -> str:
        try:
            return validation.request_id(request.match_info["id"], "id")
        except RejectedRequest as exc:
            raise web.HTTPBadRequest(reason=exc.message) from None

    async def where(request: web.Request) -> web.Response:
        """``GET /infer/{id}``: queued (position, ETA) or running, by the workers' latest reports."""
        request_id = request_id_of(request)
        found = queue.board.find(request_id, time.time())
        key = access_http.key_of(request)
        # With keys on, a key sees only its own requests (their tenant is the key's name).
        if found is not None and AccessPolicy.may_see(key, found.tenant):
            return web.json_response(found.to_json(time.time()))
        return web.json_response({
            "id": request_id, "state": "unknown",
            "error": f"no worker reports request {request_id!r} as queued or running: it is answered already "
                     "(read its response), not read by a worker yet, or unknown"
                     + (" to this API key" if key is not None else ""),
        }, status=404)

    async def cancel(request: web.Request) -> web.Response:
        """``DELETE /infer/{id}``: ask the worker holding it to drop it or abort its call (202)."""
        request_id = request_id_of(request)
        key_name = AccessPolicy.owner(access_http.key_of(request))
        try:
            await asyncio.shield(app[PRODUCER].cancel(request_id, reason="cancelled by the client (DELETE /infer)",
                                                      key_name=key_name))
        except SubmitError as exc:
            return _error(503, str(exc))
        metrics.cancels.inc()
        return web.json_response({"id": request_id, "status": "cancelling"}, status=202)

    async def health(request: web.Request) -> web.Response:
        checks = await check_health(settings, app[PRODUCER], app[HTTP])
        states = (endpoint_state.state, queue.state, replies.state)
        checks.update(reader_checks(s for s in states if s is not None))
        healthy = all(c["status"] == "ok" for c in checks.values())
        return web.json_response(
            {"status": "ok" if healthy else "unavailable", "checks": checks},
            status=200 if healthy else 503,
        )

    async def metrics_page(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def models(request: web.Request) -> web.Response:
        allowed = set(app[access_http.POLICY].models_for(access_http.key_of(request), settings.model_ids))
        now = time.time()
        return web.json_response({"models": [{**m, "queue": queue.board.model_queue(m["id"], now)}
                                             for m in endpoint_state.models() if m["id"] in allowed]})

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/infer", infer)
    app.router.add_get("/infer/{id}", where)
    app.router.add_delete("/infer/{id}", cancel)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/models", models)
    add_openapi_route(app, settings)  # GET /openapi.json
    # Ollama's /api/* and OpenAI's /v1/* answered over Kafka; starts the reply reader (docs/drop-in.md).
    replies = add_dropin_routes(app, settings, metrics.registry, lambda: app[PRODUCER], admission=admission,
                                on_rejected=metrics.reject).exchange.reader
    add_page_routes(app, settings)  # /, /config.json, /static/: the live page
    return app


def reader_checks(states: Iterable[TaskState]) -> dict[str, dict[str, Any]]:
    """``/health`` entries ``reader:<name>``: down from a failure until the restarted reader is up."""
    checks: dict[str, dict[str, Any]] = {}
    for state in states:
        check: dict[str, Any] = {"status": "ok" if state.up else "down", "restarts": state.restarts}
        if state.last_error is not None:
            check["last_error"] = state.last_error
        if not state.up:
            now = "not following its topic yet" if state.running else state.status
            failed = f"; it failed with {state.last_error}" if state.last_error else ""
            check["reason"] = f"the {state.name} reader is {now}{failed}"
        checks[f"reader:{state.name}"] = check
    return checks


async def check_health(
    settings: Settings, producer: RequestProducer, http: httpx.AsyncClient
) -> dict[str, dict[str, str]]:
    """Ask Kafka and every model endpoint, concurrently, whether they answer and have their models."""

    async def kafka() -> dict[str, str]:
        try:
            await producer.ping(settings.gateway.health_timeout_s)
        except SubmitError as exc:
            return {"status": "down", "reason": str(exc)}
        return {"status": "ok", "bootstrap": settings.kafka.bootstrap}

    async def endpoint(url: str, kind: str) -> dict[str, Any]:
        """Whether the endpoint answers, and the models it lists (Ollama /api/tags, OpenAI /v1/models)."""
        try:
            response = await http.get(f"{url}/v1/models" if kind == "openai" else f"{url}/api/tags")
            response.raise_for_status()
            body = response.json()
            listed = body.get("data", []) if kind == "openai" else body.get("models", [])
            names = [m.get("id" if kind == "openai" else "name") for m in listed if isinstance(m, dict)]
            return {"status": "ok", "models": {model_key(n) for n in names if isinstance(n, str)}}
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            return {"status": "down", "reason": f"{type(exc).__name__}: {exc}"}

    kinds = {e.url: e.kind for m in settings.models for e in m.endpoints}
    urls = sorted(kinds)
    results = await asyncio.gather(kafka(), *(endpoint(u, kinds[u]) for u in urls))
    checks: dict[str, dict[str, str]] = {"kafka": results[0]}
    by_url = dict(zip(urls, results[1:]))
    for model in settings.models:
        up = [u for u in model.urls if by_url[u]["status"] == "ok"]
        having = [u for u in up if model_key(model.id) in by_url[u]["models"]]
        if having:
            checks[f"model:{model.id}"] = {"status": "ok", "endpoints": ", ".join(having)}
        elif up:
            checks[f"model:{model.id}"] = {"status": "down", "reason": "; ".join(
                f"{u} answers but does not have model {model.id!r} (it has {sorted(by_url[u]['models']) or 'none'})"
                for u in up)}
        else:
            checks[f"model:{model.id}"] = {
                "status": "down", "reason": "; ".join(f"{u}: {by_url[u]['reason']}" for u in model.urls)}
    return checks


async def serve(settings: Settings) -> None:
    """Run the gateway until cancelled.

    Raises :class:`~nexus.startup.StartError` when its port is taken (checked first, before any
    wait for Kafka) or no broker answers within ``kafka.connect_timeout_s``.
    """
    host, port = settings.gateway.host, settings.gateway.port
    ensure_can_listen(host, port, "gateway.port")
    # Handler cancellation: a drop-in client that disconnects cancels its waiting handler, which
    # cancels its request (docs/drop-in.md); POST /infer shields its produce from it.
    runner = web.AppRunner(create_app(settings), access_log=None, handler_cancellation=True)
    try:
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
    except (KafkaUnavailableError, TopicCreationError, SubmitError) as exc:
        await runner.cleanup()
        raise StartError(str(exc)) from None
    except KafkaError as exc:
        await runner.cleanup()
        raise StartError(f"Kafka at {settings.kafka.bootstrap}: {exc}") from None
    except OSError as exc:  # taken since ensure_can_listen looked
        await runner.cleanup()
        raise StartError(f"cannot listen on {host}:{port} (gateway.port): {exc.strerror or exc}") from None
    heap.settle()  # what the started gateway holds is out of every later collection (nexus/heap.py)
    log.info("gateway listening on http://%s:%d", host, port)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
