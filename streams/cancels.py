"""Cancels: which requests their senders gave up on, read from ``inference.cancels``.

Every worker reads every partition of the cancels topic, in no consumer group: a cancel is
rare and small, and only the worker holding the request (queued, running, or not read yet)
can act on it. :class:`CancelBook` remembers the recent ones (pure, no I/O), so a request read
after its cancel is answered ``cancelled`` without a model call; :func:`follow_cancels` is the
thin Kafka loop that fills it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from aiokafka import TopicPartition

from nexus.kafka.readers import known_partitions, reader
from nexus.settings import KafkaSettings
from schemas import Codec, InferenceCancel, InferenceRequest, SchemaError, decode_cancel

log = logging.getLogger(__name__)

#: How far back a starting worker reads cancels, and how long it remembers one: a request
#: cancelled before a worker read it is still found cancelled when it is read.
CANCEL_LOOKBACK_S = 600.0


class CancelBook:
    """The cancels of the last :data:`CANCEL_LOOKBACK_S` seconds, by request id."""

    def __init__(self, keep_s: float = CANCEL_LOOKBACK_S) -> None:
        self._keep_s = keep_s
        self._cancels: OrderedDict[str, tuple[float, InferenceCancel]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._cancels)

    def add(self, cancel: InferenceCancel, now: float) -> None:
        self._cancels[cancel.id] = (now, cancel)
        self._cancels.move_to_end(cancel.id)
        while self._cancels:
            at, _ = next(iter(self._cancels.values()))
            if now - at <= self._keep_s:
                break
            self._cancels.popitem(last=False)

    def reason(self, request: InferenceRequest) -> str | None:
        """Why ``request`` is cancelled, or None. A request sent with an API key is cancelled only
        by a cancel sent with the same key: a client cannot cancel another key's requests."""
        found = self._cancels.get(request.id)
        if found is None:
            return None
        cancel = found[1]
        if request.key_name is not None and cancel.key_name != request.key_name:
            return None
        return f"cancelled: {cancel.reason}" if cancel.reason else "cancelled by its sender"


async def follow_cancels(
    kafka: KafkaSettings,
    codec: Codec,
    on_cancel: Callable[[InferenceCancel], None],
    on_malformed: Callable[[object, str], Awaitable[None]],
    client_id: str = "nexus-worker-cancels",
) -> None:
    """Read every partition of the cancels topic from :data:`CANCEL_LOOKBACK_S` ago, forever.

    ``on_malformed(record, reason)`` is given each record that is not a cancel (it belongs in
    the dead-letter topic).
    """
    consumer = reader(kafka, client_id, auto_offset_reset="latest")
    await consumer.start()
    failed = False
    try:
        tps = [TopicPartition(kafka.cancels_topic, p)
               for p in await known_partitions(consumer, kafka.cancels_topic, timeout_s=30)]
        consumer.assign(tps)
        since = int((time.time() - CANCEL_LOOKBACK_S) * 1000)
        ends = await consumer.end_offsets(tps)  # before the look-up: a cancel sent meanwhile is read
        offsets = await consumer.offsets_for_times({tp: since for tp in tps})
        for tp in tps:
            found = offsets.get(tp)
            consumer.seek(tp, ends[tp] if found is None else found.offset)
        while True:
            batches = await consumer.getmany(timeout_ms=1000)
            for records in batches.values():
                for record in records:
                    try:
                        cancel = decode_cancel(codec, record.value)
                    except SchemaError as exc:
                        log.warning("dead-lettering a cancels record that is not a cancel: %s", exc)
                        await on_malformed(record, str(exc))
                        continue
                    on_cancel(cancel)
    except Exception:
        failed = True
        raise
    finally:
        try:
            await consumer.stop()
        except asyncio.CancelledError:
            # aiokafka's stop after a failure can raise CancelledError (its own routines): the
            # failure is what counts, so that the loop is restarted rather than seen as stopped.
            if not failed:
                raise
