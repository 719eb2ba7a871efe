"""``nexus replay --join``: pair requests with responses by id and report, with no I/O.

The report answers an auditor's question, "was every request in this range answered,
and how?": requests without a response, responses without a request, duplicates,
status counts and latency percentiles per model, and how resubmitted requests compare
with the answers they repeat.

Scope: a request counts when it was written inside ``[since, until)``, a response when
it was written inside the range too. The reader also hands over requests written up to
a grace period *before* the range and responses up to a grace period *after* it, so that a
request near the end of the hour still finds its answer and an answer near the start
still finds its request; those extra records are used for pairing only.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from schemas import InferenceRequest, InferenceResponse

from consumers.replay.audit import ReplayRecord, iso

PERCENTILES = (50, 90, 99)
LISTED_IDS = 20  # ids shown per list in the text report; the JSON report has all


def percentile(values: list[int], p: float) -> int:
    """Nearest-rank percentile: the smallest value with at least ``p`` % of values at or below it."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class ModelReport:
    model_id: str
    requests: int
    answered: int
    statuses: dict[str, int]
    latency_ms: dict[str, int]  # "p50", "p90", "p99", "max"; empty when nothing was answered

    def to_json(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "requests": self.requests,
            "answered": self.answered,
            "statuses": self.statuses,
            "latency_ms": self.latency_ms,
        }


@dataclass(frozen=True)
class ResubmissionReport:
    resubmitted: int  # requests in scope with an original_id
    answered: int  # ... whose own answer is there
    compared: int  # ... and whose original's answer is there too
    same_output: int
    different_output: int
    different_ids: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "resubmitted": self.resubmitted,
            "answered": self.answered,
            "compared": self.compared,
            "same_output": self.same_output,
            "different_output": self.different_output,
            "different_ids": self.different_ids,
        }


@dataclass(frozen=True)
class JoinReport:
    since_ms: int | None
    until_ms: int | None
    requests: int
    responses: int
    answered: int
    unanswered: list[str]
    responses_without_request: list[str]
    duplicate_requests: dict[str, int]
    duplicate_responses: dict[str, int]
    statuses: dict[str, int]
    models: list[ModelReport]
    resubmissions: ResubmissionReport

    @property
    def complete(self) -> bool:
        """Every request in scope was answered."""
        return not self.unanswered

    def to_json(self) -> dict[str, Any]:
        return {
            "since": iso(self.since_ms) if self.since_ms is not None else None,
            "until": iso(self.until_ms) if self.until_ms is not None else None,
            "requests": self.requests,
            "responses": self.responses,
            "answered": self.answered,
            "complete": self.complete,
            "unanswered": self.unanswered,
            "responses_without_request": self.responses_without_request,
            "duplicate_requests": self.duplicate_requests,
            "duplicate_responses": self.duplicate_responses,
            "statuses": self.statuses,
            "models": [m.to_json() for m in self.models],
            "resubmissions": self.resubmissions.to_json(),
        }

    def to_text(self) -> str:
        since = iso(self.since_ms) if self.since_ms is not None else "the beginning"
        until = iso(self.until_ms) if self.until_ms is not None else "the end at start"
        lines = [
            f"join report: {since} .. {until}",
            f"  requests:  {self.requests}",
            f"  answered:  {self.answered}"
            + (" (all)" if self.complete else f" ({len(self.unanswered)} without a response)"),
            f"  responses: {self.responses} written in the range (answers are looked for past it too)",
            f"  statuses:  {_counts(self.statuses)}",
        ]
        lines += _id_list("requests without a response", self.unanswered)
        lines += _id_list("responses without a request in range", self.responses_without_request)
        lines += _id_list(
            "duplicate requests (id written more than once)",
            [f"{i} x{n}" for i, n in self.duplicate_requests.items()],
            count=len(self.duplicate_requests),
        )
        lines += _id_list(
            "duplicate responses (answered more than once)",
            [f"{i} x{n}" for i, n in self.duplicate_responses.items()],
            count=len(self.duplicate_responses),
        )
        if self.models:
            lines.append("  per model:")
            lines.append(f"    {'model':<20} {'requests':>8} {'answered':>8} {'p50 ms':>8} {'p90 ms':>8} "
                         f"{'p99 ms':>8} {'max ms':>8}  statuses")
            for m in self.models:
                lat = [str(m.latency_ms.get(k, "-")) for k in ("p50", "p90", "p99", "max")]
                lines.append(
                    f"    {m.model_id:<20} {m.requests:>8} {m.answered:>8} {lat[0]:>8} {lat[1]:>8} "
                    f"{lat[2]:>8} {lat[3]:>8}  {_counts(m.statuses)}"
                )
        r = self.resubmissions
        if r.resubmitted:
            lines.append(
                f"  resubmissions: {r.resubmitted} ({r.answered} answered; of {r.compared} compared with "
                f"their original's answer: {r.same_output} same, {r.different_output} different)"
            )
            lines += _id_list("resubmissions answered differently", r.different_ids)
        return "\n".join(lines)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"


def _id_list(title: str, items: list[str], count: int | None = None) -> list[str]:
    if not items:
        return [f"  {title}: 0"]
    count = len(items) if count is None else count
    shown = items[:LISTED_IDS]
    more = f" ... and {count - len(shown)} more" if count > len(shown) else ""
    return [f"  {title}: {count}", *(f"    {item}" for item in shown)] + ([f"   {more}"] if more else [])


@dataclass
class _Seen:
    """What the joiner keeps per request id: enough to report, not the records themselves."""

    requests: int = 0  # records in scope
    model_id: str | None = None
    original_id: str | None = None
    request_seen: bool = False  # in scope or in the grace period
    responses: int = 0  # in scope or grace
    responses_in_scope: int = 0
    first: tuple[int, int, int] | None = None  # (timestamp, partition, offset) of the first response
    status: str | None = None
    latency_ms: int = 0
    output_hash: int = 0


@dataclass
class Joiner:
    """Accumulates records in any order; :meth:`report` pairs them."""

    since_ms: int | None = None
    until_ms: int | None = None
    _ids: dict[str, _Seen] = field(default_factory=lambda: defaultdict(_Seen))

    def _in_scope(self, timestamp: int) -> bool:
        return (self.since_ms is None or timestamp >= self.since_ms) and (
            self.until_ms is None or timestamp < self.until_ms
        )

    def add(self, record: ReplayRecord) -> None:
        value = record.value
        if isinstance(value, InferenceRequest) and record.kind == "request":
            seen = self._ids[value.id]
            seen.request_seen = True
            seen.model_id = seen.model_id or value.model_id
            if self._in_scope(record.timestamp):
                seen.requests += 1
                seen.model_id = value.model_id
                seen.original_id = value.original_id
        elif isinstance(value, InferenceResponse):
            seen = self._ids[value.id]
            seen.responses += 1
            if self._in_scope(record.timestamp):
                seen.responses_in_scope += 1
            where = (record.timestamp, record.partition, record.offset)
            if seen.first is None or where < seen.first:
                seen.first = where
                seen.status = value.status
                seen.latency_ms = value.latency_ms
                seen.output_hash = hash((value.output, value.tool_calls))  # the answer: text and tool calls
            if seen.model_id is None:
                seen.model_id = value.model_id

    def report(self) -> JoinReport:
        ids = self._ids
        in_scope = {i: s for i, s in ids.items() if s.requests}
        answered = {i: s for i, s in in_scope.items() if s.responses}
        statuses = Counter(s.status for s in answered.values() if s.status)
        by_model: dict[str, list[_Seen]] = defaultdict(list)
        for s in in_scope.values():
            by_model[s.model_id or "?"].append(s)
        models = []
        for model_id in sorted(by_model):
            group = by_model[model_id]
            latencies = [s.latency_ms for s in group if s.responses]
            latency: dict[str, int] = {}
            if latencies:
                latency = {f"p{p}": percentile(latencies, p) for p in PERCENTILES}
                latency["max"] = max(latencies)
            models.append(
                ModelReport(
                    model_id=model_id,
                    requests=len(group),
                    answered=len(latencies),
                    statuses=dict(Counter(s.status for s in group if s.status)),
                    latency_ms=latency,
                )
            )
        return JoinReport(
            since_ms=self.since_ms,
            until_ms=self.until_ms,
            requests=len(in_scope),
            responses=sum(s.responses_in_scope for s in ids.values()),
            answered=len(answered),
            unanswered=sorted(i for i, s in in_scope.items() if not s.responses),
            responses_without_request=sorted(
                i for i, s in ids.items() if s.responses_in_scope and not s.request_seen
            ),
            duplicate_requests={i: s.requests for i, s in sorted(in_scope.items()) if s.requests > 1},
            duplicate_responses={i: s.responses for i, s in sorted(answered.items()) if s.responses > 1},
            statuses=dict(statuses),
            models=models,
            resubmissions=self._resubmissions(in_scope),
        )

    def _resubmissions(self, in_scope: dict[str, _Seen]) -> ResubmissionReport:
        resubmitted = {i: s for i, s in in_scope.items() if s.original_id}
        answered = {i: s for i, s in resubmitted.items() if s.responses}
        compared = {
            i: s for i, s in answered.items()
            if s.original_id in self._ids and self._ids[s.original_id].responses
        }
        different = sorted(
            i for i, s in compared.items() if self._ids[s.original_id].output_hash != s.output_hash  # type: ignore[index]
        )
        return ResubmissionReport(
            resubmitted=len(resubmitted),
            answered=len(answered),
            compared=len(compared),
            same_output=len(compared) - len(different),
            different_output=len(different),
            different_ids=different,
        )
