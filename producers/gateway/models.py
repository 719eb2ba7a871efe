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

from nexus.kafka.readers import CompactedTopicReader
from nexus.settings import Settings
from nexus.tasks import Background
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


class EndpointStateReader(CompactedTopicReader):
    """Follows the state topic in the background; ``reports`` maps worker id to its latest.

    The loop runs under ``background`` as the task :attr:`TASK`; when it fails it is
    started again, reading the compacted topic from the beginning again (the reports
    read so far stay until newer ones replace them). ``GET /models`` lacks live data
    while it cannot read.
    """

    TASK = "endpoint-state"

    def __init__(self, settings: Settings, background: Background | None = None) -> None:
        super().__init__(settings.kafka, background, "nexus-gateway-endpoint-state")
        self._settings = settings
        self.reports: dict[str, WorkerReport] = {}

    @property
    def topic(self) -> str:
        return self._settings.kafka.state_topic

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
