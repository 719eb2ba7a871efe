"""The HTTP gateway: ``POST /infer``, the drop-in Ollama and OpenAI APIs, health, metrics, the page.

    from producers.gateway import serve
    await serve(settings)                       # what ``nexus gateway`` runs

    app = create_app(settings)                  # an aiohttp application, e.g. for tests

The names are loaded from :mod:`producers.gateway.app` on first use, so the producer API,
which reads its answers with :mod:`producers.replies`, never loads aiohttp.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from producers.gateway.app import GatewayMetrics, check_health, create_app, reader_checks, serve

__all__ = [
    # running it
    "serve",
    "create_app",
    # its parts
    "GatewayMetrics",
    "check_health",
    "reader_checks",
]


def __getattr__(name: str) -> object:
    if name not in __all__:
        raise AttributeError(f"module 'producers.gateway' has no attribute {name!r}")
    value = getattr(importlib.import_module("producers.gateway.app"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
