"""The endpoint-state record: what one worker reports of the endpoints it routes to.

Workers publish one record per worker (key: the worker id) to the compacted
``nexus.endpoint-state`` topic every few seconds; gateways keep the latest per
worker for ``GET /models``. The value is JSON, not Avro, because only Nexus's own
processes read it and its fields follow the router's state; this module is the one
place both sides agree on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from schemas.codec import SchemaError

__all__ = ["EndpointReport", "WorkerReport", "model_key"]

#: The fields of one endpoint's report, as the router states them.
ENDPOINT_FIELDS = (
    "url", "weight", "max_concurrency", "concurrency_limit", "max_rps", "in_flight",
    "ewma_seconds_per_request", "ewma_ttft_seconds", "tokens_per_second", "circuit", "healthy",
    "served", "failed", "last_error",
    # Residency, from the endpoint's inventory (None: unknown): whether it has the model, whether
    # the model is loaded there now, and every model it has.
    "has_model", "loaded", "models",
)

def model_key(name: str) -> str:
    """A model's name as servers compare them: Ollama's ``llama3.1`` is ``llama3.1:latest``."""
    return name if ":" in name else f"{name}:latest"


EndpointReport = dict[str, Any]
"""One endpoint as a worker sees it: the keys of :data:`ENDPOINT_FIELDS`."""


@dataclass(frozen=True)
class WorkerReport:
    """One worker's view: for each model id, its endpoints' reports."""

    worker: str
    at: float  # seconds since the epoch, when the worker took the snapshot
    models: dict[str, list[EndpointReport]] = field(default_factory=dict)

    @property
    def key(self) -> bytes:
        return self.worker.encode()

    def to_bytes(self) -> bytes:
        return json.dumps({"worker": self.worker, "at": self.at, "models": self.models}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> WorkerReport:
        """Parse a record value; :class:`SchemaError` names what is wrong with it."""
        try:
            raw = json.loads(data)
            worker, at, models = raw["worker"], raw["at"], raw.get("models", {})
        except (ValueError, KeyError, TypeError) as exc:
            raise SchemaError(f"not an endpoint-state record: {exc!r}") from None
        if not isinstance(worker, str) or not isinstance(at, (int, float)) or not isinstance(models, dict):
            raise SchemaError("not an endpoint-state record: worker must be a string, at a number, models an object")
        return cls(worker=worker, at=float(at), models=models)
