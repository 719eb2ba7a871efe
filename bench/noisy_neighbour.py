"""Noisy neighbour: one tenant floods batch work, another sends interactive requests; who waits?

    .venv/bin/python bench/noisy_neighbour.py [--flood 2000] [--rate 2] [--parallel 4] [--quick] [--bootstrap HOST:PORT]

Starts (unless --bootstrap) a local broker, a simulator at a fixed capacity (--parallel slots,
--ttft-ms, --tokens-per-s; the worker's endpoint holds --parallel calls at once, so work waits in
the worker's schedule, not in the model server) and one worker on topics of its own. Requests go in
through the producer API; answers are read from the responses topic. Four runs, one after another,
each once the previous one is answered:

1. **A alone**: tenant A submits --flood batch requests at once: A's throughput alone.
2. **B alone**: tenant B sends interactive requests at --rate per second on the idle system.
3. **scheduled**: A's flood, then B's requests at --rate while A's flood waits: B's latency, A's
   throughput.
4. **first in, first out**: the same, but A's flood and B's requests are all interactive requests of
   one tenant, so the schedule degenerates to arrival order (today's behaviour without classes).

B sends as many requests as fit in 80% of the time A's flood took alone, so all of them meet a
backlog. Latency is the client's: from ``submit`` to the answer read from the responses topic.
Throughput is A's requests over the time from its first submit to its last answer.

Also checked: every request answered exactly once (responses counted per id), and the queue
reports' estimates: for each request seen waiting in a report on ``nexus.queue``, its estimated
start (``report.at + eta_s``) against its actual start, i.e. when its model call began on the
worker (``completed_at - backend_latency_ms``: the response's end minus the call's own duration;
``created_at + queue_ms`` is not used, as ``queue_ms`` counts from when the worker read the
request, not from ``created_at``). The error is relative to the wait that was left
(actual start - report time, at least 0.1 s); the first report listing each request is used,
so a request counts once whatever its wait.

Targets (issue 15): B's p99 in the scheduled run within 2x its idle p99 while A keeps at least 90%
of its throughput; every request answered exactly once; ETA within 25% at p50. ``--quick`` (a
300-request flood) runs in about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer

from common import REPO, cpu_seconds, percentile, role, run_on_broker, stop_all, wait_http
from localdev.broker import free_port
from nexus.kafka.clients import client_options
from nexus.kafka.readers import read_from_end
from nexus.kafka.topics import ensure_topics
from nexus.settings import KafkaSettings
from producers.client import RequestProducer
from schemas import Codec, InferenceRequest, InferenceResponse, ModelContext, QueueReport, SchemaError, decode_response

MODEL = "m"
TOPICS = ("requests", "batch_requests", "cancels", "responses", "dlq", "tokens", "state", "queue")
ETA_FLOOR_S = 0.1  # relative ETA errors are taken against at least this much remaining wait


@dataclass
class Seen:
    """Answers (with the monotonic time each was read) and queue reports, as they come."""

    answers: dict[str, list[tuple[float, InferenceResponse]]] = field(default_factory=lambda: defaultdict(list))
    read_wall: dict[str, float] = field(default_factory=dict)  # id -> time.time() its first answer was read
    first_report: dict[str, tuple[float, float]] = field(default_factory=dict)  # id -> (report at, eta at)
    reports: int = 0


class Follower:
    """Reads the responses and queue topics from their ends, in the background."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self.kafka = kafka
        self.codec = Codec.from_directory()
        self.seen = Seen()
        self._consumer = AIOKafkaConsumer(**client_options(kafka), enable_auto_commit=False, group_id=None,
                                          max_partition_fetch_bytes=8 * 1024 * 1024)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        await read_from_end(self._consumer, [self.kafka.responses_topic, self.kafka.queue_topic], timeout_s=30)
        self._task = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()

    async def _follow(self) -> None:
        seen = self.seen
        while True:
            batches = await self._consumer.getmany(timeout_ms=100)
            now, wall = time.perf_counter(), time.time()
            for tp, records in batches.items():
                for record in records:
                    if tp.topic == self.kafka.responses_topic:
                        response = decode_response(self.codec, record.value)
                        seen.answers[response.id].append((now, response))
                        seen.read_wall.setdefault(response.id, wall)
                    elif record.value:
                        try:
                            report = QueueReport.from_bytes(record.value)
                        except SchemaError:
                            continue
                        seen.reports += 1
                        for entry in report.waiting:
                            if entry["id"] not in seen.first_report and entry.get("eta_s") is not None:
                                seen.first_report[entry["id"]] = (report.at, report.at + entry["eta_s"])

    async def caught_up(self) -> None:
        """Return once every answer written so far is read (late duplicates included)."""
        tps = list(self._consumer.assignment())
        ends = await self._consumer.end_offsets(tps)
        while True:
            positions = [await self._consumer.position(tp) for tp in tps]
            if all(p >= ends[tp] for p, tp in zip(positions, tps)):
                return
            await asyncio.sleep(0.05)

    async def answered(self, ids: list[str], stall_s: float) -> None:
        """Return once every one of ``ids`` is answered; raise if no new answer came for ``stall_s``."""
        done, progress = 0, time.perf_counter()
        while done < len(ids):
            now_done = sum(1 for i in ids if self.seen.answers.get(i))
            if now_done > done:
                done, progress = now_done, time.perf_counter()
            elif time.perf_counter() - progress > stall_s:
                missing = [i for i in ids if not self.seen.answers.get(i)]
                raise TimeoutError(f"{len(missing)} of {len(ids)} requests unanswered, none answered for "
                                   f"{stall_s:.0f}s (e.g. {missing[:3]})")
            await asyncio.sleep(0.05)


@dataclass
class Run:
    name: str
    a_ids: list[str] = field(default_factory=list)
    b_ids: list[str] = field(default_factory=list)
    b_sent: dict[str, float] = field(default_factory=dict)
    a_started: float = 0.0
    worker_cpu_s: float = 0.0  # the worker's CPU seconds over the run

    def b_latencies(self, seen: Seen) -> list[float]:
        return [seen.answers[i][0][0] - self.b_sent[i] for i in self.b_ids]

    def a_throughput(self, seen: Seen) -> float:
        last = max(seen.answers[i][0][0] for i in self.a_ids)
        return len(self.a_ids) / (last - self.a_started)


class Bench:
    def __init__(self, producer: RequestProducer, follower: Follower, run_id: str, worker_pid: int) -> None:
        self.producer = producer
        self.follower = follower
        self.run_id = run_id
        self.worker_pid = worker_pid
        self._cpu_at_start = 0.0

    def begin(self, run: Run) -> Run:
        self._cpu_at_start = cpu_seconds(self.worker_pid)
        return run

    def request(self, run: str, who: str, n: int, tenant: str, priority: str) -> InferenceRequest:
        request_id = f"{self.run_id}-{run}-{who}-{n}"
        return InferenceRequest(request_id, MODEL, f"{request_id} a question of some words", ModelContext(
            f"{who}-session-{n % 8}"), priority=priority, tenant=tenant)

    async def flood(self, run: Run, n: int, tenant: str, priority: str) -> None:
        requests = [self.request(run.name, "a", i, tenant, priority) for i in range(n)]
        run.a_ids = [r.id for r in requests]
        run.a_started = time.perf_counter()
        for i in range(0, n, 200):  # in slices: B's sender is not starved by one huge gather
            await self.producer.submit_many(requests[i:i + 200])

    async def steady(self, run: Run, n: int, rate: float, tenant: str, priority: str) -> None:
        start = time.perf_counter()
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            request = self.request(run.name, "b", i, tenant, priority)
            run.b_ids.append(request.id)
            run.b_sent[request.id] = time.perf_counter()
            await self.producer.submit(request)

    async def finish(self, run: Run, timeout_s: float) -> None:
        await self.follower.answered(run.a_ids + run.b_ids, timeout_s)
        await self.follower.caught_up()
        run.worker_cpu_s = cpu_seconds(self.worker_pid) - self._cpu_at_start


def eta_errors(seen: Seen, ids: list[str], signed: bool = False) -> list[float]:
    """Per request seen waiting: (estimated start - actual start) / the wait that was left; its
    absolute value unless ``signed`` (negative: the estimate was too early)."""
    out = []
    for i in ids:
        if i not in seen.first_report:
            continue
        at, predicted = seen.first_report[i]
        response = seen.answers[i][0][1]
        actual = response.completed_at.timestamp() - response.backend_latency_ms / 1000
        error = (predicted - actual) / max(actual - at, ETA_FLOOR_S)
        out.append(error if signed else abs(error))
    return out


def write_config(directory: Path, sim_url: str, parallel: int) -> Path:
    path = directory / "nexus.toml"
    path.write_text(f'[models."{MODEL}"]\nendpoints = [{{ url = "{sim_url}", max_concurrency = {parallel} }}]\n')
    return path


async def measure(bootstrap: str, args: argparse.Namespace) -> None:
    run_id = uuid.uuid4().hex[:6]
    sim_port = free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    topics = {name: f"noisy{run_id}.{name}" for name in TOPICS}
    kafka = KafkaSettings(bootstrap=bootstrap, **{f"{name}_topic": topic for name, topic in topics.items()})
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("NEXUS_") or k.startswith("NEXUS_WORKER_") or k == "NEXUS_HOME"}
    workdir = Path(tempfile.mkdtemp(prefix="noisy-"))
    env.update(NEXUS_KAFKA_BOOTSTRAP=bootstrap, NEXUS_CONFIG=str(write_config(workdir, sim_url, args.parallel)),
               NEXUS_WORKER_WEB_PORT=str(free_port()), NEXUS_WORKER_APP_ID=f"noisy-{run_id}",
               **{f"NEXUS_KAFKA_{name.upper()}_TOPIC": topic for name, topic in topics.items()})
    procs = [role(["simulate-ollama", "--port", str(sim_port), "--models", MODEL, "--parallel", str(args.parallel),
                   "--ttft-ms", str(args.ttft_ms), "--tokens-per-s", str(args.tokens_per_s), "--record-bodies", "0"],
                  env)]
    await ensure_topics(kafka)
    follower = Follower(kafka)
    try:
        await wait_http(f"{sim_url}/")
        if args.profile is None:
            worker = role(["worker"], env)
        else:  # stopped with SIGINT below, so cProfile writes its statistics
            worker = subprocess.Popen(
                [sys.executable, "-m", "cProfile", "-o", str(args.profile), "-m", "nexus", "worker"],
                env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(worker)
        await follower.start()
        async with RequestProducer(kafka) as producer:
            bench = Bench(producer, follower, run_id, worker.pid)
            warm = [bench.request("warm", "w", i, "warm", "interactive") for i in range(20)]
            await producer.submit(warm[0])
            await follower.answered([warm[0].id], 120)  # the worker owns its partitions
            await producer.submit_many(warm[1:])  # and has measured its endpoint
            await follower.answered([w.id for w in warm], 60)
            runs = await scenarios(bench, args)
        if args.profile is not None:
            worker.send_signal(signal.SIGINT)
            worker.wait(timeout=60)
    finally:
        await follower.stop()
        stop_all(procs)
    report(follower.seen, runs, args)


async def scenarios(bench: Bench, args: argparse.Namespace) -> dict[str, Run]:
    timeout = 60.0  # seconds without any new answer before a run is declared stuck
    a_alone = bench.begin(Run("a-alone"))
    await bench.flood(a_alone, args.flood, "tenant-a", "batch")
    await bench.finish(a_alone, timeout)
    a_seconds = args.flood / a_alone.a_throughput(bench.follower.seen)
    b_count = max(5, int(args.rate * 0.8 * a_seconds))
    print(f"A alone: {args.flood} requests in {a_seconds:.1f}s; B sends {b_count} at {args.rate:g}/s", flush=True)

    b_alone = bench.begin(Run("b-alone"))
    await bench.steady(b_alone, b_count, args.rate, "tenant-b", "interactive")
    await bench.finish(b_alone, timeout)
    print("B alone: done", flush=True)

    scheduled = bench.begin(Run("scheduled"))
    await bench.flood(scheduled, args.flood, "tenant-a", "batch")
    await bench.steady(scheduled, b_count, args.rate, "tenant-b", "interactive")
    await bench.finish(scheduled, timeout)
    print("scheduled: done", flush=True)

    fifo = bench.begin(Run("fifo"))
    await bench.flood(fifo, args.flood, "everyone", "interactive")
    await bench.steady(fifo, b_count, args.rate, "everyone", "interactive")
    await bench.finish(fifo, timeout)
    print("first in, first out: done", flush=True)
    return {r.name: r for r in (a_alone, b_alone, scheduled, fifo)}


def report(seen: Seen, runs: dict[str, Run], args: argparse.Namespace) -> None:
    def ms(values: list[float], q: float) -> float:
        return percentile(values, q) * 1000

    capacity = args.parallel / (args.ttft_ms / 1000 + 10 / args.tokens_per_s) if args.tokens_per_s else 0
    print(f"\nsimulator: {args.parallel} slots, ttft {args.ttft_ms:g} ms, {args.tokens_per_s:g} tok/s "
          f"(~11-token answers: ~{capacity:.0f} calls/s); A floods {args.flood} batch, "
          f"B sends {len(runs['b-alone'].b_ids)} interactive at {args.rate:g}/s")
    print(f"{'run':30}{'B p50 ms':>10}{'B p99 ms':>10}{'B max ms':>10}{'A req/s':>10}{'worker CPU ms/req':>19}")
    rows = {}
    for key, label in (("b-alone", "B alone (idle)"), ("a-alone", "A alone"),
                       ("scheduled", "A flood + B, scheduled"), ("fifo", "A flood + B, first in first out")):
        run = runs[key]
        b = run.b_latencies(seen) if run.b_ids else []
        a = run.a_throughput(seen) if run.a_ids else float("nan")
        rows[key] = (b, a)
        b_cells = f"{ms(b, .5):10.0f}{ms(b, .99):10.0f}{max(b) * 1000:10.0f}" if b else f"{'':30}"
        a_cell = f"{a:10.1f}" if run.a_ids else f"{'':10}"
        cpu = run.worker_cpu_s * 1000 / (len(run.a_ids) + len(run.b_ids))
        print(f"{label:30}{b_cells}{a_cell}{cpu:19.2f}")
    print("\nwhere B's time goes, p50 / p99 ms: before its turn (Kafka, read, decode), waiting its turn, "
          "the model call, after (response to Kafka and read back)")
    print(f"{'':24}{'before':>14}{'turn':>14}{'call':>14}{'after':>14}")
    for key in ("b-alone", "scheduled", "fifo"):
        answers = [seen.answers[i][0][1] for i in runs[key].b_ids]
        parts = [[(a.latency_ms - a.queue_ms - a.backend_latency_ms) / 1000 for a in answers],
                 [a.queue_ms / 1000 for a in answers], [a.backend_latency_ms / 1000 for a in answers],
                 [seen.read_wall[a.id] - a.completed_at.timestamp() for a in answers]]
        cells = "".join(f"{f'{ms(v, .5):.0f} / {ms(v, .99):.0f}':>14}" for v in parts)
        print(f"{key:24}{cells}")
    if args.verbose:
        for key in ("b-alone", "scheduled"):
            run = runs[key]
            print(f"{key}, each B request: sent at s, latency ms (before / turn / call / after)")
            for i in run.b_ids:
                a = seen.answers[i][0][1]
                after = round((seen.read_wall[i] - a.completed_at.timestamp()) * 1000)
                print(f"  {run.b_sent[i] - run.b_sent[run.b_ids[0]]:6.2f}  {(seen.answers[i][0][0] - run.b_sent[i]) * 1000:6.0f}"
                      f"  ({a.latency_ms - a.queue_ms - a.backend_latency_ms} / {a.queue_ms} / {a.backend_latency_ms}"
                      f" / {after})")
    idle_p99 = percentile(rows["b-alone"][0], .99)
    sched_p99 = percentile(rows["scheduled"][0], .99)
    fifo_p99 = percentile(rows["fifo"][0], .99)
    kept = rows["scheduled"][1] / rows["a-alone"][1]
    print(f"\nB p99, scheduled / idle: {sched_p99 / idle_p99:.2f} (target <= 2)   "
          f"first in first out / idle: {fifo_p99 / idle_p99:.1f}")
    print(f"A throughput, scheduled / alone: {kept:.2f} (target >= 0.90)   "
          f"first in first out / alone: {rows['fifo'][1] / rows['a-alone'][1]:.2f}")

    ids = [i for run in runs.values() for i in run.a_ids + run.b_ids]
    counts = [len(seen.answers.get(i, ())) for i in ids]
    not_ok = sum(1 for i in ids if seen.answers.get(i) and seen.answers[i][0][1].status != "ok")
    print(f"exactly once: {len(ids)} requests, {sum(1 for c in counts if c == 0)} unanswered, "
          f"{sum(1 for c in counts if c > 1)} answered more than once, {not_ok} not ok")

    print(f"\nETA (first report listing each request; error relative to the wait left, >= {ETA_FLOOR_S:g} s; "
          f"{seen.reports} reports):")
    print(f"{'requests':36}{'seen':>8}{'p50 err':>10}{'p90 err':>10}{'mean':>8}{'p50 signed':>12}")
    for key, who in (("scheduled", "a"), ("scheduled", "b"), ("a-alone", "a"), ("fifo", "a"), ("fifo", "b")):
        run = runs[key]
        ids = run.a_ids if who == "a" else run.b_ids
        errors = eta_errors(seen, ids)
        label = f"{key} {'A' if who == 'a' else 'B'}"
        if errors:
            print(f"{label:36}{len(errors):8}{percentile(errors, .5):10.0%}{percentile(errors, .9):10.0%}"
                  f"{statistics.mean(errors):8.0%}{percentile(eta_errors(seen, ids, signed=True), .5):12.0%}")
        else:
            print(f"{label:36}{0:8}  (never seen waiting in a report)")
    all_scheduled = eta_errors(seen, runs["scheduled"].a_ids + runs["scheduled"].b_ids)
    if all_scheduled:
        print(f"ETA p50 relative error, scheduled run: {percentile(all_scheduled, .5):.0%} (target <= 25%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flood", type=int, default=2000, help="A's batch requests")
    parser.add_argument("--rate", type=float, default=2.0, help="B's interactive requests per second")
    parser.add_argument("--parallel", type=int, default=4, help="the simulator's slots (the model's capacity)")
    parser.add_argument("--ttft-ms", type=float, default=50)
    parser.add_argument("--tokens-per-s", type=float, default=200)
    parser.add_argument("--quick", action="store_true", help="a 300-request flood: about a minute")
    parser.add_argument("--verbose", action="store_true", help="also list each B request's latency and its parts")
    parser.add_argument("--profile", type=Path, help="run the worker under cProfile, its statistics to this file "
                        "(read them with: python -m pstats FILE)")
    parser.add_argument("--bootstrap", help="an existing cluster (default: a local broker started for the run)")
    args = parser.parse_args()
    if args.quick:
        args.flood = min(args.flood, 300)
    run_on_broker(lambda bootstrap: measure(bootstrap, args), args.bootstrap)


if __name__ == "__main__":
    main()
