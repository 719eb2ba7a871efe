"""The Python producer API: submit inference requests to Kafka.

    async with RequestProducer(settings.kafka) as producer:
        request_id = await producer.submit(InferenceRequest(...))

``submit`` returns only once the brokers acknowledged the record (``acks=all``,
idempotent producer), so a returned id is durably in ``inference.requests``.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from nexus.settings import KafkaSettings
from schemas import Codec, InferenceRequest, encode_request


class SubmitError(RuntimeError):
    """Kafka did not acknowledge the request; it may or may not have been written."""


class RequestProducer:
    """Writes :class:`InferenceRequest` records to the requests topic, keyed by model."""

    def __init__(self, kafka: KafkaSettings, codec: Codec | None = None) -> None:
        self._kafka = kafka
        self._codec = codec or Codec.from_directory()
        self._producer = AIOKafkaProducer(
            bootstrap_servers=kafka.bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=1,
            request_timeout_ms=int(kafka.produce_timeout_s * 1000),
        )

    async def start(self) -> None:
        try:
            await self._producer.start()
        except KafkaError as exc:
            await self._producer.stop()
            raise SubmitError(f"cannot reach Kafka at {self._kafka.bootstrap}: {exc}") from None

    async def stop(self) -> None:
        await self._producer.stop()

    async def __aenter__(self) -> "RequestProducer":
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def submit(self, request: InferenceRequest) -> str:
        """Write ``request``; return its id once Kafka acknowledged it.

        Raises :class:`SubmitError` if no acknowledgement arrives within the
        produce timeout, and :class:`schemas.InvalidValueError` for a request
        that does not fit the schema.
        """
        value = encode_request(self._codec, request)
        try:
            await asyncio.wait_for(
                self._producer.send_and_wait(
                    self._kafka.requests_topic, value=value, key=request.model_id.encode()
                ),
                timeout=self._kafka.produce_timeout_s,
            )
        except (KafkaError, asyncio.TimeoutError) as exc:
            reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else str(exc)
            raise SubmitError(
                f"Kafka at {self._kafka.bootstrap} did not acknowledge request {request.id}: {reason}"
            ) from None
        return request.id

    async def submit_many(self, requests: list[InferenceRequest]) -> list[str]:
        """Write several requests concurrently (they share producer batches)."""
        return list(await asyncio.gather(*(self.submit(r) for r in requests)))

    async def ping(self, timeout_s: float) -> None:
        """Raise if the cluster does not answer a metadata request within ``timeout_s``."""
        try:
            ok = await asyncio.wait_for(self._producer.client.fetch_all_metadata(), timeout_s)
        except (KafkaError, asyncio.TimeoutError) as exc:
            raise SubmitError(f"Kafka at {self._kafka.bootstrap} does not answer: {exc!r}") from None
        if not ok.brokers():
            raise SubmitError(f"Kafka at {self._kafka.bootstrap} reports no brokers")
