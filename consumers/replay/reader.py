"""``nexus replay``: read Nexus's topics over a time range, for audit. The Kafka shell.

It joins no consumer group and commits nothing: partitions are *assigned* and
*sought*, so the workers' group never sees it and a replay never moves their
offsets. The range is fixed when it starts (offsets-for-times for ``--since`` and
``--until``, end offsets snapshot for the rest), so it stops even while the
pipeline keeps writing. What to do with each record is decided in
:mod:`consumers.replay.audit` and :mod:`consumers.replay.join`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from nexus.kafka.clients import refusal
from nexus.kafka.readers import TopicMissingError, known_partitions, reader
from nexus.settings import KafkaSettings
from producers.client import RequestProducer
from schemas import Codec, InferenceRequest, new_id

from consumers.replay.audit import (
    DEFAULT_GRACE_MS,
    Kind,
    RecordFilter,
    ReplayRecord,
    Span,
    decode_record,
    optional_topics,
    plan_span,
    read_windows,
    resubmission,
    topic_kinds,
)
from consumers.replay.errors import ReplayArgumentError, ReplayKafkaError, ReplayStalledError
from consumers.replay.join import Joiner, JoinReport

__all__ = [
    # reading
    "RangeReader", "ReplayOptions", "Progress",
    # what the command does
    "join_report", "replay_records", "resubmit", "Resubmitted",
    # errors (defined in consumers.replay.errors; importable from here as before)
    "ReplayKafkaError", "ReplayStalledError",
]

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ReplayOptions:
    topics: tuple[str, ...] = ("requests", "responses")
    selection: RecordFilter = field(default_factory=RecordFilter)
    # --join only: how far outside the range to look for the other half of a pair.
    grace_ms: int = DEFAULT_GRACE_MS


@dataclass(frozen=True)
class Resubmitted:
    id: str
    original_id: str
    model_id: str


class RangeReader:
    """Reads fixed offset ranges of some topics with an assigned, group-less consumer."""

    def __init__(self, kafka: KafkaSettings, codec: Codec | None = None, stall_timeout_s: float = 30.0) -> None:
        self._kafka = kafka
        self._codec = codec or Codec.from_directory()
        self._stall_timeout_s = stall_timeout_s

    async def read(
        self,
        kinds: dict[str, Kind],
        windows: dict[str, tuple[int | None, int | None]],
        progress: Progress | None = None,
    ) -> AsyncIterator[ReplayRecord]:
        # No group: nothing joins, nothing is committed. Records deleted by retention
        # meanwhile are skipped (earliest), not an error.
        consumer = reader(self._kafka, "nexus-replay", auto_offset_reset="earliest")
        try:
            await consumer.start()
        except KafkaError as exc:
            await consumer.stop()
            refused = await refusal(self._kafka)
            raise ReplayKafkaError(str(refused or f"cannot reach Kafka at {self._kafka.bootstrap}: {exc}")) from None
        try:
            spans = await self._plan(consumer, kinds, windows)
            async for record in self._fetch(consumer, kinds, spans, progress):
                yield record
        finally:
            await consumer.stop()

    async def _plan(
        self,
        consumer: AIOKafkaConsumer,
        kinds: dict[str, Kind],
        windows: dict[str, tuple[int | None, int | None]],
    ) -> dict[TopicPartition, Span]:
        tps: list[TopicPartition] = []
        optional = optional_topics(self._kafka)
        for topic in kinds:
            tps += [TopicPartition(topic, p) for p in sorted(await self._partitions(consumer, topic, topic in optional))]
        if not tps:
            return {}
        beginning = await consumer.beginning_offsets(tps)
        end = await consumer.end_offsets(tps)
        since_at = await self._offsets_at(consumer, tps, {tp: windows[tp.topic][0] for tp in tps})
        until_at = await self._offsets_at(consumer, tps, {tp: windows[tp.topic][1] for tp in tps})
        return {
            tp: plan_span(
                beginning[tp], end[tp], since_at.get(tp), until_at.get(tp),
                bounded_since=windows[tp.topic][0] is not None,
                bounded_until=windows[tp.topic][1] is not None,
            )
            for tp in tps
        }

    async def _partitions(self, consumer: AIOKafkaConsumer, topic: str, optional: bool = False) -> list[int]:
        try:
            return await known_partitions(consumer, topic, timeout_s=1.0)
        except TopicMissingError:
            if optional:  # e.g. the batch lane on a cluster where only older roles ran: nothing to read
                return []
            raise ReplayKafkaError(
                f"topic {topic!r} does not exist on {self._kafka.bootstrap}; is this the right --bootstrap "
                "(or did no Nexus role run there yet)?"
            ) from None

    @staticmethod
    async def _offsets_at(
        consumer: AIOKafkaConsumer, tps: list[TopicPartition], times: dict[TopicPartition, int | None]
    ) -> dict[TopicPartition, int | None]:
        wanted = {tp: max(0, t) for tp, t in times.items() if t is not None}
        if not wanted:
            return {}
        found = await consumer.offsets_for_times(wanted)
        return {tp: (found[tp].offset if found.get(tp) is not None else None) for tp in wanted}

    async def _fetch(
        self,
        consumer: AIOKafkaConsumer,
        kinds: dict[str, Kind],
        spans: dict[TopicPartition, Span],
        progress: Progress | None,
    ) -> AsyncIterator[ReplayRecord]:
        active = {tp: span for tp, span in spans.items() if span.size}
        total = sum(span.size for span in active.values())
        done = 0
        if progress:
            progress(0, total)
        if not active:
            return
        consumer.assign(list(active))
        for tp, span in active.items():
            consumer.seek(tp, span.start)
        loop = asyncio.get_running_loop()
        last_progress = loop.time()
        while active:
            batches = await consumer.getmany(*active, timeout_ms=500, max_records=10_000)
            for tp, records in batches.items():
                stop = active[tp].stop if tp in active else -1
                for r in records:
                    if r.offset >= stop:
                        break
                    yield decode_record(
                        self._codec, kinds[tp.topic], topic=tp.topic, partition=tp.partition,
                        offset=r.offset, timestamp=r.timestamp, key=r.key, value=r.value,
                        headers=r.headers,
                    )
            before = done
            done = 0
            for tp, span in list(spans.items()):
                if tp in active:
                    position = await consumer.position(tp)
                    done += min(position, span.stop) - span.start
                    if position >= span.stop:
                        del active[tp]
                        consumer.pause(tp)
                else:
                    done += span.size
            if done != before:
                last_progress = loop.time()
                if progress:
                    progress(done, total)
            elif loop.time() - last_progress > self._stall_timeout_s:
                waiting = ", ".join(f"{tp.topic}/{tp.partition}" for tp in active)
                raise ReplayStalledError(
                    f"no records from {waiting} at {self._kafka.bootstrap} for "
                    f"{self._stall_timeout_s:.0f}s before the end of the range; is the broker up?"
                )


async def replay_records(
    kafka: KafkaSettings, options: ReplayOptions, progress: Progress | None = None
) -> AsyncIterator[ReplayRecord]:
    """The records of the selected topics inside the range that pass the filter."""
    kinds = topic_kinds(kafka, options.topics)
    windows = read_windows(kinds, options.selection, join=False, grace_ms=0)
    async for record in RangeReader(kafka).read(kinds, windows, progress):
        if options.selection.matches(record):
            yield record


async def join_report(kafka: KafkaSettings, options: ReplayOptions, progress: Progress | None = None) -> JoinReport:
    """Pair the requests and responses of the range; see :mod:`consumers.replay.join` for the scope."""
    if options.selection.statuses:
        raise ReplayArgumentError("--status selects responses only and cannot be joined; --join counts statuses itself")
    kinds = topic_kinds(kafka, ("requests", "responses"))
    windows = read_windows(kinds, options.selection, join=True, grace_ms=options.grace_ms)
    joiner = Joiner(options.selection.since_ms, options.selection.until_ms)
    async for record in RangeReader(kafka).read(kinds, windows, progress):
        if options.selection.matches_fields(record):
            joiner.add(record)
    return joiner.report()


async def resubmit(
    kafka: KafkaSettings,
    options: ReplayOptions,
    model_id: str | None = None,
    progress: Progress | None = None,
) -> list[Resubmitted]:
    """Submit the selected requests again, once per id, with new ids linking back."""
    selection = options.selection
    if selection == RecordFilter():
        raise ReplayArgumentError(
            "refusing to resubmit every request in the topic: narrow it with --since/--until, "
            "--session, --model or --request-id"
        )
    originals: dict[str, InferenceRequest] = {}
    replay = ReplayOptions(topics=("requests",), selection=selection)
    async for record in replay_records(kafka, replay, progress):
        if isinstance(record.value, InferenceRequest) and record.value.id not in originals:
            originals[record.value.id] = record.value
    copies = [resubmission(r, new_id(), model_id=model_id) for r in originals.values()]
    if copies:
        async with RequestProducer(kafka) as producer:
            await producer.submit_many(copies)
    return [Resubmitted(c.id, c.original_id or "", c.model_id) for c in copies]
