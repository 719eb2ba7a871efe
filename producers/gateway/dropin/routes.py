"""Wires the drop-in APIs (Ollama's and OpenAI's) and the reply reader into the gateway.

    add_dropin_routes(app, settings, metrics.registry, lambda: app[PRODUCER])

registers the routes of :mod:`producers.gateway.dropin.ollama` and :mod:`producers.gateway.dropin.openai`, starts
this instance's :class:`~producers.replies.ReplyReader` on startup (after the gateway's own
startup created the topics and the producer) and stops it on cleanup. See ``docs/drop-in.md``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import Any
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CollectorRegistry

from nexus.settings import Settings
from schemas import Codec, InferenceRequest

from producers.client import RequestProducer
from producers.admission import Admission, Rejection
from producers.gateway.dropin.call import DropIn, DropInMetrics
from producers.gateway.dropin.ollama import add_ollama_routes
from producers.gateway.dropin.openai import add_openai_routes, error_response
from producers.replies import Exchange, ReplyIndex, ReplyReader, instance_name

log = logging.getLogger(__name__)

OLLAMA_IS_RUNNING = "Ollama is running"


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
    admission: Admission | None = None,
    on_rejected: Callable[[InferenceRequest, Rejection], None] | None = None,
) -> DropIn:
    """Register the Ollama and OpenAI routes and the reply reader's lifecycle on ``app``.

    ``admission`` (the gateway's, shared with ``POST /infer``) decides 429s; ``on_rejected``
    counts them.

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
        admission=admission,
        on_rejected=on_rejected,
    )

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await reader.start()  # before the first call: every answer after this is seen
        log.info("reply reader %s follows %s and %s", reader.name, settings.kafka.responses_topic,
                 settings.kafka.tokens_topic)
        yield
        await dropin.drain()  # the cancels of clients that went away, before the producer stops
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
