"""Exactly once on a real broker, SIGKILLs included: Nexus's option, and Faust's alone.

    .venv/bin/python bench/exactly_once_probe.py [--guarantee exactly_once|at_least_once]
        [--faust-only [--route-into-transactions]] [-n 160] [--kills 3] [--partitions 2]
        [--models llama3.1,mistral] [--ttft-ms 150] [--slow-ms MS] [--slots 4] [--one-by-one K]
        [--cache-check] [--bootstrap HOST:PORT] [--logs DIR]

Runs the shipped worker with ``NEXUS_KAFKA_PROCESSING_GUARANTEE=<guarantee>``. ``--faust-only``
runs it at least once with the Faust app's ``processing_guarantee`` set to ``exactly_once`` (what
Faust does alone); ``--route-into-transactions`` then also patches Faust's
``TransactionManager.send`` so that records to topics the worker does not consume (responses,
tokens, dead letters, endpoint state) join the transaction of their destination partition, the
rule Faust applies to the topics it consumes (without it they go outside any transaction).

Starts (unless --bootstrap) a local broker, a simulator (``--ttft-ms``; with ``--slow-ms`` a
second one for llama3.1, so answers finish out of offset order) and the worker on topics of its
own, submits N requests, SIGKILLs the worker ``--kills`` times once 20/45/70 % of them are
answered (as a read_uncommitted reader sees it) and restarts it. Two readers with no group read
the responses from the end offsets before the submit, one ``read_committed``, one
``read_uncommitted``; for each it prints the requests answered, the duplicates and the records,
then the worker logs' warnings. With ``--kills 0`` it times the run from a warm worker instead:
when each model's answers reach the read_committed reader, requests/s and worker CPU, and with
``--one-by-one K`` first K requests asked one at a time. ``--cache-check`` asks one
temperature-0 request, SIGKILLs the worker, asks it again and prints whether the answer came from
the cache table the successor recovered. It reports; it never asserts (tests/integration/test_faults.py does).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

from aiokafka import AIOKafkaConsumer

from common import REPO, cpu_seconds, isolated_env, percentile, run_on_broker, stop_all, wait_http
from localdev.broker import free_port
from nexus.kafka.readers import read_from_end
from nexus.kafka.topics import ensure_topics
from producers.client import RequestProducer
from schemas import Codec, InferenceOptions, InferenceRequest, ModelContext, decode_response

CODEC = Codec.from_directory()
LOG_MARKERS = ("ERROR", "Crashed", "Traceback", "Error", "failed", "retrying", "fenced", "WARNING")


class Reader:
    """Every response record from the end offsets at start, at one isolation level."""

    def __init__(self, bootstrap: str, topic: str, isolation_level: str) -> None:
        self.isolation_level = isolation_level
        self.topic = topic
        self.consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                         isolation_level=isolation_level)
        self.ids: Counter[str] = Counter()
        self.first_seen: dict[str, float] = {}  # time.monotonic() when each id was first read

    async def start(self) -> None:
        await self.consumer.start()
        await read_from_end(self.consumer, [self.topic], timeout_s=30)

    async def poll(self) -> None:
        for records in (await self.consumer.getmany(timeout_ms=200)).values():
            for record in records:
                id_ = decode_response(CODEC, record.value).id
                self.ids[id_] += 1
                self.first_seen.setdefault(id_, time.monotonic())

    def answered(self, wanted: set[str]) -> int:
        return len(wanted & set(self.ids))

    def duplicates(self, wanted: set[str]) -> int:
        return sum(n - 1 for i, n in self.ids.items() if i in wanted)


def run_worker(faust_only: bool, route: bool) -> None:
    """``nexus worker``; with ``faust_only``, Faust's exactly_once under the at-least-once worker."""
    import streams.app
    from nexus.cli import main as nexus_main

    create = streams.app.create_app

    def create_app(settings, data_dir=None):  # type: ignore[no-untyped-def]
        app = create(settings, data_dir)
        if faust_only:
            app.conf.processing_guarantee = "exactly_once"
        print(f"probe: Faust processing_guarantee={app.conf.processing_guarantee.value}", flush=True)
        return app

    streams.app.create_app = create_app
    if route:
        _route_every_send_into_a_transaction()
    sys.exit(nexus_main(["worker"]))


def _route_every_send_into_a_transaction() -> None:
    """Faust's rule for consumed topics, applied to all: the transaction of the destination partition.

    Faust's ``TransactionManager.send`` asks the consumer for the destination partition; for a
    topic the worker does not consume the consumer has no metadata, the answer is None and the
    record goes to the plain, non-transactional producer (faust/transport/consumer.py).
    """
    from aiokafka.partitioner import DefaultPartitioner
    from faust.transport.consumer import TransactionManager

    partitioner = DefaultPartitioner()
    original = TransactionManager.send

    async def send(  # type: ignore[no-untyped-def]
        self, topic, key, value, partition, timestamp, headers, *, transactional_id=None
    ):
        if self.consumer.key_partition(topic, key, partition) is not None:
            return await original(self, topic, key, value, partition, timestamp, headers)
        client = self.producer._ensure_producer().client
        partitions = sorted(await client._wait_on_metadata(topic))
        p = partition if partition is not None else partitioner(key, partitions, partitions)
        group = self.app.assignor.group_for_topic(os.environ["NEXUS_KAFKA_REQUESTS_TOPIC"])
        tid = f"{self.app.conf.id}-{group}-{p}"
        return await self.producer.send(topic, key, value, p, timestamp, headers, transactional_id=tid)

    TransactionManager.send = send  # type: ignore[method-assign]


def start_worker(
    env: dict[str, str], logs: Path, n: int, scenario: Scenario
) -> tuple[subprocess.Popen[bytes], Path]:
    """This file with --run-worker, its output in ``logs``: a worker that can be SIGKILLed."""
    path = logs / f"worker-{n}.log"
    args = [sys.executable, __file__, "--run-worker"]
    args += ["--faust-only"] if scenario.faust_only else []
    args += ["--route-into-transactions"] if scenario.route else []
    env = {**env, "NEXUS_KAFKA_PROCESSING_GUARANTEE": scenario.guarantee}
    with open(path, "wb") as log:
        proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    return proc, path


@dataclasses.dataclass(frozen=True)
class Scenario:
    guarantee: str  # Nexus's kafka.processing_guarantee
    faust_only: bool  # Faust's exactly_once under Nexus's at-least-once worker
    route: bool
    n: int
    kills: int
    partitions: int
    models: tuple[str, ...]
    slow_ms: int  # llama3.1's time to first token on a simulator of its own; 0: same as the others
    ttft_ms: int
    slots: int  # max_concurrency of each model's endpoint
    one_by_one: int  # with no kills: requests asked alone first, each after the previous one's answer

    def describe(self) -> str:
        if self.faust_only:
            routed = ", every send routed into a transaction" if self.route else ""
            return f"Faust's exactly_once alone (Nexus at_least_once){routed}"
        return f"kafka.processing_guarantee={self.guarantee}"


async def probe(bootstrap: str, scenario: Scenario, timeout: float, logs: Path) -> None:
    n, kills = scenario.n, scenario.kills
    procs: list[subprocess.Popen[bytes]] = []

    def simulator(ttft_ms: int) -> str:
        port = free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "nexus", "simulate-ollama", "--port", str(port), "--ttft-ms", str(ttft_ms),
             "--tokens-per-s", "0", "--parallel", "64", "--max-queue", "100000"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return f"http://127.0.0.1:{port}"

    sim_url = simulator(scenario.ttft_ms)
    slow_url = simulator(scenario.slow_ms) if scenario.slow_ms else sim_url
    config = logs / "nexus.toml"
    config.write_text("".join(
        f'[models."{model}"]\nendpoints = [{{ url = "{url}", max_concurrency = {scenario.slots} }}]\n'
        for model, url in (("llama3.1", slow_url), ("mistral", sim_url))))
    env, kafka = isolated_env(bootstrap, sim_url, config)
    env.update(NEXUS_KAFKA_PARTITIONS=str(scenario.partitions),
               NEXUS_KAFKA_SESSION_TIMEOUT_MS="6000", PYTHONUNBUFFERED="1")
    kafka = dataclasses.replace(kafka, partitions=scenario.partitions)
    await ensure_topics(kafka)
    readers = [Reader(bootstrap, kafka.responses_topic, level)
               for level in ("read_committed", "read_uncommitted")]
    committed, uncommitted = readers
    run = uuid.uuid4().hex[:8]
    models = scenario.models
    requests = [InferenceRequest(f"{run}-{i}", models[i % len(models)], f"q{i}", ModelContext(f"s{i % 5}"))
                for i in range(n)]
    wanted = {r.id for r in requests}
    log_paths: list[Path] = []
    events: list[str] = []
    one_by_one: list[tuple[str, float]] = []
    try:
        for url in {sim_url, slow_url}:
            await wait_http(f"{url}/")
        for reader in readers:
            await reader.start()
        worker, path = start_worker(env, logs, 0, scenario)
        procs.append(worker)
        log_paths.append(path)

        async def poll_until(done, seconds: float) -> bool:  # type: ignore[no-untyped-def]
            deadline = time.monotonic() + seconds
            while not done():
                if time.monotonic() > deadline:
                    return False
                await asyncio.gather(*(r.poll() for r in readers))
            return True

        async with RequestProducer(kafka) as producer:
            if not kills:  # time from a warm worker: one answer seen first
                warm = InferenceRequest(f"{run}-warm", models[0], "warm up", ModelContext("w"))
                await producer.submit(warm)
                await poll_until(lambda: warm.id in committed.ids, timeout)
                for i in range(scenario.one_by_one):  # alone in the pipeline: no answer waits for another
                    alone = InferenceRequest(f"{run}-alone-{i}", models[i % len(models)], f"a{i}", ModelContext("a"))
                    asked = time.monotonic()
                    await producer.submit(alone)
                    await poll_until(lambda: alone.id in committed.ids, timeout)  # noqa: B023 (awaited here)
                    one_by_one.append((alone.model_id, committed.first_seen[alone.id] - asked))
            started = time.monotonic()
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited with code {worker.returncode}; see {path}")
            cpu = cpu_seconds(worker.pid)
            await producer.submit_many(requests)

        def seen() -> str:
            return (f"t={time.monotonic() - started:5.1f}s read_uncommitted {uncommitted.answered(wanted)}, "
                    f"read_committed {committed.answered(wanted)} of {n} answered")

        for k in range(kills):
            threshold = int(n * (0.2 + 0.25 * k))
            if not await poll_until(lambda: uncommitted.answered(wanted) >= threshold, timeout):  # noqa: B023
                events.append(f"stalled before kill {k + 1}: {seen()}")
                break
            worker.kill()
            worker.wait()
            events.append(f"SIGKILL {k + 1} at {seen()}")
            worker, path = start_worker(env, logs, k + 1, scenario)
            procs.append(worker)
            log_paths.append(path)
        else:
            finished = await poll_until(lambda: committed.answered(wanted) == n, timeout)
            events.append(f"{'finished' if finished else 'stalled'}: {seen()}")
            if finished and not kills:
                for model in models:
                    waits = [committed.first_seen[r.id] - started for r in requests if r.model_id == model]
                    events.append(f"{model}: seen by read_committed {percentile(waits, 0.5):.2f} s (p50), "
                                  f"{percentile(waits, 0.9):.2f} s (p90) after the burst's first submit")
                for model in sorted({m for m, _ in one_by_one}):
                    alone = [t for m, t in one_by_one if m == model]
                    events.append(f"{model} one at a time ({len(alone)}): submit to read_committed "
                                  f"{percentile(alone, 0.5) * 1000:.0f} ms (p50), "
                                  f"{percentile(alone, 0.9) * 1000:.0f} ms (p90)")
                events.append(f"{n / (time.monotonic() - started):.0f} requests/s (read_committed, from the first "
                              f"submit); worker CPU {(cpu_seconds(worker.pid) - cpu) / n * 1000:.2f} ms per request")
        await asyncio.gather(*(r.poll() for r in readers))  # late records
    finally:
        for reader in readers:
            await reader.consumer.stop()
        stop_all(procs)

    latency = f"{scenario.ttft_ms} ms" + (f", llama3.1 {scenario.slow_ms} ms" if scenario.slow_ms else "")
    print(f"{scenario.describe()}: {n} requests of {','.join(models)}, "
          f"{scenario.partitions} partition(s), time to first token {latency}, {scenario.slots} slots per model, "
          f"{kills} SIGKILLs")
    for event in events:
        print(f"  {event}")
    for reader in readers:
        print(f"  {reader.isolation_level:>16}: {reader.answered(wanted)}/{n} answered, "
              f"{reader.duplicates(wanted)} duplicates, {sum(reader.ids.values())} records")
    for path in log_paths:
        lines = [line for line in path.read_text(errors="replace").splitlines()
                 if any(marker in line for marker in LOG_MARKERS)]
        print(f"  {path.name}: {len(lines)} error/warning lines" + ("; first ones:" if lines else ""))
        for line in lines[:6]:
            print(f"    {line[:240]}")


async def cache_check(bootstrap: str, scenario: Scenario, timeout: float, logs: Path) -> None:
    """Does the response cache (a Faust table) survive a SIGKILL: is the repeat answered from it?"""
    procs: list[subprocess.Popen[bytes]] = []
    port = free_port()
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "nexus", "simulate-ollama", "--port", str(port), "--ttft-ms", "150",
         "--tokens-per-s", "0", "--parallel", "16"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    env, kafka = isolated_env(bootstrap, f"http://127.0.0.1:{port}")
    env.update(NEXUS_KAFKA_PARTITIONS=str(scenario.partitions), NEXUS_KAFKA_SESSION_TIMEOUT_MS="6000")
    kafka = dataclasses.replace(kafka, partitions=scenario.partitions)
    await ensure_topics(kafka)
    changelog_topic = f"{env['NEXUS_WORKER_APP_ID']}-cache-changelog"
    changelog = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                 isolation_level="read_committed", auto_offset_reset="earliest",
                                 metadata_max_age_ms=1000)
    responses = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    run = uuid.uuid4().hex[:8]
    ask = {"model_id": "llama3.1", "input": "the same question", "context": ModelContext("s"),
           "options": InferenceOptions(temperature=0.0)}
    results: list[str] = []
    try:
        await wait_http(f"http://127.0.0.1:{port}/")
        await changelog.start()
        changelog.subscribe([changelog_topic])  # created by the worker; read from the start
        await responses.start()
        await read_from_end(responses, [kafka.responses_topic], timeout_s=30)
        for attempt in range(2):
            worker, path = start_worker(env, logs, attempt, scenario)
            procs.append(worker)
            started = time.monotonic()
            async with RequestProducer(kafka) as producer:
                await producer.submit(InferenceRequest(f"{run}-{attempt}", **ask))
            response = None
            while response is None and time.monotonic() - started < timeout:
                for records in (await responses.getmany(timeout_ms=200)).values():
                    response = decode_response(CODEC, records[0].value)
            if response is None:
                results.append(f"attempt {attempt + 1}: no answer within {timeout:.0f} s")
                break
            results.append(f"attempt {attempt + 1}: answered in {time.monotonic() - started:.1f} s "
                           f"(worker start included), cached={response.cached}")
            if attempt == 0:  # the entry is durable once a read_committed reader sees it in the changelog
                deadline = time.monotonic() + timeout
                entries = 0
                while not entries and time.monotonic() < deadline:
                    entries += sum(map(len, (await changelog.getmany(timeout_ms=200)).values()))
                results.append(f"cache entry committed to the changelog (seen by read_committed): {entries > 0}")
                worker.kill()
                worker.wait()
                results.append("SIGKILL")
    finally:
        await changelog.stop()
        await responses.stop()
        stop_all(procs)
    print(f"{scenario.describe()}: response cache across a SIGKILL "
          f"(the same temperature-0 request, before and after)")
    for line in results:
        print(f"  {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--guarantee", default="exactly_once", choices=["at_least_once", "exactly_once"])
    parser.add_argument("-n", type=int, default=160)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each step")
    parser.add_argument("--bootstrap")
    parser.add_argument("--logs", type=Path, help="keep the worker logs here (default: a temporary directory)")
    parser.add_argument("--faust-only", action="store_true",
                        help="Nexus at_least_once with Faust's processing_guarantee set to exactly_once")
    parser.add_argument("--route-into-transactions", action="store_true", help="with --faust-only: see above")
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--models", default="llama3.1,mistral",
                        help="comma-separated; request i asks model i mod len")
    parser.add_argument("--ttft-ms", type=int, default=150, help="the simulator's time to first token")
    parser.add_argument("--slots", type=int, default=4, help="max_concurrency of each model's endpoint")
    parser.add_argument("--slow-ms", type=int, default=0,
                        help="llama3.1's time to first token, on a simulator of its own (out-of-order answers)")
    parser.add_argument("--one-by-one", type=int, default=0, metavar="K",
                        help="with --kills 0: first time K requests asked one at a time")
    parser.add_argument("--cache-check", action="store_true",
                        help="instead of the SIGKILL run: is a cached answer still cached after a SIGKILL?")
    parser.add_argument("--run-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_worker:
        run_worker(args.faust_only, args.route_into_transactions)
        return
    with tempfile.TemporaryDirectory() as tmp:
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        guarantee = "at_least_once" if args.faust_only else args.guarantee
        scenario = Scenario(guarantee, args.faust_only, args.route_into_transactions, args.n, args.kills,
                            args.partitions, tuple(args.models.split(",")), args.slow_ms, args.ttft_ms,
                            args.slots, args.one_by_one)
        check = cache_check if args.cache_check else probe
        run_on_broker(lambda b: check(b, scenario, args.timeout, logs), args.bootstrap)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
