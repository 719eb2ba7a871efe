"""Follow ``inference.responses`` and hand each awaited request id its first response.

Used by :meth:`producers.client.RequestProducer.submit_and_wait`. It reads every
partition from the end it found when it started, with no consumer group, so it
never takes partitions away from anyone and sees every response written after
it started: start it *before* producing the requests whose answers it awaits.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from nexus.kafka_clients import client_options
from nexus.settings import KafkaSettings
from nexus.topics import TopicMissingError, read_from_end
from schemas import Codec, InferenceResponse, SchemaError, decode_response

log = logging.getLogger(__name__)


class ListenerError(RuntimeError):
    """The responses topic cannot be read; the message says where and why."""


class ResponseListener:
    def __init__(self, kafka: KafkaSettings, codec: Codec) -> None:
        self._kafka = kafka
        self._codec = codec
        self._waiting: dict[str, asyncio.Future[InferenceResponse]] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None

    async def start(self) -> None:
        """Position at the end of every partition; return once the positions are fixed."""
        topic = self._kafka.responses_topic
        consumer = AIOKafkaConsumer(
            **client_options(self._kafka), group_id=None, enable_auto_commit=False,
            client_id="nexus-response-listener", isolation_level=self._kafka.isolation_level,
        )
        try:
            await consumer.start()
            await read_from_end(consumer, [topic])
        except TopicMissingError as exc:
            await consumer.stop()
            raise ListenerError(f"{exc} (at {self._kafka.bootstrap})") from None
        except KafkaError as exc:
            await consumer.stop()
            raise ListenerError(f"cannot read {topic!r} at {self._kafka.bootstrap}: {exc}") from None
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer
        self._task = asyncio.create_task(self._run(), name="nexus-response-listener")

    def expect(self, request_id: str) -> "asyncio.Future[InferenceResponse]":
        """A future for the first response with ``request_id``; call before producing it."""
        if self._failure is not None:
            raise ListenerError(f"the response listener stopped: {self._failure!r}")
        future = self._waiting.get(request_id)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._waiting[request_id] = future
        return future

    def forget(self, request_id: str) -> None:
        self._waiting.pop(request_id, None)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def _run(self) -> None:
        assert self._consumer is not None
        try:
            while True:
                batches = await self._consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for record in records:
                        self._deliver(record.value)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # tell every waiter instead of leaving it to time out
            self._failure = exc
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(ListenerError(f"the response listener stopped: {exc!r}"))
            raise

    def _deliver(self, value: bytes | None) -> None:
        if not self._waiting or value is None:
            return
        try:
            response = decode_response(self._codec, value)
        except SchemaError as exc:
            log.debug("skipping an undecodable response: %s", exc)
            return
        future = self._waiting.pop(response.id, None)
        if future is not None and not future.done():
            future.set_result(response)
