"""The scheduler end to end: a real broker, a real worker, a simulated model kept saturated.

The simulator runs at a small fixed capacity (2 generations at once, and the worker's endpoint
holds 2), so nearly every request waits in the worker's schedule and its order shows: the
simulator records every call's body in arrival order, which is the order the worker
dispatched them. One worker (its own topics and group) serves the module; the SIGKILL test has
a stack of its own. Every wait is for a condition: a queue report listing a request, an answer,
a chunk; nothing sleeps to let a race settle.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from nexus.kafka.clients import client_options
from nexus.kafka.readers import read_from_end
from nexus.kafka.topics import ensure_topics
from nexus.settings import KafkaSettings
from producers.client import RequestProducer
from schemas import (
    Codec, InferenceRequest, InferenceResponse, ModelContext, QueueReport, SchemaError, decode_response,
    decode_request, decode_token, encode_request, utcnow,
)
from tests.eventually import eventually
from tests.integration.support import Role, stack_env, start_simulator

MODEL = "m"
CAPACITY = 2  # the simulator's parallel slots, and the endpoint's max_concurrency: saturated at once
# ~8-token answers: 40 ms to the first token, then 5 ms a token: ~75 ms a call, ~26 calls/s in all.
SIM_ARGS = ["--models", MODEL, "--parallel", str(CAPACITY), "--ttft-ms", "40", "--tokens-per-s", "200",
            "--record-bodies", "20000"]
WEIGHTS = {"fair-a": 1.0, "fair-b": 2.0, "fair-c": 1.0}
TENANTS_ENV = ";".join(f"{name}:weight={weight:g}" for name, weight in WEIGHTS.items())


# ----------------------------------------------------------------------------- harness


@dataclass
class Seen:
    """What the worker wrote, read as it comes: answers, streamed chunks, queue reports."""

    answers: dict[str, list[InferenceResponse]] = field(default_factory=lambda: defaultdict(list))
    chunks: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    reports: list[QueueReport] = field(default_factory=list)

    def first(self, request_id: str) -> InferenceResponse:
        return self.answers[request_id][0]

    def waiting_in_reports(self, request_id: str) -> bool:
        return any(any(e["id"] == request_id for e in r.waiting) for r in self.reports)


class Follower:
    """Reads the responses, tokens and queue topics from their ends into a :class:`Seen`."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self.kafka = kafka
        self.codec = Codec.from_directory()
        self.seen = Seen()
        self._consumer = AIOKafkaConsumer(**client_options(kafka), enable_auto_commit=False, group_id=None)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        await read_from_end(self._consumer, [self.kafka.responses_topic, self.kafka.tokens_topic,
                                             self.kafka.queue_topic], timeout_s=30)
        self._task = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()

    async def caught_up(self, timeout: float = 30.0) -> None:
        """Return once every record written so far to the followed topics has been read."""
        tps = list(self._consumer.assignment())
        ends = await self._consumer.end_offsets(tps)

        async def read_to_ends() -> bool:
            for tp in tps:
                if await self._consumer.position(tp) < ends[tp]:
                    return False
            return True

        await eventually(read_to_ends, "the follower read to the topics' ends", timeout=timeout)

    async def _follow(self) -> None:
        seen, k = self.seen, self.kafka
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            for tp, records in batches.items():
                for record in records:
                    if tp.topic == k.responses_topic:
                        response = decode_response(self.codec, record.value)
                        seen.answers[response.id].append(response)
                    elif tp.topic == k.tokens_topic:
                        token = decode_token(self.codec, record.value)
                        seen.chunks[token.id].append(token.text)
                    elif record.value:
                        try:
                            seen.reports.append(QueueReport.from_bytes(record.value))
                        except SchemaError:
                            pass


@dataclass
class Stack:
    """A worker on topics of its own, the simulator it calls, and the Kafka ends a test uses."""

    run: str
    kafka: KafkaSettings
    env: dict[str, str]
    sim: Role
    worker: Role
    producer: RequestProducer
    follower: Follower
    logs_dir: Path

    @property
    def seen(self) -> Seen:
        return self.follower.seen

    @property
    def web(self) -> str:
        return f"http://127.0.0.1:{self.env['NEXUS_WORKER_WEB_PORT']}"

    def request(self, tag: str, n: int | str, *, tenant: str | None = None, priority: str = "interactive",
                words: int = 0, **fields: Any) -> InferenceRequest:
        """A request whose input starts with its id, so the simulator's recorded bodies tell it apart."""
        request_id = f"{self.run}-{tag}-{n}"
        text = f"{request_id} {tenant or '-'} " + " ".join(["word"] * words)
        return InferenceRequest(request_id, MODEL, text.strip(), ModelContext(f"s-{tag}-{n}"),
                                priority=priority, tenant=tenant, **fields)

    async def until(self, what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
        return await eventually(check, what, timeout=timeout, interval=0.05, context=self.worker.log_tail)

    async def answers(self, requests: list[InferenceRequest], timeout: float = 60.0) -> dict[str, InferenceResponse]:
        ids = [r.id for r in requests]

        def all_answered() -> bool:
            missing = [i for i in ids if not self.seen.answers.get(i)]
            if missing:
                raise AssertionError(f"{len(ids) - len(missing)} answered; not yet {missing[:3]}")
            return True

        await self.until(f"all {len(ids)} requests answered", all_answered, timeout)
        return {i: self.seen.first(i) for i in ids}

    async def read(self, requests: list[InferenceRequest], timeout: float = 30.0) -> None:
        """Wait until the worker has read every one of ``requests`` (a queue report lists it waiting
        or running, or it is answered). The worker reads its two lanes side by side: a request sent
        after a backlog on the other lane can reach the schedule first, while the backlog is still
        being read, and take a free slot; a test that needs it behind the backlog waits for this."""
        ids = {r.id for r in requests}

        def all_read() -> bool:
            answered = {i for i in ids if self.seen.answers.get(i)}
            return any(ids <= answered | {e["id"] for e in r.waiting} | {e["id"] for e in r.running}
                       for r in self.seen.reports)

        await self.until(f"all {len(ids)} requests read by the worker", all_read, timeout)

    async def sim_stats(self) -> dict[str, Any]:
        async with httpx.AsyncClient() as http:
            return (await http.get(f"{self.sim.url}/simulator/stats", timeout=10)).json()

    async def dispatched(self, prefix: str) -> list[str]:
        """The prompts of the generations the simulator received, in arrival order, that start with ``prefix``."""
        bodies = (await self.sim_stats())["received_bodies"].get("/api/generate", [])
        return [b["prompt"] for b in bodies if str(b.get("prompt", "")).startswith(prefix)]

    async def metric(self, name: str, **labels: str) -> float:
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"{self.web}/metrics", timeout=5)).text
        return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def start_worker(self) -> Role:
        self.worker = Role(f"worker-{self.run}", ["worker"], self.env, self.logs_dir).start()
        return self.worker


@asynccontextmanager
async def stack(bootstrap: str, logs_dir: Path, config_dir: Path, **worker_env: str) -> AsyncIterator[Stack]:
    """A simulator at :data:`CAPACITY` and a worker serving it on topics and a group of their own.

    Returns once the worker answered a warm-up request, so it owns its partitions.
    """
    run = uuid.uuid4().hex[:8]
    sim = start_simulator(logs_dir, SIM_ARGS)
    try:
        async with _worker_of(run, sim, bootstrap, logs_dir, config_dir, worker_env) as s:
            yield s
    finally:
        sim.stop()


@asynccontextmanager
async def _worker_of(run: str, sim: Role, bootstrap: str, logs_dir: Path, config_dir: Path,
                     worker_env: dict[str, str]) -> AsyncIterator[Stack]:
    config = config_dir / f"nexus-{run}.toml"
    config.write_text(f'[models."{MODEL}"]\nendpoints = [{{ url = "{sim.url}", max_concurrency = {CAPACITY} }}]\n')
    names = ("requests", "batch_requests", "cancels", "responses", "dlq", "tokens", "state", "queue")
    topics = {key: f"t{run}.{key}" for key in names}
    env = stack_env(bootstrap, "http://127.0.0.1:1", NEXUS_CONFIG=str(config), NEXUS_KAFKA_PARTITIONS="2",
                    NEXUS_WORKER_APP_ID=f"nexus-sched-{run}", NEXUS_TENANTS=TENANTS_ENV,
                    **{f"NEXUS_KAFKA_{key.upper()}_TOPIC": name for key, name in topics.items()}, **worker_env)
    kafka = KafkaSettings(bootstrap=bootstrap, partitions=2, **{f"{key}_topic": name for key, name in topics.items()})
    await ensure_topics(kafka)
    follower = Follower(kafka)
    s = Stack(run, kafka, env, sim, Role("-", [], env, logs_dir), None, follower, logs_dir)  # type: ignore[arg-type]
    try:
        s.start_worker()
        await follower.start()
        async with RequestProducer(kafka) as producer:
            s.producer = producer
            warm = InferenceRequest(f"{run}-warm-up", "no-such-model", "", ModelContext("w"))
            await producer.submit(warm)
            await s.answers([warm], timeout=90)
            yield s
    finally:
        await follower.stop()
        s.worker.stop()


@pytest.fixture(scope="module")
async def sched(bootstrap: str, logs_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with stack(bootstrap, logs_dir, tmp_path_factory.mktemp("sched")) as s:
        yield s


# ----------------------------------------------------------------------------- class


async def test_interactive_requests_start_before_a_batch_backlog_read_ahead_of_them(sched: Stack) -> None:
    backlog = [sched.request("ib-batch", i, tenant="bulk", priority="batch") for i in range(60)]
    await sched.producer.submit_many(backlog)
    # The worker holds the backlog in its schedule (not just in Kafka) before the interactive ones come.
    await sched.until("the batch backlog is waiting in the worker's schedule", lambda: any(
        sum(1 for e in r.waiting if e["id"].startswith(f"{sched.run}-ib-batch-")) >= 40 for r in sched.seen.reports))
    urgent = [sched.request("ib-urgent", i, tenant="someone") for i in range(5)]
    await sched.producer.submit_many(urgent)
    urgent_answers = await sched.answers(urgent, timeout=60)
    batch_answers = await sched.answers(backlog, timeout=90)
    last_urgent = max(a.completed_at for a in urgent_answers.values())
    batch_before = sum(1 for a in batch_answers.values() if a.completed_at < last_urgent)

    assert all(a.status == "ok" and a.priority == "interactive" for a in urgent_answers.values())
    assert all(a.status == "ok" and a.priority == "batch" and a.tenant == "bulk" for a in batch_answers.values())
    # First in, first out would answer all 60 first. Each interactive one waits for one slot at most.
    assert batch_before <= 20, f"{batch_before} of 60 batch answers came before the last interactive one"
    batch_waits = sorted(a.queue_ms for a in batch_answers.values())
    assert max(a.queue_ms for a in urgent_answers.values()) < batch_waits[len(batch_waits) // 2], (
        [a.queue_ms for a in urgent_answers.values()], batch_waits)
    assert await sched.metric("nexus_worker_dispatched_requests_total", priority="batch") >= 60


# ----------------------------------------------------------------------------- tenants


async def test_three_backlogged_tenants_share_the_model_by_their_weights(sched: Stack) -> None:
    """fair-a, fair-b, fair-c weigh 1, 2, 1 and want 150, 150, 40 batch requests, all queued before the
    first starts (an interactive backlog ahead holds the model meanwhile). Over the first 120 starts,
    while all three still wait, each tenant's count is within 10% of its weight's share."""
    ahead = [sched.request("fs-ahead", i, tenant="fair-ahead") for i in range(100)]  # ~4 s: time to read 340
    demand = {"fair-a": 150, "fair-b": 150, "fair-c": 40}
    backlog = [sched.request("fs", f"{t}-{i}", tenant=t, priority="batch")
               for t, n in demand.items() for i in range(n)]  # in blocks: arrival order favours fair-a
    await sched.producer.submit_many(ahead)
    await sched.read(ahead)
    await sched.producer.submit_many(backlog)
    prefix = f"{sched.run}-fs-fair-"

    def all_queued() -> QueueReport:
        counts = [sum(1 for e in r.waiting if e["id"].startswith(prefix)) for r in sched.seen.reports]
        found = [r for r, n in zip(sched.seen.reports, counts) if n == len(backlog)]
        if not found:
            raise AssertionError(f"batch requests waiting in each report: {counts[-40:]}")
        return found[0]

    queued = await sched.until(f"all {len(backlog)} batch requests waiting at once in the worker's schedule",
                               all_queued, timeout=60)
    assert not any(e["priority"] == "batch" for e in queued.running), "a batch request started before all were read"
    await sched.answers(ahead + backlog, timeout=120)

    order = [prompt.split()[1] for prompt in await sched.dispatched(prefix)]
    assert len(order) == len(backlog), f"{len(order)} of {len(backlog)} batch requests reached the model once"
    window = 120  # fair-c (a quarter) has 40: every tenant is still backlogged over these starts
    counts = Counter(order[:window])
    total = sum(WEIGHTS.values())
    shares = {t: window * w / total for t, w in WEIGHTS.items()}
    print(f"\nfirst {window} starts: {dict(counts)}; weights' shares {shares}")
    for tenant, share in shares.items():
        assert abs(counts[tenant] - share) <= 0.1 * share, f"{tenant}: {counts[tenant]} starts, share {share:g}; {dict(counts)}"
    # Once fair-c is done (its 40 at a quarter: about the 160th start), fair-a and fair-b go on 1 : 2.
    rest = Counter(order[170:260])
    assert rest["fair-c"] == 0 and abs(rest["fair-b"] - 2 * rest["fair-a"]) <= 6, dict(rest)


async def test_within_a_tenant_the_earliest_deadline_starts_first_then_arrival_order(sched: Stack) -> None:
    """One tenant's 30 batch requests without a deadline, then 5 with one (far enough to be met): the 5
    start first, earliest deadline first; the 30 follow in the order they were sent."""
    ahead = [sched.request("edf-ahead", i, tenant="edf-ahead") for i in range(60)]  # holds the model meanwhile
    plain = [sched.request("edf", f"p{i:02d}", tenant="edf", priority="batch") for i in range(30)]
    due = [sched.request("edf", f"d{i}", tenant="edf", priority="batch",
                         deadline=utcnow() + timedelta(seconds=120 - 10 * i)) for i in range(5)]
    await sched.producer.submit_many(ahead)
    await sched.read(ahead)
    for request in plain + due:  # one at a time: their order in the log is the order sent
        await sched.producer.submit(request)
    prefix = f"{sched.run}-edf-"
    await sched.until("all 35 waiting at once", lambda: any(
        sum(1 for e in r.waiting if e["id"].startswith(prefix) and e["priority"] == "batch") == 35
        for r in sched.seen.reports), timeout=60)
    await sched.answers(ahead + plain + due, timeout=90)

    order = [prompt.split()[0].rsplit("-", 1)[1] for prompt in await sched.dispatched(prefix)
             if prompt.split()[1] == "edf"]
    assert order[:5] == ["d4", "d3", "d2", "d1", "d0"], order[:5]
    assert order[5:] == [f"p{i:02d}" for i in range(30)], f"not in arrival order: {order[5:]}"


# ----------------------------------------------------------------------------- deadlines and cancels


async def test_a_deadline_that_passes_in_the_queue_is_answered_expired_without_a_model_call(sched: Stack) -> None:
    backlog = [sched.request("dl-bulk", i, tenant="dl-bulk") for i in range(80)]
    await sched.producer.submit_many(backlog)
    await sched.read(backlog)
    late = sched.request("dl-late", 0, tenant="dl-late", priority="batch", deadline=utcnow() + timedelta(seconds=1.5))
    await sched.producer.submit(late)
    await sched.until("the short-deadline request waiting behind the backlog",
                      lambda: sched.seen.waiting_in_reports(late.id))
    [answer] = (await sched.answers([late], timeout=30)).values()
    done = await sched.answers(backlog, timeout=90)

    assert answer.status == "expired", (answer.status, answer.error)
    assert (answer.error or "").startswith("expired"), answer.error
    assert answer.priority == "batch" and answer.tenant == "dl-late"
    # Answered when its deadline passed, not when its turn would have come.
    assert answer.completed_at < max(a.completed_at for a in done.values())
    assert (answer.completed_at - late.deadline).total_seconds() < 2.0, answer.completed_at - late.deadline
    assert await sched.dispatched(late.id) == [], "the expired request reached the model"
    assert await sched.metric("nexus_worker_expired_requests_total", priority="batch") >= 1


async def test_a_queued_request_cancelled_is_answered_cancelled_and_never_reaches_the_model(sched: Stack) -> None:
    backlog = [sched.request("cq-bulk", i, tenant="cq-bulk") for i in range(60)]
    await sched.producer.submit_many(backlog)
    await sched.read(backlog)
    victim = sched.request("cq-victim", 0, tenant="cq-victim", priority="batch")
    await sched.producer.submit(victim)
    await sched.until("the victim waiting in the schedule", lambda: sched.seen.waiting_in_reports(victim.id))
    await sched.producer.cancel(victim.id, reason="changed my mind")
    [answer] = (await sched.answers([victim], timeout=30)).values()
    done = await sched.answers(backlog, timeout=90)

    assert answer.status == "cancelled", (answer.status, answer.error)
    assert "changed my mind" in (answer.error or ""), answer.error
    assert answer.output == "" and answer.tenant == "cq-victim"
    assert answer.completed_at < max(a.completed_at for a in done.values()), "dropped at once, not at its turn"
    assert await sched.dispatched(victim.id) == []
    assert len(sched.seen.answers[victim.id]) == 1


async def test_a_streaming_request_cancelled_stops_the_models_generation_and_keeps_its_partial_output(
    sched: Stack,
) -> None:
    stream = sched.request("cs", 0, tenant="cs", words=800, stream=True)  # ~4 s of tokens if left alone
    await sched.producer.submit(stream)
    await sched.until("the first chunks streamed", lambda: len(sched.seen.chunks[stream.id]) >= 5)
    await sched.producer.cancel(stream.id, reason="enough")
    [answer] = (await sched.answers([stream], timeout=30)).values()
    full = f"[simulated {MODEL}] You said: {stream.input}"

    assert answer.status == "cancelled", (answer.status, answer.error)
    assert "enough" in (answer.error or "")
    assert answer.output and full.startswith(answer.output) and len(answer.output) < len(full), answer.output[-80:]
    # The model server saw its client close the stream, and generated no more of it.
    stats = await sched.until("the simulator saw the stream closed early", lambda: _stopped(sched, stream.id))
    assert stats["stream"] is True and stats["tokens_streamed"] < stats["tokens_planned"], stats
    assert len(await sched.dispatched(stream.id)) == 1


async def _stopped(s: Stack, request_id: str) -> dict[str, Any] | None:
    return next((e for e in (await s.sim_stats())["stopped"] if e["prompt"].startswith(request_id)), None)


# ----------------------------------------------------------------------------- old records


async def test_requests_written_with_every_older_schema_are_answered_as_interactive(sched: Stack) -> None:
    """An old client's records (InferenceRequest v1..v4: no priority, no tenant) reach the worker on
    the interactive lane: answered, counted interactive, their session as their tenant."""
    codec = Codec.from_directory()
    current = max(v.version for v in codec.versions if v.name == "InferenceRequest")
    old = list(range(1, current))
    assert 4 in old
    before = await sched.metric("nexus_worker_dispatched_requests_total", priority="interactive")
    requests = {v: InferenceRequest(f"{sched.run}-v{v}", MODEL, f"{sched.run}-v{v} from an old client",
                                    ModelContext(f"old-session-{v}")) for v in old}
    producer = AIOKafkaProducer(**client_options(sched.kafka))
    await producer.start()
    try:
        for version, request in requests.items():
            data = encode_request(Codec.from_directory(pin={"InferenceRequest": version}), request)
            assert codec.writer_of(data).version == version
            await producer.send_and_wait(sched.kafka.requests_topic, data, key=MODEL.encode())
    finally:
        await producer.stop()
    answers = await sched.answers(list(requests.values()), timeout=60)
    for version, request in requests.items():
        answer = answers[request.id]
        assert answer.status == "ok", (version, answer.error)
        assert answer.priority == "interactive" and answer.tenant == f"old-session-{version}", (version, answer)
    after = await sched.metric("nexus_worker_dispatched_requests_total", priority="interactive")
    assert after - before >= len(old)


# ----------------------------------------------------------------------------- crash


async def request_offsets(kafka: KafkaSettings) -> dict[str, tuple[str, int, int]]:
    """Every request id in both lanes: (topic, partition, offset)."""
    codec = Codec.from_directory()
    consumer = AIOKafkaConsumer(**client_options(kafka), enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        out: dict[str, tuple[str, int, int]] = {}
        tps = [TopicPartition(t, p) for t in kafka.request_topics for p in range(kafka.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        while True:
            positions = [await consumer.position(tp) for tp in tps]
            if all(at >= ends[tp] for at, tp in zip(positions, tps)):
                return out
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                for record in records:
                    out[decode_request(codec, record.value).id] = (tp.topic, tp.partition, record.offset)
    finally:
        await consumer.stop()


async def committed_offsets(kafka: KafkaSettings, group: str) -> dict[tuple[str, int], int]:
    """The group's committed offset of each request partition (0 where none), read without joining it."""
    consumer = AIOKafkaConsumer(**client_options(kafka), enable_auto_commit=False, group_id=group)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in kafka.request_topics for p in range(kafka.partitions)]
        return {(tp.topic, tp.partition): (await consumer.committed(tp)) or 0 for tp in tps}
    finally:
        await consumer.stop()


READ_AHEAD = 16  # requests a worker holds per lane in the tests below: most of a backlog waits in Kafka


@pytest.fixture(scope="module")
async def small(bootstrap: str, logs_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """A stack whose worker reads ahead :data:`READ_AHEAD` requests a lane."""
    async with stack(bootstrap, logs_dir, tmp_path_factory.mktemp("small"),
                     NEXUS_WORKER_MAX_IN_FLIGHT=str(READ_AHEAD)) as s:
        yield s


async def test_a_backlog_larger_than_the_read_ahead_is_answered_completely(small: Stack) -> None:
    """Each lane is paused while the worker holds READ_AHEAD of it and resumed as answers go out: every
    request is read once, in order, none skipped (and none left at the end of the log)."""
    s = small
    backlog = ([s.request("ra", f"b{i}", tenant="ra-b", priority="batch") for i in range(120)]
               + [s.request("ra", f"i{i}", tenant="ra-i") for i in range(40)])
    await s.producer.submit_many(backlog)
    answers = await s.answers(backlog, timeout=40)  # about 6 s of model time
    assert all(a.status == "ok" for a in answers.values())
    rereads = await s.metric("nexus_worker_rereads_total")
    assert rereads == 0, f"the consumer skipped records {rereads:g} times; they had to be read again"
    calls = Counter(prompt.split()[0] for prompt in await s.dispatched(f"{s.run}-ra-"))
    assert set(calls) == {r.id for r in backlog} and set(calls.values()) == {1}, "each reached the model once"


async def test_a_worker_killed_during_a_scheduled_backlog_loses_nothing(small: Stack) -> None:
    """Both lanes, four tenants, a small read-ahead (16 a lane: some of each lane waits in the schedule,
    the rest in Kafka). SIGKILL mid-backlog, then a new worker: every request is answered, and only
    the ones the dead worker answered past its last commit are answered twice."""
    s = small
    mix = ([s.request("k", f"a{i}", tenant="fair-a", priority="batch") for i in range(50)]
           + [s.request("k", f"b{i}", tenant="fair-b", priority="batch") for i in range(40)]
           + [s.request("k", f"c{i}", tenant="fair-c") for i in range(30)]
           + [s.request("k", f"d{i}") for i in range(30)])  # no tenant: their sessions
    await s.producer.submit_many(mix)
    ids = [r.id for r in mix]
    await s.until("some answered, many waiting", lambda: sum(1 for i in ids if s.seen.answers.get(i)) >= 30)
    s.worker.kill()
    await s.follower.caught_up()  # everything the dead worker wrote is read
    answered_at_kill = {i for i in ids if s.seen.answers.get(i)}
    committed = await committed_offsets(s.kafka, s.env["NEXUS_WORKER_APP_ID"])
    s.start_worker()
    answers = await s.answers(mix, timeout=120)
    await s.until("the new worker's schedule is empty", lambda: s.seen.reports and s.seen.reports[-1].empty)
    await s.follower.caught_up()
    offsets = await request_offsets(s.kafka)
    duplicates = {i: len(s.seen.answers[i]) for i in ids if len(s.seen.answers[i]) > 1}

    uncommitted = {i for i in answered_at_kill if offsets[i][2] >= committed[offsets[i][:2]]}
    print(f"\n{len(answered_at_kill)} of {len(ids)} answered at the kill, {len(uncommitted)} of them past the "
          f"committed offsets {committed}; {len(duplicates)} answered twice")
    assert 0 < len(answered_at_kill) < len(ids)
    assert all(a.status == "ok" for a in answers.values()), [a.error for a in answers.values() if a.status != "ok"][:3]
    assert set(answers) == set(ids), "every request is answered"
    assert all(n == 2 for n in duplicates.values()), duplicates
    # At least once, no more: a request is answered again only if the dead worker answered it past its
    # last commit (never one it had not answered: those were answered once, by the new worker).
    assert set(duplicates) <= uncommitted, sorted(set(duplicates) - uncommitted)
