"""The worker's Prometheus metrics, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "nexus_worker_requests",
            "Requests answered, by model and response status.",
            ["model", "status"],
            registry=self.registry,
        )
        self.latency_seconds = Histogram(
            "nexus_worker_latency_seconds",
            "End-to-end latency: request created_at to response completed_at.",
            ["model"],
            registry=self.registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.backend_seconds = Histogram(
            "nexus_worker_backend_latency_seconds",
            "Time the model endpoint took to answer.",
            ["model"],
            registry=self.registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.in_flight = Gauge(
            "nexus_worker_in_flight_requests",
            "Requests sent to a model endpoint and not yet answered.",
            ["model"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "nexus_worker_batch_size",
            "Requests per batch window.",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.dead_letters = Counter(
            "nexus_worker_dead_letters",
            "Records written to the dead-letter topic, by kind of failure.",
            ["kind"],
            registry=self.registry,
        )
