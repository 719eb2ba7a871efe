"""The workers' schedules as the edges see them: the latest queue report per (worker, model).

Workers publish what they have waiting and running for each model to the compacted
``nexus.queue`` topic (:class:`schemas.queue_state.QueueReport`, key ``"<worker>|<model>"``).
The gateway and the bridge each follow it with a :class:`QueueReader` and keep the picture in a
:class:`QueueBoard`, which answers, without I/O:

- where a request stands (``GET /infer/{id}``, the bridge's ``queued`` frames): :meth:`QueueBoard.find`;
- how busy a tenant is (admission's ``max_concurrent``): :meth:`QueueBoard.active`;
- how long a new request would wait (admission's deadline check): :meth:`QueueBoard.estimated_wait_s`;
- each model's queue for ``GET /models``: :meth:`QueueBoard.model_queue`.

A report older than :data:`STALE_AFTER_S` is ignored: its worker is gone (a worker republishes
a non-empty schedule while it lasts), and whoever took over its partitions reports the same
requests again. The reader is restarted when it fails and shows on ``/health`` as ``reader:queue``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from nexus.kafka.readers import CompactedTopicReader
from nexus.settings import Settings
from nexus.tasks import Background
from schemas import INTERACTIVE, PRIORITIES, SchemaError
from schemas.queue_state import QueueReport

__all__ = ["STALE_AFTER_S", "QueueBoard", "QueueReader", "Whereabouts"]

log = logging.getLogger(__name__)

#: A report older than this (by its ``at``) no longer counts.
STALE_AFTER_S = 30.0

Weight = Callable[[str], float]  # a tenant's weight in the fair share


def _one(tenant: str) -> float:
    return 1.0


@dataclass(frozen=True)
class Whereabouts:
    """Where one request stands in a worker's schedule, as of the report's ``at``."""

    report: QueueReport
    running: bool
    entry: dict[str, Any]

    def to_json(self, now: float) -> dict[str, Any]:
        """``GET /infer/{id}``'s body: the ETA counted down and the wait counted up to ``now``."""
        entry, report = self.entry, self.report
        age = max(0.0, now - report.at)
        out: dict[str, Any] = {
            "id": entry["id"],
            "state": "running" if self.running else "queued",
            "model": report.model,
            "priority": entry.get("priority") or INTERACTIVE,
            "tenant": entry.get("tenant"),
        }
        if self.running:
            out["running_ms"] = _ms(_seconds(entry.get("running_s")) + age)
        else:
            out["position"] = _int(entry.get("position"))
            out["eta_ms"] = _ms(max(0.0, _seconds(entry.get("eta_s")) - age))
            out["waited_ms"] = _ms(_seconds(entry.get("waited_s")) + age)
        out["worker"] = report.worker
        return out

    @property
    def session_id(self) -> str | None:
        value = self.entry.get("session_id")
        return value if isinstance(value, str) else None

    @property
    def tenant(self) -> str | None:
        value = self.entry.get("tenant")
        return value if isinstance(value, str) else None


class QueueBoard:
    """The latest report of every (worker, model) and an index of the requests they list. No I/O."""

    def __init__(self, stale_after_s: float = STALE_AFTER_S) -> None:
        self._stale_after_s = stale_after_s
        self._reports: dict[bytes, QueueReport] = {}
        self._tenants: dict[bytes, Counter[str]] = {}  # per report: waiting (listed) + running per tenant
        self._classes: dict[bytes, dict[int, Counter[str]]] = {}  # per report: waiting per class rank and tenant
        self._where: dict[str, Whereabouts] = {}  # request id -> its newest listing
        self._by_session: dict[str, set[str]] = {}  # session id -> request ids listed

    # -- keeping it -------------------------------------------------------------------------

    def ingest(self, report: QueueReport) -> None:
        """Keep ``report`` as its (worker, model)'s latest; an older one than held is ignored."""
        key = report.key
        old = self._reports.get(key)
        if old is not None:
            if old.at > report.at:
                return
            self._unlist(old)
        if report.empty:
            self._reports.pop(key, None)
            self._tenants.pop(key, None)
            self._classes.pop(key, None)
            return
        self._reports[key] = report
        counts: Counter[str] = Counter()
        classes: dict[int, Counter[str]] = {}
        for entry in report.waiting:
            tenant = _tenant(entry)
            counts[tenant] += 1
            classes.setdefault(_rank(entry.get("priority")), Counter())[tenant] += 1
            self._list(Whereabouts(report, False, entry))
        for entry in report.running:
            counts[_tenant(entry)] += 1
            self._list(Whereabouts(report, True, entry))
        self._tenants[key] = counts
        self._classes[key] = classes

    def _list(self, where: Whereabouts) -> None:
        request_id = where.entry["id"]
        held = self._where.get(request_id)
        if held is not None and held.report.at > where.report.at:
            return  # a newer report (of the worker that took over) already lists it
        self._where[request_id] = where
        session = where.session_id
        if session is not None:
            self._by_session.setdefault(session, set()).add(request_id)

    def _unlist(self, report: QueueReport) -> None:
        for entry in (*report.waiting, *report.running):
            request_id = entry["id"]
            held = self._where.get(request_id)
            if held is None or held.report is not report:
                continue
            del self._where[request_id]
            session = held.session_id
            ids = self._by_session.get(session) if session is not None else None
            if ids is not None:
                ids.discard(request_id)
                if not ids:
                    del self._by_session[session]  # type: ignore[arg-type]

    def _fresh(self, report: QueueReport, now: float) -> bool:
        return now - report.at <= self._stale_after_s

    def reports(self, now: float) -> list[QueueReport]:
        """The fresh reports."""
        return [r for r in self._reports.values() if self._fresh(r, now)]

    # -- questions --------------------------------------------------------------------------

    def find(self, request_id: str, now: float) -> Whereabouts | None:
        """Where ``request_id`` waits or runs, by the freshest report listing it; None if none does."""
        where = self._where.get(request_id)
        return where if where is not None and self._fresh(where.report, now) else None

    def in_session(self, session_id: str, now: float) -> list[Whereabouts]:
        """Every request of ``session_id`` the fresh reports list."""
        found = (self.find(i, now) for i in self._by_session.get(session_id, ()))
        return [w for w in found if w is not None]

    def active(self, tenant: str, now: float) -> int:
        """How many of ``tenant``'s requests wait or run, by the fresh reports (waiting entries past
        a report's :data:`~schemas.queue_state.MAX_REPORTED` are not listed, so not counted)."""
        return sum(counts[tenant] for key, counts in self._tenants.items() if self._fresh(self._reports[key], now))

    def estimated_wait_s(self, model: str, priority: str, tenant: str, now: float,
                         weight: Weight = _one) -> float | None:
        """How long a new request of ``tenant`` at ``priority`` would wait for ``model``: the requests
        dispatched before it over the measured dispatch rate. None when no rate is known yet.

        Ahead of it: every waiting request of a more urgent class; in its own class, the tenant's own
        waiting requests and, of every other tenant, at most its weighted fair share of as many
        (the scheduler alternates tenants by weight). Time in the queue only, not the model call.
        """
        reports = [r for r in self.reports(now) if r.model == model]
        rate = sum(r.rate_per_s for r in reports)
        if rate <= 0:
            return None
        rank = _rank(priority)
        per_tenant: Counter[str] = Counter()
        ahead = 0.0
        for report in reports:
            for entry_rank, tenants in self._classes[report.key].items():
                if entry_rank < rank:
                    ahead += sum(tenants.values())
                elif entry_rank == rank:
                    per_tenant.update(tenants)
        own = per_tenant.pop(tenant, 0)
        mine = weight(tenant) or 1.0
        ahead += own + sum(min(count, (own + 1) * (weight(other) or 1.0) / mine) for other, count in per_tenant.items())
        return ahead / rate

    def drain_per_s(self, tenant: str, now: float, weight: Weight = _one) -> float:
        """How many of ``tenant``'s requests start per second: each model's rate times the tenant's
        weighted share among the tenants waiting or running there; 0 when it has none listed."""
        total = 0.0
        for key, counts in self._tenants.items():
            report = self._reports[key]
            if counts[tenant] <= 0 or not self._fresh(report, now) or report.rate_per_s <= 0:
                continue
            weights = sum(weight(t) or 1.0 for t, n in counts.items() if n > 0)
            total += report.rate_per_s * (weight(tenant) or 1.0) / weights
        return total

    def model_queue(self, model: str, now: float) -> dict[str, Any]:
        """``GET /models``' ``queue`` of one model: waiting per priority, running, dispatch rate."""
        reports = [r for r in self.reports(now) if r.model == model]
        waiting = dict.fromkeys(PRIORITIES, 0)
        for report in reports:
            listed: Counter[str] = Counter(str(e.get("priority") or INTERACTIVE) for e in report.waiting)
            # Past MAX_REPORTED the classes are not listed: dispatch order puts batch last.
            listed[PRIORITIES[-1]] += report.waiting_total - len(report.waiting)
            for priority, count in listed.items():
                waiting[priority] = waiting.get(priority, 0) + count
        return {
            "waiting": waiting,
            "waiting_total": sum(waiting.values()),
            "running": sum(len(r.running) for r in reports),
            "rate_per_s": sum(r.rate_per_s for r in reports),
            "workers_reporting": len({r.worker for r in reports}),
        }


def _tenant(entry: dict[str, Any]) -> str:
    tenant = entry.get("tenant") or entry.get("session_id")
    return tenant if isinstance(tenant, str) else ""


def _rank(priority: Any) -> int:
    """0 for the most urgent class; an unknown class counts as the least urgent."""
    return PRIORITIES.index(priority) if priority in PRIORITIES else len(PRIORITIES)


def _seconds(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else 0.0


def _int(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


class QueueReader(CompactedTopicReader):
    """Follows ``nexus.queue`` in the background into :attr:`board`; ``on_report`` sees each report.

    Like :class:`producers.gateway.models.EndpointStateReader`: the loop runs under
    ``background`` as the task :attr:`TASK` and reads the compacted topic from its beginning,
    again after a restart (the reports read so far stay until newer ones replace them).
    """

    TASK = "queue"

    def __init__(
        self,
        settings: Settings,
        background: Background | None = None,
        *,
        client_id: str = "nexus-gateway-queue",
        on_report: Callable[[QueueReport], None] | None = None,
        board: QueueBoard | None = None,
    ) -> None:
        super().__init__(settings.kafka, background, client_id)
        self._settings = settings
        self._on_report = on_report
        self.board = board or QueueBoard()
        self.malformed = 0

    @property
    def topic(self) -> str:
        return self._settings.kafka.queue_topic

    def now(self) -> float:
        return time.time()

    def ingest(self, value: bytes | None) -> bool:
        """Keep a record's report; a tombstone or a malformed record is skipped (the latter logged)."""
        if value is None:
            return False
        try:
            report = QueueReport.from_bytes(value)
        except SchemaError as exc:
            self.malformed += 1
            log.warning("ignoring a malformed queue record: %s", exc)
            return False
        self.board.ingest(report)
        if self._on_report is not None:
            self._on_report(report)
        return True

    def ingest_all(self, values: Iterable[bytes | None]) -> int:
        return sum(self.ingest(v) for v in values)
