"""The orchestration brain end to end: a real broker, a real worker, several simulators.

Every test runs a worker of its own (own topics, consumer group and TOML config naming
its own simulators), so the routing decisions seen are caused by that test's traffic
alone. Conditions are polled with deadlines; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from localdev.broker import free_port
from nexus.settings import KafkaSettings
from nexus.kafka.topics import ensure_topics
from producers.client import RequestProducer
from tests.eventually import eventually
from schemas import (
    InferenceOptions, InferenceRequest, InferenceResponse, ModelContext, decode_response, decode_token, utcnow,
)
from tests.integration.support import CODEC, Role, TopicReader, stack_env, wait_for_responses

DETERMINISTIC = InferenceOptions(temperature=0.0)


# ----------------------------------------------------------------------------- harness


class Simulator:
    """A ``nexus simulate-ollama`` process on a fixed port, so it can be restarted in place."""

    def __init__(self, logs_dir: Path, args: list[str], port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.role = Role("simulator", ["simulate-ollama", "--port", str(self.port), *args], dict(os.environ), logs_dir)

    def start(self) -> Simulator:
        self.role.start()
        return self

    def ready(self) -> Simulator:
        self.role.wait_http(self.url)
        return self

    def restart(self) -> Simulator:
        self.role = Role("simulator", self.role.args, self.role.env, self.role.log_path.parent)
        return self.start().ready()

    async def stats(self) -> dict[str, Any]:
        async with httpx.AsyncClient() as http:
            return (await http.get(f"{self.url}/simulator/stats", timeout=5)).json()


def simulators(logs_dir: Path, *args: list[str]) -> list[Simulator]:
    """Start several at once (their start-ups overlap), then wait until each answers."""
    sims = [Simulator(logs_dir, a).start() for a in args]
    return [s.ready() for s in sims]


@dataclass
class Nexus:
    """One isolated worker and the Kafka ends a test talks to it through."""

    run: str
    kafka: KafkaSettings
    worker: Role
    web: str
    producer: RequestProducer
    responses: TopicReader
    tokens: TopicReader
    sims: list[Simulator] = field(default_factory=list)

    def request(self, n: int | str, model: str = "m", **fields: Any) -> InferenceRequest:
        fields.setdefault("context", ModelContext(f"s-{n}"))
        return InferenceRequest(f"{self.run}-{n}", model, fields.pop("input", f"question {n}"), **fields)

    async def ask(self, requests: list[InferenceRequest], timeout: float = 30.0) -> dict[str, InferenceResponse]:
        """Submit and wait for every answer; return the first answer of each request."""
        await self.producer.submit_many(requests)
        try:
            answers = await wait_for_responses(self.responses, {r.id for r in requests}, timeout)
        except TimeoutError as exc:  # what the worker was doing is what tells why
            raise TimeoutError(f"{exc}\nthe worker's log ends with:\n{self.worker.log_tail(80)}") from None
        return {rid: rs[0] for rid, rs in answers.by_id.items()}

    async def models(self) -> dict[str, dict[str, dict[str, Any]]]:
        """The worker's own GET /models: model id -> endpoint url -> live state."""
        async with httpx.AsyncClient() as http:
            body = (await http.get(f"{self.web}/models", timeout=5)).json()
        return {m: {e["url"]: e for e in endpoints} for m, endpoints in body["models"].items()}

    async def metric(self, name: str, **labels: str) -> float:
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"{self.web}/metrics", timeout=5)).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return float("nan")

    async def until(self, what: str, check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
        """Poll ``check`` until true; fail with ``what`` and the worker's log when it never is."""
        await eventually(check, what, timeout=timeout, interval=0.1, context=self.worker.log_tail)


@asynccontextmanager
async def nexus(bootstrap: str, logs_dir: Path, tmp_path: Path, config: str,
                sims: list[Simulator] = ()) -> AsyncIterator[Nexus]:  # type: ignore[assignment]
    """A worker configured by the TOML ``config`` on topics and a group of its own.

    Returns once the worker has answered a warm-up request, so it owns its partitions.
    """
    run = uuid.uuid4().hex[:8]
    path = tmp_path / f"nexus-{run}.toml"
    path.write_text(config)
    topics = {key: f"t{run}.{key}" for key in ("requests", "responses", "dlq", "tokens", "state")}
    env = stack_env(
        bootstrap,
        "http://127.0.0.1:1",  # every model names its endpoints in the config
        NEXUS_CONFIG=str(path),
        NEXUS_KAFKA_PARTITIONS="2",
        NEXUS_WORKER_APP_ID=f"nexus-orch-{run}",
        **{f"NEXUS_KAFKA_{key.upper()}_TOPIC": name for key, name in topics.items()},
    )
    kafka = KafkaSettings(
        bootstrap=bootstrap, partitions=2, requests_topic=topics["requests"], responses_topic=topics["responses"],
        dlq_topic=topics["dlq"], tokens_topic=topics["tokens"], state_topic=topics["state"],
    )
    await ensure_topics(kafka)
    worker = Role(f"worker-{run}", ["worker"], env, logs_dir).start()
    try:
        async with TopicReader(bootstrap, kafka.responses_topic) as responses, TopicReader(
            bootstrap, kafka.tokens_topic
        ) as tokens, RequestProducer(kafka) as producer:
            n = Nexus(run, kafka, worker, f"http://127.0.0.1:{env['NEXUS_WORKER_WEB_PORT']}",
                      producer, responses, tokens, list(sims))
            # An unknown model is answered without any endpoint: proof the worker is consuming.
            await n.ask([InferenceRequest(f"{run}-warm-up", "no-such-model", "", ModelContext("w"))], timeout=60)
            yield n
    finally:
        worker.stop()
        for sim in sims:
            sim.role.stop()


def endpoint_toml(model: str, *endpoints: str, **model_keys: Any) -> str:
    lines = [f'[models."{model}"]', f"endpoints = [{', '.join(endpoints)}]"]
    lines += [f"{k} = {v!r}".replace("'", '"') for k, v in model_keys.items()]
    return "\n".join(lines) + "\n"


def endpoint(sim: Simulator, **keys: Any) -> str:
    return "{ " + ", ".join([f'url = "{sim.url}"', *(f"{k} = {v}" for k, v in keys.items())]) + " }"


def by_endpoint(answers: dict[str, InferenceResponse]) -> Counter[str]:
    return Counter(a.endpoint or "" for a in answers.values())


def all_ok(answers: dict[str, InferenceResponse]) -> bool:
    return all(a.status == "ok" for a in answers.values())


def errors(answers: dict[str, InferenceResponse]) -> list[str]:
    return [f"{a.id}: {a.error}" for a in answers.values() if a.status != "ok"][:5]


# ----------------------------------------------------------------------------- routing


async def test_the_three_times_faster_endpoint_receives_most_requests(
    bootstrap: str, logs_dir: Path, tmp_path: Path
) -> None:
    fast, slow = simulators(logs_dir, *[["--models", "m", "--ttft-ms", ms, "--tokens-per-s", "0", "--parallel", "4"]
                                        for ms in ("30", "90")])
    config = endpoint_toml("m", endpoint(fast, max_concurrency=4), endpoint(slow, max_concurrency=4))
    async with nexus(bootstrap, logs_dir, tmp_path, config, [fast, slow]) as nx:
        started = time.monotonic()
        answers = await nx.ask([nx.request(i) for i in range(160)])
        elapsed = time.monotonic() - started
        fast_stats, slow_stats = await fast.stats(), await slow.stats()
    assert all_ok(answers), errors(answers)
    counts = by_endpoint(answers)
    print(f"\nfast {counts[fast.url]}, slow {counts[slow.url]} of 160 in {elapsed:.2f}s "
          f"({160 / elapsed:.0f}/s; capacities {4 / 0.03 + 4 / 0.09:.0f}/s)")
    # At full load each serves at its capacity: 4/0.03 vs 4/0.09 per second, i.e. 75% vs 25%.
    assert counts[fast.url] >= 0.6 * 160, counts
    assert counts[slow.url] > 0, "the slow endpoint's free capacity is used too"
    assert fast_stats["served_by_model"]["m"] == counts[fast.url]
    assert slow_stats["served_by_model"]["m"] == counts[slow.url]
    assert fast_stats["max_concurrent"] <= 4 and slow_stats["max_concurrent"] <= 4, "max_concurrency held"
    assert fast_stats["rejected_busy"] == slow_stats["rejected_busy"] == 0


async def test_max_rps_is_never_exceeded_over_any_one_second_window(
    bootstrap: str, logs_dir: Path, tmp_path: Path
) -> None:
    [sim] = simulators(logs_dir, ["--models", "m", "--ttft-ms", "5", "--tokens-per-s", "0", "--parallel", "16"])
    max_rps, total = 4, 14
    config = endpoint_toml("m", endpoint(sim, max_concurrency=16, max_rps=max_rps))
    async with nexus(bootstrap, logs_dir, tmp_path, config, [sim]) as nx:
        answers = await nx.ask([nx.request(i) for i in range(total)])
        arrivals = sorted((await sim.stats())["arrivals"])
    assert all_ok(answers), errors(answers)
    assert len(arrivals) == total
    # Any max_rps + 1 consecutive arrivals, as the simulator stamps them, span at least a second:
    # the window's 50 ms guard covers the delay between a send and its arrival's stamp.
    spans = [arrivals[i + max_rps] - arrivals[i] for i in range(total - max_rps)]
    print(f"\nshortest span of {max_rps + 1} arrivals: {min(spans):.4f}s")
    assert min(spans) >= 1.0, [round(s, 4) for s in spans]
    assert arrivals[-1] - arrivals[0] >= (total - 1) // max_rps - 0.005, "the limit, not luck, spaced them"


async def test_sticky_sessions_hold_while_capacity_allows_and_sessions_spread(
    bootstrap: str, logs_dir: Path, tmp_path: Path
) -> None:
    a, b = simulators(logs_dir, *[["--models", "m", "--ttft-ms", "20", "--tokens-per-s", "0", "--parallel", "8"]] * 2)
    config = endpoint_toml("m", endpoint(a, max_concurrency=8), endpoint(b, max_concurrency=8))
    sessions, rounds = 8, 6
    seen: dict[str, list[str]] = {f"session-{s}": [] for s in range(sessions)}
    async with nexus(bootstrap, logs_dir, tmp_path, config, [a, b]) as nx:
        # Both endpoints observed first, so speed alone would not keep a session anywhere.
        warm = await nx.ask([nx.request(f"warm-{i}") for i in range(16)])
        assert set(by_endpoint(warm)) == {a.url, b.url}
        # Each round sends every session's next request at once: 8 in flight, 16 slots,
        # so nothing is full and only stickiness keeps a session where it was.
        for r in range(rounds):
            batch = [nx.request(f"{s}-{r}", context=ModelContext(s)) for s in seen]
            answers = await nx.ask(batch)
            assert all_ok(answers), errors(answers)
            for request in batch:
                seen[request.context.session_id].append(answers[request.id].endpoint or "")
    for session, endpoints in seen.items():
        assert len(set(endpoints)) == 1, f"{session} moved: {endpoints}"
    homes = Counter(endpoints[0] for endpoints in seen.values())
    assert set(homes) == {a.url, b.url} and min(homes.values()) >= 2, homes


# ----------------------------------------------------------------------------- failures


async def test_endpoint_killed_mid_run_loses_nothing_and_its_circuit_opens_then_closes(
    bootstrap: str, logs_dir: Path, tmp_path: Path
) -> None:
    args = ["--models", "m", "--ttft-ms", "40", "--tokens-per-s", "0", "--parallel", "8"]
    victim, survivor = simulators(logs_dir, args, args)
    config = endpoint_toml("m", endpoint(victim, max_concurrency=8), endpoint(survivor, max_concurrency=8))
    async with nexus(bootstrap, logs_dir, tmp_path, config, [victim, survivor]) as nx:
        requests = [nx.request(i) for i in range(240)]
        await nx.producer.submit_many(requests)
        await nx.responses.read_until(lambda records: len(records) >= 40, timeout=30)
        victim.role.kill()
        answered = await wait_for_responses(nx.responses, {r.id for r in requests}, timeout=60)
        answers = {rid: rs[0] for rid, rs in answered.by_id.items()}

        async def circuit() -> str:
            return str((await nx.models())["m"][victim.url]["circuit"])

        await nx.until("the killed endpoint's circuit opens", lambda: _is(circuit(), "open"))
        assert await nx.metric("nexus_worker_circuit_state", endpoint=victim.url) == 2
        victim.restart()
        await nx.until("the circuit closes once the endpoint is back", lambda: _is(circuit(), "closed"), 30)
        assert await nx.metric("nexus_worker_circuit_state", endpoint=victim.url) == 0
        served_before = (await victim.stats())["served_by_model"].get("m", 0)
        after = await nx.ask([nx.request(f"after-{i}") for i in range(60)])
        served_after = (await victim.stats())["served_by_model"].get("m", 0)
    assert set(answers) == {r.id for r in requests}, "no request lost"
    assert all_ok(answers), errors(answers)
    counts = by_endpoint(answers)
    assert counts[victim.url] >= 1 and counts[survivor.url] > counts[victim.url], counts
    assert all_ok(after), errors(after)
    assert served_after - served_before == by_endpoint(after)[victim.url] > 0, "traffic returns to it"


async def _is(value: Awaitable[str], expected: str) -> bool:
    return await value == expected


async def test_busy_503s_under_a_burst_are_retried_not_surfaced(
    bootstrap: str, logs_dir: Path, tmp_path: Path
) -> None:
    # One slot and one queue place, while Nexus believes it may send 4 at once.
    [sim] = simulators(logs_dir, ["--models", "m", "--ttft-ms", "20", "--tokens-per-s", "0",
                                  "--parallel", "1", "--max-queue", "1"])
    config = endpoint_toml("m", endpoint(sim, max_concurrency=4), retries=6)
    async with nexus(bootstrap, logs_dir, tmp_path, config, [sim]) as nx:
        answers = await nx.ask([nx.request(i) for i in range(30)], timeout=60)
        stats = await sim.stats()
    print(f"\n{stats['rejected_busy']} busy 503s; retries per request: "
          f"{sorted(Counter(a.retries for a in answers.values()).items())}")
    assert all_ok(answers), errors(answers)
    assert stats["rejected_busy"] > 0, "the burst did overload the endpoint"
    # It learns what the endpoint holds instead of hammering it (85 busy answers when it did not).
    assert stats["rejected_busy"] < 30, stats["rejected_busy"]
    assert sum(a.retries for a in answers.values()) > 0
    assert stats["served_by_model"]["m"] == 30


async def test_fallback_model_answers_when_the_models_only_endpoint_is_down(
    bootstrap: str, logs_dir: Path, tmp_path: Path
) -> None:
    [backup] = simulators(logs_dir, ["--models", "b", "--ttft-ms", "5", "--tokens-per-s", "0"])
    dead = f'"http://127.0.0.1:{free_port()}"'
    config = endpoint_toml("a", dead, retries=1, timeout_s=5, fallback="b") + endpoint_toml("b", endpoint(backup))
    async with nexus(bootstrap, logs_dir, tmp_path, config, [backup]) as nx:
        answers = await nx.ask([nx.request(i, model="a", input=f"hi {i}") for i in range(5)])
    assert all_ok(answers), errors(answers)
    for answer in answers.values():
        assert answer.model_id == "a" and answer.endpoint == backup.url
        assert answer.output.startswith("[simulated b] You said: hi ")


async def test_deadlines_past_or_too_close_are_answered_as_expired_and_spare_the_endpoint(
    bootstrap: str, logs_dir: Path, tmp_path: Path
) -> None:
    [sim] = simulators(logs_dir, ["--models", "m", "--ttft-ms", "2000", "--tokens-per-s", "0", "--parallel", "8"])
    config = endpoint_toml("m", endpoint(sim, max_concurrency=8))
    async with nexus(bootstrap, logs_dir, tmp_path, config, [sim]) as nx:
        now = utcnow()
        past = [nx.request(f"past-{i}", deadline=now - timedelta(seconds=1)) for i in range(3)]
        # Reaches the worker in time (1.2 s is ample, even on a loaded machine) but cannot be
        # answered in time: the endpoint takes 2 s.
        close = [nx.request(f"close-{i}", deadline=now + timedelta(milliseconds=1200)) for i in range(6)]
        late = await nx.ask(past + close)
        state = (await nx.models())["m"][sim.url]
        reached = (await sim.stats())["received"].get("/api/generate", 0)
        # The endpoint did nothing wrong: a request with room to spare is still served.
        [fine] = (await nx.ask([nx.request("fine", deadline=utcnow() + timedelta(seconds=20))])).values()
    for answer in late.values():
        assert answer.status == "expired" and (answer.error or "").startswith("expired"), answer.error
    assert reached >= 3, "enough calls were cut by their deadline to open the circuit if they counted"
    assert state["circuit"] == "closed", state
    assert fine.status == "ok", fine.error


OUTAGE_S = 60.0  # the "every endpoint down for a minute"


async def test_every_endpoint_down_for_a_minute_requests_wait_or_expire_then_the_backlog_drains(
    bootstrap: str, logs_dir: Path, tmp_path: Path
) -> None:
    args = ["--models", "m,n", "--ttft-ms", "5", "--tokens-per-s", "0", "--parallel", "8"]
    a, b = simulators(logs_dir, args, args)
    # Default deadline: 30 s x (2 retries + 1) = 90 s after creation, longer than the outage.
    config = (endpoint_toml("m", endpoint(a), endpoint(b), timeout_s=30, retries=2)
              + endpoint_toml("n", endpoint(a), timeout_s=30, retries=2))
    async with nexus(bootstrap, logs_dir, tmp_path, config, [a, b]) as nx:
        assert all_ok(await nx.ask([nx.request(f"before-{i}", model="mn"[i % 2]) for i in range(6)]))
        a.role.kill()
        b.role.kill()
        down_at = time.monotonic()
        # Alone, the first request makes every call that opens the circuit of n's endpoint:
        # refused connections must not use up its retries.
        patient = [nx.request("first", model="n")]
        await nx.producer.submit_many(patient)

        async def circuit() -> str:
            return str((await nx.models())["n"][a.url]["circuit"])

        await nx.until("n's endpoint circuit opens", lambda: _is(circuit(), "open"))
        expired: dict[str, InferenceResponse] = {}
        for wave in range(4):  # a wave every 15 s through the outage
            await asyncio.sleep(max(0.0, down_at + 15 * wave - time.monotonic()))
            waiting = [nx.request(f"wait-{wave}-{i}", model="mn"[i % 2]) for i in range(10)]
            hurried = [nx.request(f"hurry-{wave}-{i}", model="mn"[i % 2], deadline=utcnow() + timedelta(seconds=4))
                       for i in range(4)]
            patient += waiting
            # The worker keeps answering through the outage: the hurried ones, by their deadline.
            await nx.producer.submit_many(waiting + hurried)
            answered = await wait_for_responses(nx.responses, {r.id for r in hurried}, timeout=12)
            expired.update({rid: rs[0] for rid, rs in answered.by_id.items()})
        seen = {decode_response(CODEC, r.value).id for r in nx.responses.records}
        assert not seen & {r.id for r in patient}, "requests with time left wait for the endpoints"
        await asyncio.sleep(max(0.0, down_at + OUTAGE_S - time.monotonic()))
        assert nx.worker.alive(), nx.worker.log_tail()
        a.restart()
        b.restart()
        back_at = time.time()
        drained = await wait_for_responses(nx.responses, {r.id for r in patient}, timeout=60)
        answers = {rid: rs[0] for rid, rs in drained.by_id.items()}
        last = max(r.timestamp for r in nx.responses.records if decode_response(CODEC, r.value).id in answers)
    drain_s = last / 1000 - back_at
    print(f"\noutage {OUTAGE_S:.0f} s: {len(expired)} expired by their deadline, {len(patient)} waited "
          f"and were answered {drain_s:.1f} s after the endpoints came back; "
          f"retries per request {sorted(Counter(x.retries for x in answers.values()).items())}")
    assert set(answers) == {r.id for r in patient} and all_ok(answers), errors(answers)
    assert drained.duplicates() == 0
    assert len(expired) == 16 and len(patient) == 41
    for answer in expired.values():
        error = answer.error or ""
        assert answer.status == "expired" and error.startswith("expired"), error
        assert a.url in error and "open" in error, error  # the reason names the endpoints' state
    # Recovery is noticed by a probe within the circuit's 5 s cool-down, not by a retry storm.
    assert drain_s < 15, drain_s


# ----------------------------------------------------------------------------- cache and streaming


async def test_a_cached_request_is_answered_without_reaching_any_endpoint(
    bootstrap: str, logs_dir: Path, tmp_path: Path
) -> None:
    [sim] = simulators(logs_dir, ["--models", "m", "--ttft-ms", "50", "--tokens-per-s", "0"])
    config = endpoint_toml("m", endpoint(sim))
    async with nexus(bootstrap, logs_dir, tmp_path, config, [sim]) as nx:
        same = {"input": "what is two plus two?", "options": DETERMINISTIC, "context": ModelContext("c")}
        [first] = (await nx.ask([nx.request("first", **same)])).values()
        await nx.until("the cache entry is written", lambda: _at_least(nx.metric("nexus_worker_cache_entries"), 1))
        served = (await sim.stats())["served_by_model"]["m"]
        [second] = (await nx.ask([nx.request("second", **same)])).values()
        [other] = (await nx.ask([nx.request("other", **{**same, "input": "and three?"})])).values()
        served_after = (await sim.stats())["served_by_model"]["m"]
        hits = await nx.metric("nexus_worker_cache_lookups_total", model="m", result="hit")
    assert first.status == second.status == other.status == "ok"
    assert (first.cached, second.cached, other.cached) == (False, True, False)
    assert second.output == first.output and second.id.endswith("-second")
    assert served == 1 and served_after == 2, "only the uncached requests reached the endpoint"
    assert hits == 1


async def _at_least(value: Awaitable[float], bound: float) -> bool:
    return await value >= bound


async def test_streamed_answers_arrive_as_ordered_tokens_live_and_from_the_cache(
    bootstrap: str, logs_dir: Path, tmp_path: Path
) -> None:
    # 50 tokens/s: the answer takes ~200 ms, several token flushes.
    [sim] = simulators(logs_dir, ["--models", "m", "--ttft-ms", "10", "--tokens-per-s", "50"])
    config = endpoint_toml("m", endpoint(sim))
    async with nexus(bootstrap, logs_dir, tmp_path, config, [sim]) as nx:
        same = {"input": "stream me a rather long answer please", "options": DETERMINISTIC,
                "context": ModelContext("st"), "stream": True}
        [live] = (await nx.ask([nx.request("live", **same)])).values()
        await nx.until("the cache entry is written", lambda: _at_least(nx.metric("nexus_worker_cache_entries"), 1))
        [cached] = (await nx.ask([nx.request("cached", **same)])).values()
        await nx.tokens.drain()  # chunks are acknowledged before their response is produced
        tokens = [decode_token(CODEC, r.value) for r in nx.tokens.records]
    assert live.status == cached.status == "ok" and (live.cached, cached.cached) == (False, True)
    assert live.output == cached.output == "[simulated m] You said: stream me a rather long answer please"
    # The cached answer (11 words) comes back as chunks of 4 words: 3 token records.
    for answer, at_least in ((live, 2), (cached, 3)):
        chunks = [t for t in tokens if t.id == answer.id]
        assert [t.seq for t in chunks] == list(range(len(chunks))), "in seq order, none missing"
        assert len(chunks) >= at_least
        assert "".join(t.text for t in chunks) == answer.output
        assert {t.session_id for t in chunks} == {"st"}


# ----------------------------------------------------------------------------- residency


async def test_a_model_missing_on_an_endpoint_is_not_routed_there_and_one_missing_everywhere_is_model_not_found(
    bootstrap: str, logs_dir: Path, tmp_path: Path
) -> None:
    lacks, has = simulators(
        logs_dir,
        ["--models", "other", "--ttft-ms", "0", "--tokens-per-s", "0"],
        ["--models", "m", "--ttft-ms", "0", "--tokens-per-s", "0"],
    )
    config = (endpoint_toml("m", endpoint(lacks, weight=100.0), endpoint(has))
              + endpoint_toml("gone", endpoint(lacks), retries=0))
    async with nexus(bootstrap, logs_dir, tmp_path, config, [lacks, has]) as nx:
        answers = await nx.ask([nx.request(i, input=f"hi {i}") for i in range(10)])
        assert all_ok(answers), errors(answers)
        assert by_endpoint(answers) == Counter({has.url: 10})
        assert sum((await lacks.stats())["served_by_model"].values()) == 0

        [missing] = (await nx.ask([nx.request("gone", model="gone")])).values()
        assert missing.status == "error" and missing.error_kind == "model_not_found"
        assert missing.error == f"model 'gone' is not on any endpoint of 'gone': {lacks.url} has ['other']"

        async with httpx.AsyncClient() as http:
            health = (await http.get(f"{nx.web}/health", timeout=5)).json()
        assert health["missing_models"] == {"m": {lacks.url: ["other"]}, "gone": {lacks.url: ["other"]}}
        assert health["status"] == "ok"  # the worker itself is fine
        models = await nx.models()
        assert models["m"][lacks.url]["has_model"] is False and models["m"][lacks.url]["failed"] == 0
        assert models["m"][lacks.url]["circuit"] == "closed"
        assert (models["m"][has.url]["has_model"], models["m"][has.url]["loaded"]) == (True, True)
