"""The workers' live view of the model endpoints, read from the state topic.

Workers publish their routing state (in flight, EWMA latency, tokens/s, circuit)
every few seconds to a compacted topic keyed by worker; the gateway keeps the
latest record per worker and merges them for ``GET /models``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from nexus.kafka.clients import client_options
from nexus.settings import Settings

log = logging.getLogger(__name__)

STALE_AFTER_S = 15.0


def merge_states(
    settings: Settings, reports: dict[str, dict[str, Any]], now: float
) -> list[dict[str, Any]]:
    """Configured models and endpoints, each with what fresh worker reports say of it."""
    fresh = [r for r in reports.values() if now - r.get("at", 0) <= STALE_AFTER_S]
    models = []
    for model in settings.models:
        endpoints = []
        for endpoint in model.endpoints:
            seen = [
                e for r in fresh for e in r.get("models", {}).get(model.id, []) if e.get("url") == endpoint.url
            ]
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
            endpoints.append({**_endpoint_settings(endpoint), "live": live})
        models.append(
            {
                "id": model.id,
                "endpoints": endpoints,
                "timeout_s": model.timeout_s,
                "retries": model.retries,
                "fallback": model.fallback,
                "cache": model.cache,
                "cache_ttl_s": model.cache_ttl_s,
            }
        )
    return models


def _endpoint_settings(endpoint: Any) -> dict[str, Any]:
    return {
        "url": endpoint.url,
        "weight": endpoint.weight,
        "max_concurrency": endpoint.max_concurrency,
        "max_rps": endpoint.max_rps,
    }


def _mean(values: Any) -> float | None:
    numbers = [v for v in values if isinstance(v, (int, float))]
    return sum(numbers) / len(numbers) if numbers else None


class EndpointStateReader:
    """Follows the state topic in the background; ``reports`` maps worker id to its latest."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.reports: dict[str, dict[str, Any]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._follow())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    def models(self) -> list[dict[str, Any]]:
        return merge_states(self._settings, self.reports, time.time())

    async def _follow(self) -> None:
        kafka = self._settings.kafka
        consumer = AIOKafkaConsumer(**client_options(kafka), group_id=None, enable_auto_commit=False)
        await consumer.start()
        try:
            tp = TopicPartition(kafka.state_topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            async for record in consumer:
                try:
                    report = json.loads(record.value)
                    self.reports[report["worker"]] = report
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("ignoring a malformed endpoint-state record: %r", exc)
        finally:
            await consumer.stop()
