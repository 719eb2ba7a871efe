"""The worker: a Faust app whose agent answers ``inference.requests`` in batches.

Delivery is at-least-once. ``stream.take_events`` acks a batch only after the
loop body returns, and the body returns only after Kafka acknowledged every
response and dead letter of the batch, so a committed offset always has its
answer durably written. A worker killed mid-batch leaves that batch
uncommitted; its successor answers it again (duplicates, never losses).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import faust
import httpx
from faust.types import EventT
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from nexus.settings import Settings
from schemas import Codec, SchemaError, decode_request, encode_response

from .inference import Answer, Inference
from .metrics import WorkerMetrics
from .prompt import PromptTemplate

log = logging.getLogger(__name__)

# Headers of a dead-letter record; its value and key are the original's.
DLQ_REASON = "nexus-error"
DLQ_KIND = "nexus-error-kind"
DLQ_SOURCE = "nexus-source"


def create_app(settings: Settings, data_dir: Path | None = None) -> faust.App:
    """Build the Faust app for ``settings``; run it with :func:`run_worker`."""
    kafka = settings.kafka
    worker = settings.worker
    data_dir = (data_dir or Path(".cache") / "faust" / worker.app_id).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
    app = faust.App(
        worker.app_id,
        broker=[f"kafka://{server.strip()}" for server in kafka.bootstrap.split(",")],
        topic_partitions=kafka.partitions,
        topic_replication_factor=kafka.replication_factor,
        producer_acks=-1,
        producer_linger_ms=1,
        broker_session_timeout=kafka.session_timeout_ms / 1000,
        broker_heartbeat_interval=min(3.0, kafka.session_timeout_ms / 3000),
        broker_commit_interval=worker.commit_interval_s,
        consumer_auto_offset_reset="earliest",
        web_port=worker.web_port,
        web_host="0.0.0.0",
        datadir=str(data_dir),
        table_cleanup_interval=60.0,
    )
    raw = {"key_serializer": "raw", "value_serializer": "raw"}
    requests = app.topic(kafka.requests_topic, **raw)
    responses = app.topic(kafka.responses_topic, **raw)
    dead_letters = app.topic(kafka.dlq_topic, **raw)
    codec = Codec.from_directory()
    metrics = WorkerMetrics()
    PromptTemplate(worker.prompt_template)  # a bad template fails the start, not each request

    async def produce(topic: faust.TopicT, key: bytes | None, value: bytes, headers: Any = None) -> None:
        """Send one record and wait until Kafka acknowledged it, retrying until it does."""
        delay = 0.1
        while True:
            try:
                pending = await topic.send(key=key, value=value, headers=headers)
                await pending
                return
            except Exception as exc:  # the broker is away: hold the batch, lose nothing
                log.warning("producing to %s failed (%r); retrying in %.1fs", topic.get_topic_name(), exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def dead_letter(event: EventT, reason: str, kind: str) -> None:
        message = event.message
        metrics.dead_letters.labels(kind=kind).inc()
        headers = [
            (DLQ_REASON, reason.encode()),
            (DLQ_KIND, kind.encode()),
            (DLQ_SOURCE, f"{message.topic}/{message.partition}/{message.offset}".encode()),
        ]
        await produce(dead_letters, message.key, message.value, headers)

    async def handle(event: EventT, inference: Inference) -> None:
        try:
            request = decode_request(codec, event.message.value)
        except SchemaError as exc:
            log.warning("dead-lettering undecodable record %s/%s: %s",
                        event.message.partition, event.message.offset, exc)
            await dead_letter(event, str(exc), "undecodable")
            return
        answer: Answer = await inference.answer(request)
        await produce(
            responses,
            request.context.session_id.encode(),
            encode_response(codec, answer.response),
        )
        if answer.dead_letter_reason is not None:
            await dead_letter(event, answer.dead_letter_reason, "failed")

    @app.agent(requests, name="nexus.infer")
    async def infer(stream: faust.StreamT) -> None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        async with httpx.AsyncClient(limits=limits) as http:
            inference = Inference(settings, http, metrics)
            async for events in stream.take_events(worker.max_batch, within=worker.max_wait_ms / 1000):
                metrics.batch_size.observe(len(events))
                # Concurrently; the batch is acked only when every answer is durable.
                await asyncio.gather(*(handle(event, inference) for event in events))

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return app


def run_worker(settings: Settings, loglevel: str = "warn") -> None:
    """Run the worker in this process until SIGINT/SIGTERM."""
    from faust.worker import Worker

    from nexus.topics import ensure_topics

    asyncio.run(ensure_topics(settings.kafka))
    app = create_app(settings)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per request
    Worker(app, loglevel=loglevel).execute_from_commandline()
