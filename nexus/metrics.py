"""The Prometheus registry every role's ``/metrics`` starts from.

Each role keeps its metrics in a registry of its own (tests and several roles in one process must
not share one), and a fresh ``CollectorRegistry`` is empty: without the collectors below a scrape
has none of the standard ``process_*`` (CPU, memory, file descriptors, start time),
``python_gc_*`` and ``python_info`` series that dashboards and alerts beside Nexus expect.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector


def role_registry() -> CollectorRegistry:
    """An empty registry with the process, garbage-collector and platform collectors in it."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry
