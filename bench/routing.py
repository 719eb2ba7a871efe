"""Nexus's routing against weighted round-robin, on the same simulated endpoints.

    .venv/bin/python bench/routing.py [-n 600] [--rate 150] [--failing flaky|down]
                                      [--weights 3,2,1,3] [--bootstrap HOST:PORT]

Starts (unless --bootstrap) a local broker, then simulators of one model ``m``: ``fast``,
``medium`` and ``slow`` (time to first token 20/60/120 ms) and ``flaky`` (20 ms, 30% HTTP
500; with ``--failing down`` nothing listens at its address), each with 4 parallel slots,
and a worker configured with those four endpoints (``max_concurrency = 4``, weights
3/2/1/3 unless --weights, ``retries = 2``) on topics of its own. Three dispatchers:

- Nexus: requests produced to Kafka, answered by the worker; a latency runs from the
  request's production to its answer's arrival on the responses topic.
- router alone: the worker's ``Inference`` (routing, retries, circuits) in this process,
  no Kafka: the routing's share of the result without the pipeline's cost.
- weighted RR, the baseline: straight to the simulators with aiohttp (the worker's own HTTP
  client, so both pay the same per-call cost), nginx's smooth weighted
  round-robin with the same weights, 4 requests at once per endpoint, a failure retried on
  the next endpoint of the list, up to 2 retries. No Kafka in its path.

Each sends N requests twice: all at once (throughput; latencies include queueing) and
paced at --rate requests/s (latency under a load every dispatcher can carry).

Then the capacity case: two simulators of model ``pair``, 30 and 90 ms (one three times
faster), 4 slots each; N requests at once through Nexus and through the router alone;
throughput against the sum of their capacities, nominal (4/0.030 + 4/0.090 = 177.8/s)
and measured (each endpoint saturated alone from aiohttp: HTTP overhead included).

Everything runs on one machine (the broker, the worker, the simulators and this client
share its CPUs); the numbers are of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition

from localdev.broker import LocalKafka, free_port
from nexus.settings import KafkaSettings, load_settings
from nexus.kafka.topics import ensure_topics
from producers.client import RequestProducer
from schemas import Codec, InferenceRequest, ModelContext, decode_response
from streams.answering.cache import CacheEntry
from streams.backends.ollama import new_session
from streams.answering.inference import Inference
from streams.metrics import WorkerMetrics

REPO = Path(__file__).resolve().parent.parent
PARALLEL = 4
RETRIES = 2
WARM_UP = 20
TIMEOUT = aiohttp.ClientTimeout(total=30)


@dataclass(frozen=True)
class Endpoint:
    name: str
    ttft_ms: int
    fail_rate: float
    weight: int
    model: str = "m"
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


MIXED = [Endpoint("fast", 20, 0.0, 1), Endpoint("medium", 60, 0.0, 1), Endpoint("slow", 120, 0.0, 1),
         Endpoint("flaky", 20, 0.3, 1)]
PAIR = [Endpoint("pair-fast", 30, 0.0, 1, "pair"), Endpoint("pair-slow", 90, 0.0, 1, "pair")]


@dataclass(frozen=True)
class Outcome:
    endpoint: str | None  # name of the endpoint that answered; None: the request failed
    sent: float
    done: float


@dataclass
class Result:
    outcomes: list[Outcome]

    @property
    def latencies(self) -> list[float]:
        return sorted(o.done - o.sent for o in self.outcomes if o.endpoint)

    @property
    def elapsed(self) -> float:
        return max(o.done for o in self.outcomes) - min(o.sent for o in self.outcomes)

    @property
    def errors(self) -> int:
        return sum(1 for o in self.outcomes if not o.endpoint)

    @property
    def served(self) -> Counter[str]:
        return Counter(o.endpoint for o in self.outcomes if o.endpoint)

    def throughput(self) -> float:
        return len(self.outcomes) / self.elapsed

    def ms(self, q: float) -> float:
        values = self.latencies
        return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


async def send_time(started: float, i: int, rate: float | None) -> float:
    """Wait for request ``i``'s turn (all at once without a rate) and return when it is."""
    if rate:
        await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
    return time.perf_counter()


async def dispatch(n: int, rate: float | None, call: Callable[[int], Awaitable[str | None]]) -> Result:
    """Send n requests through ``call`` (which names the endpoint that answered, or None)."""
    started = time.perf_counter()

    async def one(i: int) -> Outcome:
        sent = await send_time(started, i, rate)
        name = await call(i)
        return Outcome(name, sent, time.perf_counter())

    return Result(list(await asyncio.gather(*(one(i) for i in range(n)))))


# ----------------------------------------------------------------------------- the baseline


class WeightedRoundRobin:
    """nginx's smooth weighted round-robin, a slot limit per endpoint, and a failed request
    moved to the next endpoint of the list. It knows nothing of speed or health."""

    def __init__(self, http: aiohttp.ClientSession, endpoints: list[Endpoint], slots: int, retries: int) -> None:
        self._http = http
        self._endpoints = endpoints
        self._slots = {e.url: asyncio.Semaphore(slots) for e in endpoints}
        self._current = {e.url: 0 for e in endpoints}
        self._retries = retries

    def _next(self) -> int:
        total = 0
        for e in self._endpoints:
            self._current[e.url] += e.weight
            total += e.weight
        best = max(range(len(self._endpoints)), key=lambda i: self._current[self._endpoints[i].url])
        self._current[self._endpoints[best].url] -= total
        return best

    async def send(self, prompt: str) -> str | None:
        """The name of the endpoint that answered, or None when every attempt failed."""
        index = self._next()
        for _ in range(self._retries + 1):
            endpoint = self._endpoints[index]
            async with self._slots[endpoint.url]:
                try:
                    async with self._http.post(f"{endpoint.url}/api/generate", timeout=TIMEOUT, json={
                            "model": endpoint.model, "prompt": prompt, "stream": False}) as reply:
                        await reply.read()
                        if reply.status == 200:
                            return endpoint.name
                except (TimeoutError, aiohttp.ClientError):
                    pass
            index = (index + 1) % len(self._endpoints)
        return None


# ----------------------------------------------------------------------------- Nexus's router, in process


class NoCache:
    def get(self, key: bytes) -> CacheEntry | None:
        return None

    async def put(self, request: InferenceRequest, key: bytes, entry: CacheEntry) -> None:
        return None


class RouterAlone:
    """The worker's Inference in this process: Nexus's routing without Kafka around it."""

    def __init__(self, http: aiohttp.ClientSession, config: Path, names: dict[str, str]) -> None:
        self.inference = Inference(load_settings(config, environ={}), http, WorkerMetrics(), NoCache())
        self.names = names

    async def send(self, model: str, prompt: str) -> str | None:
        answer = await self.inference.answer(InferenceRequest(uuid.uuid4().hex, model, prompt,
                                                              ModelContext(uuid.uuid4().hex[:8])))
        return self.names.get(answer.response.endpoint or "") if answer.response.status == "ok" else None


# ----------------------------------------------------------------------------- Nexus through Kafka


class Nexus:
    """A worker on topics of its own, the producer that feeds it and a reader of its answers."""

    def __init__(self, bootstrap: str, config: Path, names: dict[str, str]) -> None:
        run = uuid.uuid4().hex[:6]
        self.tag = run
        self.names = names
        self.kafka = KafkaSettings(
            bootstrap=bootstrap, requests_topic=f"bench-{run}.requests", responses_topic=f"bench-{run}.responses",
            dlq_topic=f"bench-{run}.dlq", tokens_topic=f"bench-{run}.tokens", state_topic=f"bench-{run}.state")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
        self.env.update(
            NEXUS_CONFIG=str(config), NEXUS_KAFKA_BOOTSTRAP=bootstrap, NEXUS_WORKER_APP_ID=f"bench-routing-{run}",
            NEXUS_WORKER_WEB_PORT=str(free_port()), NEXUS_KAFKA_REQUESTS_TOPIC=self.kafka.requests_topic,
            NEXUS_KAFKA_RESPONSES_TOPIC=self.kafka.responses_topic, NEXUS_KAFKA_DLQ_TOPIC=self.kafka.dlq_topic,
            NEXUS_KAFKA_TOKENS_TOPIC=self.kafka.tokens_topic, NEXUS_KAFKA_STATE_TOPIC=self.kafka.state_topic)
        self.codec = Codec.from_directory()
        self.worker: subprocess.Popen[bytes] | None = None
        self.consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
        self.producer = RequestProducer(self.kafka)

    async def __aenter__(self) -> Nexus:
        await ensure_topics(self.kafka)
        self.worker = role(["worker"], self.env)
        await self.consumer.start()
        await self.producer.__aenter__()
        partitions = self.consumer.partitions_for_topic(self.kafka.responses_topic)
        while not partitions:
            await self.consumer._client.force_metadata_update()
            partitions = self.consumer.partitions_for_topic(self.kafka.responses_topic)
        tps = [TopicPartition(self.kafka.responses_topic, p) for p in partitions]
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        for tp in tps:
            await self.consumer.position(tp)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.producer.__aexit__(*exc)
        await self.consumer.stop()
        if self.worker:
            self.worker.terminate()
            self.worker.wait()

    async def run(self, model: str, n: int, rate: float | None, timeout: float = 120.0) -> Result:
        """Produce n requests (at once, or paced) while reading their answers."""
        requests = [InferenceRequest(f"{self.tag}-{uuid.uuid4().hex[:10]}", model, f"question {i}",
                                     ModelContext(f"s-{i}")) for i in range(n)]
        sent: dict[str, float] = {}
        started = time.perf_counter()

        async def produce() -> None:
            async def one(i: int, request: InferenceRequest) -> None:
                sent[request.id] = await send_time(started, i, rate)
                await self.producer.submit(request)
            await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))

        producing = asyncio.ensure_future(produce())
        done: dict[str, tuple[float, str | None]] = {}
        try:
            while len(done) < n:
                if time.perf_counter() > started + timeout:
                    raise TimeoutError(f"{n - len(done)} of {n} requests unanswered")
                for records in (await self.consumer.getmany(timeout_ms=200)).values():
                    now = time.perf_counter()
                    for record in records:
                        response = decode_response(self.codec, record.value)
                        if response.id in sent and response.id not in done:
                            ok = response.status == "ok"
                            done[response.id] = (now, self.names.get(response.endpoint or "") if ok else None)
        finally:
            await producing
        return Result([Outcome(name, sent[rid], at) for rid, (at, name) in done.items()])


# ----------------------------------------------------------------------------- capacity


async def saturate(http: aiohttp.ClientSession, endpoint: Endpoint, n: int) -> float:
    """Requests/s the endpoint serves with its slots always full (no Kafka, no router)."""
    async def lanes() -> None:
        left = list(range(n))

        async def lane() -> None:
            while left:
                i = left.pop()
                async with http.post(f"{endpoint.url}/api/generate", timeout=TIMEOUT, raise_for_status=True,
                                     json={"model": endpoint.model, "prompt": f"cap {i}", "stream": False}) as reply:
                    await reply.read()

        await asyncio.gather(*(lane() for _ in range(PARALLEL)))

    await lanes()  # warm connections
    started = time.perf_counter()
    await lanes()
    return n / (time.perf_counter() - started)


# ----------------------------------------------------------------------------- running it


def role(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "nexus", *args], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def wait_http(url: str) -> None:
    async with httpx.AsyncClient() as http:
        for _ in range(600):
            try:
                await http.get(url, timeout=1)
                return
            except httpx.HTTPError:
                await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} never answered")


def config_toml(groups: dict[str, list[Endpoint]]) -> str:
    out = []
    for model, endpoints in groups.items():
        tables = ", ".join(f'{{ url = "{e.url}", weight = {e.weight}, max_concurrency = {PARALLEL} }}'
                           for e in endpoints)
        out.append(f'[models."{model}"]\nendpoints = [{tables}]\nretries = {RETRIES}\ntimeout_s = 30\n')
    return "\n".join(out)


@dataclass
class Runs:
    burst: dict[str, Result]
    paced: dict[str, Result]
    pair: dict[str, Result]
    measured: list[float]


async def run(bootstrap: str, n: int, rate: float, failing: str, weights: list[int]) -> tuple[list[Endpoint], Runs]:
    mixed = [Endpoint("down" if failing == "down" and e.fail_rate else e.name, e.ttft_ms, e.fail_rate, w, e.model,
                      free_port()) for e, w in zip(MIXED, weights)]
    pair = [Endpoint(e.name, e.ttft_ms, e.fail_rate, e.weight, e.model, free_port()) for e in PAIR]
    running = [e for e in mixed + pair if e.name != "down"]
    sims = [role(["simulate-ollama", "--port", str(e.port), "--models", e.model, "--ttft-ms", str(e.ttft_ms),
                  "--tokens-per-s", "0", "--parallel", str(PARALLEL), "--fail-rate", str(e.fail_rate)],
                 dict(os.environ)) for e in running]
    names = {e.url: e.name for e in mixed + pair}
    runs = Runs({}, {}, {}, [])
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "nexus.toml"
        config.write_text(config_toml({"m": mixed, "pair": pair}))
        try:
            for e in running:
                await wait_http(e.url)
            async with Nexus(bootstrap, config, names) as nexus, new_session() as http, new_session() as worker_http:
                await nexus.run("no-such-model", 1, None, timeout=90)  # the worker joined its group
                alone = RouterAlone(worker_http, config, names)  # the worker's own HTTP client
                wrr = WeightedRoundRobin(http, mixed, PARALLEL, RETRIES)
                dispatchers: dict[str, Callable[[int, float | None], Awaitable[Result]]] = {
                    "Nexus (Kafka)": lambda k, r: nexus.run("m", k, r),
                    "router alone": lambda k, r: dispatch(k, r, lambda i: alone.send("m", f"question {i}")),
                    "weighted RR": lambda k, r: dispatch(k, r, lambda i: wrr.send(f"question {i}")),
                }
                for name, go in dispatchers.items():
                    await go(WARM_UP, None)
                    runs.burst[name] = await go(n, None)
                    runs.paced[name] = await go(n, rate)
                await nexus.run("pair", WARM_UP, None)
                runs.pair["Nexus (Kafka)"] = await nexus.run("pair", n, None)
                await dispatch(WARM_UP, None, lambda i: alone.send("pair", f"warm-up {i}"))
                runs.pair["router alone"] = await dispatch(n, None, lambda i: alone.send("pair", f"question {i}"))
                await alone.inference.aclose()
                runs.measured = [await saturate(http, e, max(60, n * 30 // e.ttft_ms // 2)) for e in pair]
        finally:
            for sim in sims:
                sim.terminate()
            for sim in sims:
                sim.wait()
    return mixed, runs


def table(mixed: list[Endpoint], results: dict[str, Result], throughput: bool) -> None:
    names = list(results)
    nexus, alone, wrr = (results[k] for k in names)
    print(f"{'':20}" + "".join(f"{k:>15}" for k in names) + f"{'Nexus/RR':>10}{'router/RR':>10}")
    rows = [("p50 latency ms", lambda r: r.ms(0.50), "{:15.0f}"), ("p99 latency ms", lambda r: r.ms(0.99), "{:15.0f}")]
    if throughput:
        rows.insert(0, ("throughput req/s", Result.throughput, "{:15.1f}"))
    for label, value, fmt in rows:
        a, b, c = value(nexus), value(alone), value(wrr)
        print(f"{label:20}{fmt.format(a)}{fmt.format(b)}{fmt.format(c)}{a / c:10.2f}{b / c:10.2f}")
    print(f"{'errors':20}" + "".join(f"{results[k].errors:15d}" for k in names))
    for e in mixed:
        print(f"{'served by ' + e.name:20}" + "".join(f"{results[k].served[e.name]:15d}" for k in names))


def report(n: int, rate: float, mixed: list[Endpoint], runs: Runs) -> None:
    described = ", ".join(
        f"{e.name} w{e.weight}" if e.name == "down" else
        f"{e.name} {e.ttft_ms} ms w{e.weight}" + (f" {e.fail_rate:.0%} HTTP 500" if e.fail_rate else "") for e in mixed)
    print(f"model m: {len(mixed)} endpoints x {PARALLEL} slots: {described}; retries {RETRIES}")
    print(f"\n{n} requests at once")
    table(mixed, runs.burst, throughput=True)
    print(f"\n{n} requests paced at {rate:g}/s")
    table(mixed, runs.paced, throughput=False)
    nominal = sum(PARALLEL / (e.ttft_ms / 1000) for e in PAIR)
    measured = sum(runs.measured)
    print(f"\ntwo endpoints, one 3x faster ({PAIR[0].ttft_ms} vs {PAIR[1].ttft_ms} ms, {PARALLEL} slots each), "
          f"{n} requests at once")
    print(f"summed capacity: nominal {nominal:.1f} req/s; measured "
          f"{' + '.join(f'{m:.1f}' for m in runs.measured)} = {measured:.1f} req/s")
    for name, result in runs.pair.items():
        fast = result.served["pair-fast"]
        print(f"{name:14} {result.throughput():6.1f} req/s = {result.throughput() / measured:.1%} of measured, "
              f"{result.throughput() / nominal:.1%} of nominal (target >= 90%); fast served {fast / n:.0%} "
              f"(its capacity share {runs.measured[0] / measured:.0%}); p50 {result.ms(0.5):.0f} ms, "
              f"p99 {result.ms(0.99):.0f} ms, errors {result.errors}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=600)
    parser.add_argument("--rate", type=float, default=150.0, help="requests/s of the paced runs (default %(default)s)")
    parser.add_argument("--failing", choices=["flaky", "down"], default="flaky",
                        help="the fourth endpoint answers 30%% of requests with HTTP 500, or is down")
    parser.add_argument("--weights", default="3,2,1,3",
                        help="of fast, medium, slow, failing, for Nexus and the round-robin (default %(default)s)")
    parser.add_argument("--bootstrap")
    args = parser.parse_args()
    weights = [int(w) for w in args.weights.split(",")]
    if len(weights) != len(MIXED) or min(weights) < 1:
        parser.error(f"--weights needs {len(MIXED)} positive integers")

    def go(bootstrap: str) -> None:
        mixed, runs = asyncio.run(run(bootstrap, args.n, args.rate, args.failing, weights))
        report(args.n, args.rate, mixed, runs)

    if args.bootstrap:
        go(args.bootstrap)
        return
    with tempfile.TemporaryDirectory() as data, LocalKafka(port=free_port(), data_dir=Path(data)) as kafka:
        go(kafka.bootstrap)


if __name__ == "__main__":
    main()
