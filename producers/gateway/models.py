"""The workers' live view of the model endpoints, read from the state topic.

Workers publish their routing state (in flight, EWMA latency, tokens/s, circuit)
every few seconds to a compacted topic keyed by worker; the gateway keeps the
latest record per worker and merges them for ``GET /models``. The record's shape
is :class:`schemas.endpoint_state.WorkerReport`, shared with the worker.

Residency too: each endpoint's ``live`` says whether it has the model (``has_model``),
whether the model is loaded there (``loaded``) and what it has (``models``); each model
lists the endpoints that lack it in ``missing_on`` (``available`` is false when every
endpoint lacks it: its requests are answered ``model_not_found``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from nexus.kafka.readers import known_partitions, reader
from nexus.settings import Settings
from nexus.tasks import Background, TaskState
from schemas import SchemaError, WorkerReport

log = logging.getLogger(__name__)

STALE_AFTER_S = 15.0


def merge_states(
    settings: Settings, reports: Mapping[str, WorkerReport], now: float
) -> list[dict[str, Any]]:
    """Configured models and endpoints, each with what fresh worker reports say of it."""
    fresh = [r for r in reports.values() if now - r.at <= STALE_AFTER_S]
    models = []
    for model in settings.models:
        endpoints = []
        for endpoint in model.endpoints:
            seen = [e for r in fresh for e in _endpoints(r, model.id) if e.get("url") == endpoint.url]
            live: dict[str, Any] = {"workers_reporting": len(seen)}
            if seen:
                live["in_flight"] = sum(e.get("in_flight", 0) for e in seen)
                live["served"] = sum(e.get("served", 0) for e in seen)
                live["failed"] = sum(e.get("failed", 0) for e in seen)
                limits = [e["concurrency_limit"] for e in seen if isinstance(e.get("concurrency_limit"), int)]
                live["concurrency_limit"] = min(limits) if limits else None  # lowered by "server busy"
                live["ewma_seconds_per_request"] = _mean(e.get("ewma_seconds_per_request") for e in seen)
                live["ewma_ttft_seconds"] = _mean(e.get("ewma_ttft_seconds") for e in seen)
                live["tokens_per_second"] = _mean(e.get("tokens_per_second") for e in seen)
                circuits = {e.get("circuit") for e in seen}
                # The worst view wins: one worker that cannot reach it is worth knowing about.
                live["circuit"] = (
                    "open" if "open" in circuits else "half_open" if "half_open" in circuits else "closed"
                )
                live["healthy"] = live["circuit"] == "closed"
                live["last_error"] = next((e["last_error"] for e in seen if e.get("last_error")), None)
                live.update(_residency(seen))
            endpoints.append({**_endpoint_settings(endpoint), "live": live})
        missing_on = [e["url"] for e in endpoints if e["live"].get("has_model") is False]
        models.append(
            {
                "id": model.id,
                "endpoints": endpoints,
                # Endpoints that do not have the model (their inventory, or a 404 for it).
                "missing_on": missing_on,
                "available": len(missing_on) < len(endpoints),
                "timeout_s": model.timeout_s,
                "retries": model.retries,
                "fallback": model.fallback,
                "cache": model.cache,
                "cache_ttl_s": model.cache_ttl_s,
            }
        )
    return models


def _residency(seen: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether the endpoint has the model and has it loaded, as the workers that know say:
    one worker told "model not found" is worth knowing about; ``None`` when none knows."""
    has = [e.get("has_model") for e in seen if isinstance(e.get("has_model"), bool)]
    loaded = [e.get("loaded") for e in seen if isinstance(e.get("loaded"), bool)]
    names = next((e["models"] for e in seen if isinstance(e.get("models"), list)), None)
    return {
        "has_model": (all(has) if has else None),
        "loaded": (any(loaded) if loaded else None),
        "models": names,
    }


def _endpoint_settings(endpoint: Any) -> dict[str, Any]:
    return {
        "url": endpoint.url,
        "weight": endpoint.weight,
        "max_concurrency": endpoint.max_concurrency,
        "max_rps": endpoint.max_rps,
    }


def _endpoints(report: WorkerReport, model_id: str) -> list[dict[str, Any]]:
    """The endpoint reports of one model in a worker's report, ignoring anything misshapen."""
    entries = report.models.get(model_id)
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def _mean(values: Any) -> float | None:
    numbers = [v for v in values if isinstance(v, (int, float))]
    return sum(numbers) / len(numbers) if numbers else None


class EndpointStateReader:
    """Follows the state topic in the background; ``reports`` maps worker id to its latest.

    The loop runs under ``background`` as the task :attr:`TASK`; when it fails it is
    started again, reading the compacted topic from the beginning again (the reports
    read so far stay until newer ones replace them).
    """

    TASK = "endpoint-state"

    def __init__(self, settings: Settings, background: Background | None = None) -> None:
        self._settings = settings
        self._background = background or Background()
        self.reports: dict[str, WorkerReport] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._state: TaskState | None = None
        self._following = False

    @property
    def state(self) -> TaskState | None:
        """The reading task as ``/health`` reports it; ``None`` before :meth:`start`."""
        return self._state

    async def start(self) -> None:
        """Connect now if Kafka lets us (so ``/health`` is green from the start), then follow in the background.

        A failure to connect is not fatal: ``GET /models`` then lacks live data, the loop
        keeps trying, and ``/health`` says so.
        """
        try:
            self._consumer = await self._connect()
            self._following = True
        except Exception as exc:  # noqa: BLE001 - retried, with the traceback, by the loop
            log.warning("cannot read %s yet (%s); retrying in the background", self._settings.kafka.state_topic, exc)
        self._state = self._background.start(self.TASK, self._follow, ready=lambda: self._following)

    async def stop(self) -> None:
        self._following = False
        await self._background.stop(self.TASK)
        self._state = None
        if self._consumer is not None:  # stopped before its loop ever ran
            await self._consumer.stop()
            self._consumer = None

    def models(self) -> list[dict[str, Any]]:
        return merge_states(self._settings, self.reports, time.time())

    def ingest(self, value: bytes | None) -> bool:
        """Keep a record's report as its worker's latest; a malformed record is logged and skipped."""
        try:
            report = WorkerReport.from_bytes(value or b"")
        except SchemaError as exc:
            log.warning("ignoring a malformed endpoint-state record: %s", exc)
            return False
        self.reports[report.worker] = report
        return True

    async def _connect(self) -> AIOKafkaConsumer:
        """A started consumer assigned every partition of the state topic, at its beginning."""
        kafka = self._settings.kafka
        consumer = reader(kafka, client_id="nexus-gateway-endpoint-state")
        try:
            await consumer.start()
            tps = [TopicPartition(kafka.state_topic, p) for p in await known_partitions(consumer, kafka.state_topic)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
        except BaseException:
            await consumer.stop()
            raise
        return consumer

    async def _follow(self) -> None:
        """The supervised loop: read until cancelled; a failure propagates (logged, restarted)."""
        try:
            if self._consumer is None:  # a restart: from the beginning again
                self._consumer = await self._connect()
                self._following = True
            consumer = self._consumer
            while True:
                batches = await consumer.getmany(timeout_ms=1000)
                for records in batches.values():
                    for record in records:
                        self.ingest(record.value)
        finally:
            self._following = False
            consumer, self._consumer = self._consumer, None
            if consumer is not None:
                await consumer.stop()
