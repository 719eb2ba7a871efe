"""The queue record: what one worker has waiting and running for one model.

Workers publish one record per (worker, model) about every 0.5 s, when it changed, to the
compacted ``nexus.queue`` topic (key ``"<worker>|<model>"``); gateways keep the latest per key to
answer ``GET /infer/{id}`` (position, estimated start), ``queued`` bridge frames and admission.
JSON, not Avro, like :mod:`schemas.endpoint_state`: only Nexus's own processes read it, and
this module is the one place both sides agree on it. A report with nothing waiting or running
is still published once, so readers drop the previous one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from schemas.codec import SchemaError

__all__ = ["MAX_REPORTED", "QUEUED_FIELDS", "RUNNING_FIELDS", "QueueReport", "QueuedEntry", "RunningEntry"]

#: At most this many waiting entries are listed (in dispatch order); ``waiting_total`` counts all.
MAX_REPORTED = 5000

#: One waiting request: ``position`` 0 starts next; ``eta_s`` is the estimated number of seconds
#: after the report's ``at`` until it starts; ``waited_s`` how long it has waited so far.
QUEUED_FIELDS = ("id", "session_id", "tenant", "priority", "position", "eta_s", "waited_s")
#: One request whose model call is running, for ``running_s`` seconds.
RUNNING_FIELDS = ("id", "session_id", "tenant", "priority", "running_s")

QueuedEntry = dict[str, Any]
"""A waiting request: the keys of :data:`QUEUED_FIELDS`."""
RunningEntry = dict[str, Any]
"""A running request: the keys of :data:`RUNNING_FIELDS`."""


@dataclass(frozen=True)
class QueueReport:
    """One worker's schedule for one model, at ``at`` (seconds since the epoch).

    ``rate_per_s`` is the measured dispatch rate (0: not known yet), from which the ETAs come.
    ``waiting`` is in dispatch order and cut at :data:`MAX_REPORTED`; ``waiting_total`` is the
    whole count (defaults to ``len(waiting)``).
    """

    worker: str
    model: str
    at: float
    rate_per_s: float = 0.0
    waiting: list[QueuedEntry] = field(default_factory=list)
    running: list[RunningEntry] = field(default_factory=list)
    waiting_total: int = -1

    def __post_init__(self) -> None:
        if self.waiting_total < 0:
            object.__setattr__(self, "waiting_total", len(self.waiting))

    @property
    def key(self) -> bytes:
        return f"{self.worker}|{self.model}".encode()

    @property
    def empty(self) -> bool:
        """Nothing waiting or running: published once so readers drop the previous report."""
        return not self.waiting_total and not self.running

    def to_bytes(self) -> bytes:
        return json.dumps({
            "worker": self.worker, "model": self.model, "at": self.at, "rate_per_s": self.rate_per_s,
            "waiting": self.waiting[:MAX_REPORTED], "running": self.running, "waiting_total": self.waiting_total,
        }).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> QueueReport:
        """Parse a record value; :class:`SchemaError` names what is wrong with it."""
        try:
            raw = json.loads(data)
        except (ValueError, TypeError) as exc:
            raise SchemaError(f"not a queue record: {exc!r}") from None
        if not isinstance(raw, dict):
            raise SchemaError("not a queue record: expected a JSON object")
        worker, model, at = raw.get("worker"), raw.get("model"), raw.get("at")
        rate = raw.get("rate_per_s", 0.0)
        waiting, running = raw.get("waiting", []), raw.get("running", [])
        if not isinstance(worker, str) or not isinstance(model, str):
            raise SchemaError("not a queue record: worker and model must be strings")
        if not _number(at) or not _number(rate):
            raise SchemaError("not a queue record: at and rate_per_s must be numbers")
        _entries(waiting, "waiting", QUEUED_FIELDS)
        _entries(running, "running", RUNNING_FIELDS)
        total = raw.get("waiting_total", len(waiting))
        if isinstance(total, bool) or not isinstance(total, int) or total < len(waiting):
            raise SchemaError("not a queue record: waiting_total must be an integer, at least len(waiting)")
        return cls(worker=worker, model=model, at=float(at), rate_per_s=float(rate),
                   waiting=waiting, running=running, waiting_total=total)


def _number(value: Any) -> TypeGuard[int | float]:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _entries(value: Any, name: str, keys: tuple[str, ...]) -> None:
    if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
        raise SchemaError(f"not a queue record: {name} must be a list of objects")
    for entry in value:
        missing = [k for k in keys if k not in entry]
        if missing:
            raise SchemaError(f"not a queue record: a {name} entry has no {missing[0]!r}")
        if not isinstance(entry["id"], str):
            raise SchemaError(f"not a queue record: a {name} entry's id must be a string")
