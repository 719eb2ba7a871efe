"""The worker's Faust shell: the app, its topics, agents, timers and pages, given to a Worker.

The worker answers ``inference.requests`` and its batch lane ``inference.requests.batch`` in batches (streams/worker.py says how, and how it
commits). This module only wires it into Faust: the requests agents (``nexus.infer``,
``nexus.infer-batch``), the commit, endpoint-state, lag and cache-sweep timers, the rebalance
signals, the ``/health``, ``/metrics`` and ``/models`` pages, and the topics created before Faust starts.

The response cache is a Faust table. An answer's entry is written into memory and onto the
changelog partition of the requests partition it serves (its model's), so the worker that owns a
model's partition owns its cache entries, and a restarted worker recovers them from the changelog
(streams/sinks.py, ``TableCache``). Expired entries (and those over ``worker.cache_max_entries``)
are deleted with a tombstone each, as entries are written and from a timer (``CacheKeeper``).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, cast

import faust
from faust.types.auth import CredentialsT
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from nexus import heap
from nexus.access import AccessPolicy, Unauthenticated
from nexus.home import worker_data_dir
from nexus.kafka.clients import ssl_context
from nexus.kafka.topics import (
    KafkaUnavailableError,
    TopicCreationError,
    TopicSpec,
    ensure_topics,
    replication_config,
)
from nexus.settings import KafkaSettings, Settings
from nexus.startup import StartError, ensure_can_listen
from streams.answering.prompt import PromptTemplate
from streams.consumer import SameLoopConsumer
from streams.worker import Worker, WorkerTopics

log = logging.getLogger(__name__)

# Faust's commit timer and count under exactly once: off, the worker commits (streams/commits/outbox.py).
NEVER_S = 10.0**9
NEVER_N = 2**62
LAG_INTERVAL_S = 10.0
FETCH_MAX_WAIT_MS = 100
WEB_HOST = "0.0.0.0"  # the worker's /health, /metrics and /models
STATE_INTERVAL_S = 2.0
QUEUE_INTERVAL_S = 0.5


class RewindingApp(faust.App):
    """A Faust app whose consumer rereads never-committed partitions of ``rewind_topics`` from
    their start whenever Faust seeks back to the committed offsets.

    Why: on a rebalance Faust drops records it already fetched (flow stopped, generation
    changed mid-batch) and seeks every partition back to its committed offset, but aiokafka's
    ``seek_to_committed`` only seeks to offsets > 0: a partition with nothing committed yet kept
    its advanced position and the dropped requests were never read again by that worker
    (faust-streaming/faust#471, #629; docs/performance.md, Scale-out). Rereading from the start
    is what ``consumer_auto_offset_reset="earliest"`` promises; at worst it answers twice.
    """

    rewind_topics: frozenset[str] = frozenset()
    # Faust's own lines ("Starting...", "Flush producer buffer...") under its name, not this module's:
    # they follow the faust logger's level (WARNING unless --log-level debug, nexus/logs.py).
    logger = logging.getLogger("faust.app")
    # Run first when the app stops, while the consumer is still in its group (Worker.drain).
    before_stop: Any = None

    async def on_stop(self) -> None:
        if self.before_stop is not None:
            try:
                await self.before_stop()
            except Exception:
                log.exception("draining the worker before it stops failed")
        await super().on_stop()

    def _new_consumer(self) -> Any:
        # aiokafka on the app's own loop, not in a thread of its own (streams/consumer.py).
        self.transport.Consumer = SameLoopConsumer  # type: ignore[misc]
        consumer: Any = super()._new_consumer()  # Faust internals, patched below
        seek_to_committed = consumer.seek_to_committed
        thread: Any = getattr(consumer, "_thread", None)
        create = getattr(thread, "_create_worker_consumer", None)
        if create is not None:

            def create_with_short_polls(transport: Any) -> Any:
                # Faust fixes the fetch long-poll at 1.5 s. aiokafka sends one fetch per broker at a
                # time, and a partition with records not handed over yet is left out of it: a request
                # arriving meanwhile waited for the long poll to end (1.4 s measured, behind a batch
                # flood). A short poll bounds that wait; idle, it costs a fetch per partition leader
                # every FETCH_MAX_WAIT_MS.
                aiokafka_consumer = create(transport)
                aiokafka_consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
                return aiokafka_consumer

            thread._create_worker_consumer = create_with_short_polls

        async def seek_to_committed_or_start() -> Any:
            committed = await seek_to_committed()
            for tp, offset in committed.items():
                if tp.topic in self.rewind_topics and not (offset and offset > 0):
                    log.debug("nothing committed on %s/%s: rereading it from the start", tp.topic, tp.partition)
                    await consumer.seek(tp, 0)  # past the log start: reset to "earliest"
            return committed

        consumer.seek_to_committed = seek_to_committed_or_start
        return consumer


def create_app(settings: Settings, data_dir: Path | None = None) -> faust.App:
    """Build the Faust app for ``settings``; run it with :func:`run_worker`."""
    kafka = settings.kafka
    config = settings.worker
    data_dir = (data_dir or worker_data_dir(config.app_id)).resolve()  # in the Nexus home, never the cwd
    data_dir.mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
    exactly_once = kafka.processing_guarantee == "exactly_once"
    commits: dict[str, Any] = (  # under exactly once the worker commits itself, between answers (streams/commits/outbox.py)
        {"broker_commit_interval": NEVER_S, "broker_commit_every": NEVER_N}
        if exactly_once
        else {"broker_commit_interval": config.commit_interval_s}
    )
    app = RewindingApp(
        config.app_id,
        broker=[f"kafka://{server.strip()}" for server in kafka.bootstrap.split(",")],
        broker_credentials=faust_credentials(kafka),
        topic_partitions=kafka.partitions,
        topic_replication_factor=kafka.replication_factor,
        producer_acks=-1,
        producer_linger=0.0,  # linger costs latency; records queued while a produce is in flight batch anyway
        broker_session_timeout=kafka.session_timeout_ms / 1000,
        broker_heartbeat_interval=min(3.0, kafka.session_timeout_ms / 3000),
        **commits,
        processing_guarantee=kafka.processing_guarantee,
        consumer_auto_offset_reset="earliest",
        web_port=config.web_port,
        web_host=WEB_HOST,
        datadir=str(data_dir),
        table_cleanup_interval=60.0,
        # Small fetches per partition: a batch flood arrives in bites, so an interactive request
        # fetched meanwhile is handed over within a bite, not after ~1 MB of batch records (a 2000-
        # request flood delayed interactive requests 1.4 s; 0.17 s at most with 64 KiB). A record
        # larger than this is still fetched whole.
        consumer_max_fetch_size=64 * 1024,
    )
    app.rewind_topics = frozenset(kafka.request_topics)
    raw: dict[str, Any] = {"key_serializer": "raw", "value_serializer": "raw"}
    # One agent per lane, interactive and batch; no Faust acks: the worker commits these topics
    # itself, from its ledger, and bounds each lane's read-ahead (streams/worker.py).
    interactive = app.topic(kafka.requests_topic, acks=False, **raw)
    batch = app.topic(kafka.batch_requests_topic, acks=False, **raw)
    topics = WorkerTopics(
        responses=app.topic(kafka.responses_topic, **raw),
        tokens=app.topic(kafka.tokens_topic, **raw),
        dead_letters=app.topic(kafka.dlq_topic, **raw),
        endpoint_state=app.topic(kafka.state_topic, **raw),
        queue=app.topic(kafka.queue_topic, **raw),
    )
    cache_table = app.Table("cache", default=None, partitions=kafka.partitions, key_type=bytes, value_type=bytes,
                            extra_topic_configs=replication_config(kafka),
                            # Recovered entries join the sweep's index (streams/sinks.py, CacheKeeper).
                            on_changelog_event=lambda event: worker.cache.on_changelog(event))
    access = AccessPolicy(settings.access)
    advice = PromptTemplate(config.prompt_template).prefix_advice()  # a bad template fails the start
    if advice:
        log.warning("%s", advice)
    worker: Worker = Worker(app, settings, topics, cast(faust.Table, cache_table))  # app.Table makes a Table; typed TableT
    app.before_stop = worker.drain
    # Faust types receivers as taking *args; it calls them with (sender, partitions, signal=...).
    app.on_partitions_revoked.connect(worker.on_revoked)  # type: ignore[arg-type]
    app.on_partitions_assigned.connect(worker.on_assigned)  # type: ignore[arg-type]

    @app.agent(interactive, name="nexus.infer")
    async def infer(stream: faust.StreamT) -> None:
        await worker.answer(stream)

    @app.agent(batch, name="nexus.infer-batch")
    async def infer_batch(stream: faust.StreamT) -> None:
        await worker.answer(stream)

    @app.timer(config.cache_sweep_interval_s)
    async def sweep_cache() -> None:  # expired entries deleted, tombstoned, while no entry is written too
        worker.sweep_cache()

    @app.timer(config.commit_interval_s)
    async def commit_answered() -> None:
        await worker.commit_and_fill_holes()

    @app.timer(STATE_INTERVAL_S)
    async def publish_endpoint_state() -> None:
        await worker.publish_state()

    @app.timer(QUEUE_INTERVAL_S)
    async def publish_queues() -> None:
        await worker.publish_queues()

    @app.timer(LAG_INTERVAL_S)
    async def consumer_lag() -> None:
        await worker.measure_lag()

    def refused(web: Any, request: Any) -> Any | None:
        """401 unless the caller shows an API key, when keys are configured (docs/security.md)."""
        try:
            access.authenticate_header(request.headers.get("Authorization"))
        except Unauthenticated as exc:
            return web.json({"error": exc.reason}, status=401, headers={"WWW-Authenticate": exc.challenge})
        return None

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        if (refusal := refused(web, request)) is not None:
            return refusal
        return web.bytes(generate_latest(worker.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    @app.page("/health")
    async def health_page(web: Any, request: Any) -> Any:
        """200 while no task failed in the last minute, else 503 with the failures."""
        healthy, body = worker.health_report()
        return web.json(body, status=200 if healthy else 503)

    @app.page("/models")
    async def models_page(web: Any, request: Any) -> Any:
        if (refusal := refused(web, request)) is not None:
            return refusal
        return web.json({"models": worker.models()})

    return app


def faust_credentials(kafka: KafkaSettings) -> CredentialsT | None:
    """The settings' SASL/TLS in Faust's terms; Faust gives them to its producer, consumers and admin."""
    context = ssl_context(kafka)
    if kafka.security_protocol.startswith("SASL_"):
        return faust.SASLCredentials(
            username=kafka.sasl_username,
            password=kafka.sasl_password,
            mechanism=kafka.sasl_mechanism,
            ssl_context=context,  # None: SASL_PLAINTEXT, else SASL_SSL
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def cache_changelog_topic(app_id: str) -> str:
    """Faust's name for the changelog of the ``cache`` table."""
    return f"{app_id}-cache-changelog"


def internal_topics(settings: Settings) -> list[TopicSpec]:
    """The cache table's changelog, to create before Faust starts.

    Faust declares it too, but a first start's partition assignment can run on metadata from
    before it existed ("Ignoring missing topic"), and the rebalance that adds it comes seconds
    later, mid-run (seen on a 3-broker cluster, where a new topic reaches the brokers one by one).
    """
    kafka = settings.kafka
    app_id = settings.worker.app_id
    replication = replication_config(kafka)
    return [
        # As Faust makes it.
        TopicSpec(cache_changelog_topic(app_id), kafka.partitions, {"cleanup.policy": "compact", **replication}),
    ]


def run_worker(settings: Settings) -> None:
    """Run the worker in this process until SIGINT/SIGTERM.

    Logging is the caller's (:func:`nexus.logs.configure`): Faust is told not to set up its own,
    so its records take the same handler, level and format as every role's. Raises
    :class:`~nexus.startup.StartError` when the web port is taken or no broker answers within
    ``kafka.connect_timeout_s``.
    """
    from faust.worker import Worker as FaustWorker

    config = settings.worker
    ensure_can_listen(WEB_HOST, config.web_port, "worker.web_port")
    try:
        asyncio.run(ensure_topics(settings.kafka, extra=internal_topics(settings)))
    except (KafkaUnavailableError, TopicCreationError) as exc:
        raise StartError(str(exc)) from None
    app = create_app(settings)

    class Worker(FaustWorker):
        logger = logging.getLogger("faust.worker")

        async def on_startup_finished(self) -> None:
            await super().on_startup_finished()
            heap.settle()  # what the started app holds is out of every later collection (nexus/heap.py)
            log.info("worker %s started: answering %s; web on http://%s:%d (/health, /metrics, /models)",
                     config.app_id, ", ".join(settings.kafka.request_topics), WEB_HOST, config.web_port)

    # Not Faust's logging: it would replace the root handler with its own (on stdout, its format).
    # quiet: no "-INT- -INT-" or spinner text on the terminal, which a JSON log reader would choke on.
    worker = Worker(app, override_logging=False, quiet=True)
    # Faust's terminal spinner sets the root logger to DEBUG so that it spins on every
    # record: every library's debug record would be built, then dropped by the handler.
    worker.spinner = None
    worker.execute_from_commandline()
