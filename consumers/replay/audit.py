"""The decisions of ``nexus replay``, with no I/O: time ranges, decoding, filters, resubmission.

The Kafka shell in :mod:`consumers.replay.reader` feeds raw records in; everything it
decides about them is here, so it is unit-tested without a broker.
"""

from __future__ import annotations

import base64
import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, UTC
from typing import Literal

from nexus.settings import KafkaSettings
from schemas import headers
from schemas import (
    Codec,
    InferenceCancel,
    InferenceRequest,
    InferenceResponse,
    InferenceToken,
    SchemaError,
    decode_cancel,
    decode_request,
    decode_response,
    decode_token,
    utcnow,
)

from consumers.replay.errors import ReplayArgumentError
from consumers.replay.errors import ReplayError as ReplayError  # re-exported, as before

Kind = Literal["request", "response", "token", "dead_letter", "cancel"]
Value = InferenceRequest | InferenceResponse | InferenceToken | InferenceCancel
# "requests" is both lanes: kafka.requests_topic (interactive) and kafka.batch_requests_topic.
TOPIC_CHOICES: tuple[str, ...] = ("requests", "responses", "tokens", "dlq", "cancels")
#: The statuses of a response (``--status``); a dead letter counts as an error.
STATUSES: tuple[str, ...] = ("ok", "error", "expired", "cancelled")
# --join reads this far outside the range for the other half of a pair (see consumers.replay.join).
DEFAULT_GRACE_MS = 10 * 60 * 1000
# The header the worker puts on a dead letter to say why (kept under this name for callers).
DLQ_REASON_HEADER = headers.ERROR

_RELATIVE = re.compile(r"^-(?P<n>\d+(?:\.\d+)?)(?P<unit>ms|s|m|h|d)$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_time(text: str, now: datetime | None = None) -> int:
    """Epoch milliseconds from ISO-8601, epoch ms, or ``-<n><ms|s|m|h|d>`` (before ``now``).

    An ISO time without an offset is taken as UTC, never as the machine's zone.
    """
    text = text.strip()
    if text.isdigit():
        return int(text)
    relative = _RELATIVE.match(text)
    if relative:
        now = now or utcnow()
        return _ms(now) - int(float(relative["n"]) * _UNIT_MS[relative["unit"]])
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ReplayArgumentError(
            f"{text!r} is not a time: use ISO-8601 (2025-01-31T14:00:00Z), epoch milliseconds "
            "(1738332000000) or a time before now (-90s, -15m, -1h, -2d)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return _ms(when)


def _ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


def iso(ms: int) -> str:
    """Epoch milliseconds as ISO-8601 UTC with milliseconds."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def topic_kinds(kafka: KafkaSettings, names: Iterable[str] = ("requests", "responses")) -> dict[str, Kind]:
    """Topic name -> record kind, for the short names given to ``--topics``; ``requests`` is
    both request lanes (interactive and batch)."""
    table: dict[str, tuple[tuple[str, ...], Kind]] = {
        "requests": (kafka.request_topics, "request"),
        "responses": ((kafka.responses_topic,), "response"),
        "tokens": ((kafka.tokens_topic,), "token"),
        "dlq": ((kafka.dlq_topic,), "dead_letter"),
        "cancels": ((kafka.cancels_topic,), "cancel"),
    }
    out: dict[str, Kind] = {}
    for name in names:
        if name not in table:
            raise ReplayArgumentError(f"unknown topic {name!r} in --topics; choose from {', '.join(TOPIC_CHOICES)}")
        topics, kind = table[name]
        out.update(dict.fromkeys(topics, kind))
    return out


def optional_topics(kafka: KafkaSettings) -> frozenset[str]:
    """Topics a cluster may lack (Nexus roles older than the scheduler never created them):
    read as empty when missing, rather than refusing the replay."""
    return frozenset({kafka.batch_requests_topic, kafka.cancels_topic})


@dataclass(frozen=True)
class ReplayRecord:
    """One Kafka record as replay sees it: where it is, and its decoded value or why not."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    kind: Kind
    value: Value | None
    raw: bytes | None = None
    error: str | None = None
    headers: Mapping[str, bytes] = field(default_factory=dict)

    @property
    def id(self) -> str | None:
        return self.value.id if self.value is not None else None

    @property
    def model_id(self) -> str | None:
        return getattr(self.value, "model_id", None)  # a cancel names only the request

    @property
    def session_id(self) -> str | None:
        if isinstance(self.value, InferenceToken):
            return self.value.session_id
        if isinstance(self.value, (InferenceRequest, InferenceResponse)):
            return self.value.context.session_id
        return None

    @property
    def status(self) -> str | None:
        """A response's status; a dead letter is an error; requests and tokens have none."""
        if isinstance(self.value, InferenceResponse):
            return self.value.status
        return "error" if self.kind == "dead_letter" else None


def decode_record(
    codec: Codec,
    kind: Kind,
    *,
    topic: str,
    partition: int,
    offset: int,
    timestamp: int,
    key: bytes | None,
    value: bytes | None,
    headers: Iterable[tuple[str, bytes]] = (),
) -> ReplayRecord:
    """Decode one record of ``kind``; bytes that do not decode are kept, with the reason."""
    header_map = dict(headers)
    where = dict(topic=topic, partition=partition, offset=offset, timestamp=timestamp, key=key)
    decoded: Value | None = None
    error: str | None = None
    try:
        if value is None:
            raise SchemaError("the record has no value (a tombstone)")
        if kind == "response":
            decoded = decode_response(codec, value)
        elif kind == "token":
            decoded = decode_token(codec, value)
        elif kind == "cancel":
            decoded = decode_cancel(codec, value)
        else:  # requests, and dead letters, which carry the original request bytes
            decoded = decode_request(codec, value)
    except SchemaError as exc:
        error = f"{type(exc).__name__}: {exc}"
    if kind == "dead_letter":
        reason = header_map.get(DLQ_REASON_HEADER)
        error = reason.decode(errors="replace") if reason is not None else error
    keep_raw = decoded is None or kind == "dead_letter"
    return ReplayRecord(
        **where, kind=kind, value=decoded, raw=value if keep_raw else None, error=error,  # type: ignore[arg-type]
        headers=header_map,
    )


@dataclass(frozen=True)
class RecordFilter:
    """Which records replay shows: a time range and, per field, the values accepted.

    An empty set accepts anything. Undecodable records have no fields, so they pass
    only when no field is filtered.
    """

    since_ms: int | None = None
    until_ms: int | None = None
    sessions: frozenset[str] = frozenset()
    models: frozenset[str] = frozenset()
    request_ids: frozenset[str] = frozenset()
    statuses: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.since_ms is not None and self.until_ms is not None and self.until_ms <= self.since_ms:
            raise ReplayArgumentError(f"--until ({iso(self.until_ms)}) must be after --since ({iso(self.since_ms)})")
        unknown = self.statuses - set(STATUSES)
        if unknown:
            raise ReplayArgumentError(f"unknown --status {sorted(unknown)[0]!r}; use {', '.join(STATUSES)}")

    def in_range(self, record: ReplayRecord) -> bool:
        return (self.since_ms is None or record.timestamp >= self.since_ms) and (
            self.until_ms is None or record.timestamp < self.until_ms
        )

    def matches_fields(self, record: ReplayRecord) -> bool:
        checks = (
            (self.sessions, record.session_id),
            (self.models, record.model_id),
            (self.request_ids, record.id),
            (self.statuses, record.status),
        )
        return all(not accepted or value in accepted for accepted, value in checks)

    def matches(self, record: ReplayRecord) -> bool:
        return self.in_range(record) and self.matches_fields(record)


@dataclass(frozen=True)
class Span:
    """Offsets ``[start, stop)`` of one partition to read."""

    start: int
    stop: int

    @property
    def size(self) -> int:
        return max(0, self.stop - self.start)


def plan_span(
    beginning: int, end: int, since_offset: int | None, until_offset: int | None, *, bounded_since: bool,
    bounded_until: bool,
) -> Span:
    """The offsets of one partition inside a time range.

    ``since_offset``/``until_offset`` are what offsets-for-times answered: the first offset
    at or after the time, or ``None`` when no record is that late. ``end`` is the end offset
    snapshot taken at the start, so a replay stops even while producers keep writing.
    """
    start = beginning
    if bounded_since:
        start = end if since_offset is None else max(since_offset, beginning)
    stop = end
    if bounded_until and until_offset is not None:
        stop = min(until_offset, end)
    return Span(start, max(start, stop))


def resubmission(
    original: InferenceRequest, new_id: str, *, model_id: str | None = None, now: datetime | None = None
) -> InferenceRequest:
    """A copy of ``original`` to submit again: a new id, ``original_id`` linking back to it.

    It is made now (``created_at``), without the old deadline or reply address, and skips the
    response cache, since its point is to compare a fresh answer with the recorded one.
    """
    return dataclasses.replace(
        original,
        id=new_id,
        original_id=original.id,
        model_id=model_id or original.model_id,
        created_at=now or utcnow(),
        deadline=None,
        reply_to=None,
        cache="no-cache",
    )


def key_text(key: bytes | None) -> tuple[str | None, str | None]:
    """A key as text, or as base64 when it is not UTF-8: ``(text, base64)``."""
    if key is None:
        return None, None
    try:
        return key.decode(), None
    except UnicodeDecodeError:
        return None, base64.b64encode(key).decode()


def read_windows(
    kinds: Mapping[str, Kind], selection: RecordFilter, *, join: bool, grace_ms: int
) -> dict[str, tuple[int | None, int | None]]:
    """The time window to read per topic: the selected range, widened for ``--join``.

    Joining reads requests from ``grace_ms`` before the range (to pair early answers)
    and responses up to ``grace_ms`` after it (so late requests find their answers).
    """
    if grace_ms < 0:
        raise ReplayArgumentError(f"--grace must not be negative, got {grace_ms / 1000:g}s")
    since, until = selection.since_ms, selection.until_ms
    windows: dict[str, tuple[int | None, int | None]] = {}
    for topic, kind in kinds.items():
        if join and kind == "request":
            windows[topic] = (None if since is None else since - grace_ms, until)
        elif join and kind == "response":
            windows[topic] = (since, None if until is None else until + grace_ms)
        else:
            windows[topic] = (since, until)
    return windows
