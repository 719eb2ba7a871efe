"""Nexus's producers: the Python producer API, ``nexus submit`` and the HTTP gateway.

    import producers

    async with producers.RequestProducer(settings.kafka) as producer:
        response = await producer.submit_and_wait(request, timeout_s=60)

    with producers.SyncRequestProducer(settings.kafka) as producer:   # code without asyncio
        response = producer.submit_and_wait(request)

The names below live in :mod:`producers.client` (still importable from there) and
are loaded on first use: ``nexus`` builds its command line from this package without
loading Kafka's client, and importing it never loads the gateway (:mod:`producers.gateway`),
aiohttp or websockets.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from producers.client import (
        ProducerClosedError,
        ProducerError,
        RequestProducer,
        RequestTooLarge,
        ResponsesUnavailableError,
        ResponseTimeoutError,
        SubmitError,
        SyncRequestProducer,
    )

__all__ = [
    # clients
    "RequestProducer",
    "SyncRequestProducer",
    # errors
    "ProducerError",
    "SubmitError",
    "RequestTooLarge",
    "ResponseTimeoutError",
    "ResponsesUnavailableError",
    "ProducerClosedError",
]


def __getattr__(name: str) -> object:
    if name not in __all__:
        raise AttributeError(f"module 'producers' has no attribute {name!r}")
    value = getattr(importlib.import_module("producers.client"), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
