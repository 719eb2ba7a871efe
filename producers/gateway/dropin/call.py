"""Wires the drop-in APIs (Ollama's and OpenAI's) and the reply reader into the gateway.

    add_dropin_routes(app, settings, metrics.registry, lambda: app[PRODUCER])

registers the routes of :mod:`producers.gateway.dropin.ollama` and :mod:`producers.gateway.dropin.openai`, starts
this instance's :class:`~producers.gateway.replies.ReplyReader` on startup (after the gateway's own
startup created the topics and the producer) and stops it on cleanup. See ``docs/drop-in.md``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any, AsyncIterator

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from nexus.settings import Settings
from schemas import Codec

from producers.client import RequestProducer
from producers.gateway.dropin.ollama import add_ollama_routes
from producers.gateway.dropin.openai import add_openai_routes, error_response
from producers.gateway.replies import Exchange, ReplyIndex, ReplyReader, instance_name

log = logging.getLogger(__name__)

OLLAMA_IS_RUNNING = "Ollama is running"


class DropInMetrics:
    """The drop-in APIs' metrics, in the gateway's registry (``nexus_gateway_*``)."""

    def __init__(self, registry: CollectorRegistry, index: ReplyIndex, reader: ReplyReader) -> None:
        self.requests = Counter(
            "nexus_gateway_dropin_requests",
            "Ollama- and OpenAI-API calls by API, route, model and HTTP status.",
            ["api", "route", "model", "code"],
            registry=registry,
        )
        self.reply_seconds = Histogram(
            "nexus_gateway_reply_seconds",
            "Synchronous calls: from Kafka's acknowledgement of the request to its final answer.",
            ["api"],
            registry=registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.timeouts = Counter(
            "nexus_gateway_reply_timeouts",
            "Synchronous calls answered 504 because their answer did not come in time.",
            ["api"],
            registry=registry,
        )
        waiting = Gauge("nexus_gateway_replies_waiting", "Calls waiting for their answer.", registry=registry)
        waiting.set_function(lambda: len(index))
        records = Gauge(
            "nexus_gateway_reply_records",
            "Records the reply reader read: addressed to this gateway (decoded) or skipped unread.",
            ["outcome"],
            registry=registry,
        )
        records.labels(outcome="mine").set_function(lambda: reader.mine)
        records.labels(outcome="skipped").set_function(lambda: reader.skipped)

    def count(self, api: str, route: str, model: str, code: int) -> None:
        self.requests.labels(api=api, route=route, model=model, code=str(code)).inc()

    def answered(self, api: str, seconds: float) -> None:
        self.reply_seconds.labels(api=api).observe(seconds)


@dataclass
class DropIn:
    """What the drop-in handlers share: settings, the exchange, metrics, a clock."""

    settings: Settings
    exchange: Exchange
    metrics: DropInMetrics
    version: str
    clock: Callable[[], float]


def nexus_version() -> str:
    try:
        return metadata.version("nexus-inference")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def wants_html(accept: str) -> bool:
    """A browser asks for HTML; Ollama clients and curl do not."""
    return "text/html" in accept.lower()


def add_dropin_routes(
    app: web.Application,
    settings: Settings,
    registry: CollectorRegistry,
    producer: Callable[[], RequestProducer],
    name: str | None = None,
) -> DropIn:
    """Register the Ollama and OpenAI routes and the reply reader's lifecycle on ``app``.

    Call after the gateway's own cleanup context is appended, so the topics and the
    producer exist when the reader starts, and the reader stops before the producer.
    """
    index = ReplyIndex()
    reader = ReplyReader(settings.kafka, name or instance_name(), index, Codec.from_directory())
    dropin = DropIn(
        settings=settings,
        exchange=Exchange(reader, index, producer),
        metrics=DropInMetrics(registry, index, reader),
        version=nexus_version(),
        clock=lambda: asyncio.get_running_loop().time(),
    )

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await reader.start()  # before the first call: every answer after this is seen
        log.info("reply reader %s follows %s and %s", reader.name, settings.kafka.responses_topic,
                 settings.kafka.tokens_topic)
        yield
        await reader.stop()

    @web.middleware
    async def compat(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
        """``GET /``: the page for browsers, Ollama's greeting for everyone else; OpenAI's error shape under /v1."""
        if request.path == "/" and request.method in ("GET", "HEAD") and not wants_html(request.headers.get("Accept", "")):
            return web.Response(text=OLLAMA_IS_RUNNING)
        if not request.path.startswith("/v1/"):
            return await handler(request)
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            text = exc.text or ""
            return error_response(exc.status, exc.reason if not text or text.startswith(f"{exc.status}:") else text)

    app.cleanup_ctx.append(lifecycle)
    app.middlewares.append(compat)
    add_ollama_routes(app, dropin)
    add_openai_routes(app, dropin)
    return dropin
