"""The bridge's Prometheus metrics (``GET /metrics`` on its port), in a registry of its own.

Besides the standard ``process_*``/``python_*`` series (:func:`nexus.metrics.role_registry`), the
two counts ``/health`` shows, read when scraped: a bridge holds no other state worth a series.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest

from nexus.metrics import role_registry

__all__ = ["CONTENT_TYPE_LATEST", "BridgeMetrics"]


class BridgeMetrics:
    """``status`` is :meth:`consumers.bridge.core.BridgeCore.status`: ``{"clients", "subscribed"}``."""

    def __init__(self, status: Callable[[], Mapping[str, int]]) -> None:
        self.registry = role_registry()
        clients = Gauge("nexus_bridge_clients", "Websocket clients connected.", registry=self.registry)
        clients.set_function(lambda: status()["clients"])
        subscribed = Gauge("nexus_bridge_subscribed_clients", "Clients holding at least one subscription.",
                           registry=self.registry)
        subscribed.set_function(lambda: status()["subscribed"])

    def page(self) -> str:
        """The Prometheus text format of every series."""
        return generate_latest(self.registry).decode()
