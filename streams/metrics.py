"""The worker's Prometheus metrics, in a registry of its own."""

from __future__ import annotations

from typing import Any, TypeVar, cast

from prometheus_client import Counter, Gauge, Histogram

from nexus.metrics import role_registry

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


#: The tenant label of a tenant that is neither configured nor an API key's name: tenants default
#: to the session, and one label value per session would grow without bound.
OTHER_TENANT = "other"


M = TypeVar("M")


class _Children:
    """A labelled metric whose child of each label values is looked up once: prometheus_client's
    ``labels()`` costs ~4 µs a call (a tuple of ``str()``s under a lock), and the worker asks for
    a dozen per request. Label values are bounded (models, endpoints, known tenants), so is this."""

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[Any, ...], Any] = {}

    def labels(self, *values: Any, **named: Any) -> Any:
        key = values or tuple(named.items())  # one call site names them in one order
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._metric.labels(*values, **named)
        return child

    def __getattr__(self, name: str) -> Any:
        return getattr(self._metric, name)


def cached(metric: M) -> M:
    """``metric`` with its children looked up once (:class:`_Children`)."""
    return cast(M, _Children(metric))


class WorkerMetrics:
    """``known_tenants`` are the tenants labelled by name (configured ones, API keys' names)."""

    def __init__(self, known_tenants: frozenset[str] = frozenset()) -> None:
        self.known_tenants = known_tenants
        self._queued_labels: set[tuple[str, str, str]] = set()
        r = self.registry = role_registry()  # with process_* and python_*
        self.requests = cached(Counter(
            "nexus_worker_requests", "Requests answered, by model and response status.",
            ["model", "status"], registry=r))
        self.latency_seconds = cached(Histogram(
            "nexus_worker_latency_seconds", "End to end: request created_at to response completed_at.",
            ["model"], registry=r, buckets=_LATENCY_BUCKETS))
        self.backend_seconds = cached(Histogram(
            "nexus_worker_backend_latency_seconds", "Time an endpoint took to answer a successful call.",
            ["model", "endpoint"], registry=r, buckets=_LATENCY_BUCKETS))
        self.ttft_seconds = cached(Histogram(
            "nexus_worker_time_to_first_token_seconds", "Time to the first chunk of streamed answers.",
            ["model", "endpoint"], registry=r, buckets=_LATENCY_BUCKETS))
        self.tokens_per_second = cached(Gauge(
            "nexus_worker_tokens_per_second", "EWMA of output tokens per second while generating.",
            ["model", "endpoint"], registry=r))
        self.backend_requests = cached(Counter(
            "nexus_worker_backend_requests", "Calls to model endpoints by outcome.",
            ["model", "endpoint", "outcome"], registry=r))
        self.in_flight = cached(Gauge(
            "nexus_worker_in_flight_requests", "Requests sent to an endpoint and not yet answered.",
            ["model", "endpoint"], registry=r))
        self.queue_wait = cached(Histogram(
            "nexus_worker_queue_wait_seconds", "Time a request waited for a free endpoint slot.",
            ["model"], registry=r, buckets=_LATENCY_BUCKETS))
        self.retries = cached(Counter(
            "nexus_worker_retries", "Attempts repeated on another endpoint after a failure.",
            ["model"], registry=r))
        self.circuit_state = cached(Gauge(
            "nexus_worker_circuit_state", "Endpoint circuit: 0 closed, 1 half-open (probing), 2 open.",
            ["model", "endpoint"], registry=r))
        self.cache = cached(Counter(
            "nexus_worker_cache_lookups", "Response cache lookups by result (hit or miss).",
            ["model", "result"], registry=r))
        self.cache_entries = Gauge(
            "nexus_worker_cache_entries", "Entries in this worker's part of the response cache.",
            registry=r)
        self.cache_deletions = cached(Counter(
            "nexus_worker_cache_deletions", "Response cache entries deleted: expired, or evicted over worker.cache_max_entries.",
            ["reason"], registry=r))
        self.batch_size = Histogram(
            "nexus_worker_batch_size", "Requests per batch window.",
            registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.shared = cached(Counter(
            "nexus_worker_shared_requests", "Requests answered by another identical request's call in the same batch.",
            ["model"], registry=r))
        self.dead_letters = cached(Counter(
            "nexus_worker_dead_letters", "Records written to the dead-letter topic, by kind of failure.",
            ["kind"], registry=r))
        for kind in ("failed", "undecodable", "undeliverable"):  # exported at 0, so the first one shows in rate()/increase()
            self.dead_letters.labels(kind=kind)
        self.consumer_lag = Gauge(
            "nexus_worker_consumer_lag_records",
            "Requests not yet consumed, per lane (interactive: inference.requests, batch: inference.requests.batch) "
            "and partition.",
            ["lane", "partition"], registry=r)
        scheduled = ["model", "priority", "tenant"]
        self.queued = cached(Gauge(
            "nexus_worker_queued_requests", "Requests waiting for their turn on a model, by priority and tenant.",
            scheduled, registry=r))
        self.schedule_wait = cached(Histogram(
            "nexus_worker_schedule_wait_seconds", "Time a request waited for its turn before its model call started.",
            scheduled, registry=r, buckets=_LATENCY_BUCKETS))
        self.dispatched = cached(Counter(
            "nexus_worker_dispatched_requests", "Requests whose model call started, by priority and tenant.",
            scheduled, registry=r))
        self.expired = cached(Counter(
            "nexus_worker_expired_requests", "Requests answered `expired`: their deadline passed first.",
            scheduled, registry=r))
        self.cancelled = cached(Counter(
            "nexus_worker_cancelled_requests", "Requests answered `cancelled` by their sender's cancel.",
            scheduled, registry=r))
        self.task_failures = Counter(
            "nexus_worker_task_failures", "Failures while answering a request (each retried, then answered with an error).",
            registry=r)
        self.redeliveries = Counter(
            "nexus_worker_redeliveries", "Requests read again (rebalance, rewind) and not answered again: "
            "running or answered already, or stale (an older generation, a partition not owned).",
            ["verdict"], registry=r)
        self.rereads = Counter(
            "nexus_worker_rereads", "Seeks back to read again requests the consumer skipped (a hole in a partition's run).",
            registry=r)

    def tenant(self, name: str) -> str:
        """``name`` as a label value: itself if known, else :data:`OTHER_TENANT`."""
        return name if name in self.known_tenants else OTHER_TENANT

    def observe_queue(self, model: str, waiting: dict[tuple[str, str], int]) -> None:
        """Set the queued gauge of ``model`` from {(priority, tenant): waiting}; absent ones go to 0."""
        counts: dict[tuple[str, str, str], int] = {}
        for (priority, tenant), n in waiting.items():
            key = (model, priority, self.tenant(tenant))
            counts[key] = counts.get(key, 0) + n
        for key in [k for k in self._queued_labels if k[0] == model and k not in counts]:
            self.queued.labels(*key).set(0)
        for key, n in counts.items():
            self.queued.labels(*key).set(n)
            self._queued_labels.add(key)
