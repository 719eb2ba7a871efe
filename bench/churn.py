"""Rebalances waste no model calls: workers join and leave while a backlog drains.

    .venv/bin/python bench/churn.py [-n 900] [--bootstrap HOST:PORT]

On a local broker (unless --bootstrap), topics of its own with 4 partitions and four models,
one on each partition, served by a simulated Ollama that answers in ``--answer-ms`` with
``--slots`` parallel slots (saturated: most requests wait for a slot). The driver submits N
requests at once through the producer API (the backlog), starts one worker, and as the answers
come in, churns the group: a second worker joins at 1/9 of N answered, a third at 3/9, the first
leaves gracefully (SIGTERM) at 5/9 and the second at 7/9; the third drains the rest.

Prints: every request answered or not, the responses written (each a model call: prompts are
unique, so nothing is cached or shared), the duplicates among them (target: under 5% of N), how
long the backlog waited from the first worker's start to its first answer, and the slowest
stop of a leaving worker.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from aiokafka import AIOKafkaConsumer
from aiokafka.partitioner import murmur2

from common import REPO, isolated_env, role, run_on_broker, stop_all, wait_http
from nexus.kafka.clients import client_options
from localdev.broker import free_port
from nexus.kafka.topics import ensure_topics
from producers.client import RequestProducer
from schemas import Codec, InferenceRequest, ModelContext, decode_response

PARTITIONS = 4
LOGS_DIR = REPO / ".cache" / "bench-logs" / "churn"


def models_on_every_partition() -> list[str]:
    """One model id per partition of the requests topic (Kafka's default partitioner)."""
    chosen: dict[int, str] = {}
    i = 0
    while len(chosen) < PARTITIONS:
        name = f"m{i}"
        chosen.setdefault((murmur2(name.encode()) & 0x7FFFFFFF) % PARTITIONS, name)
        i += 1
    return [chosen[p] for p in range(PARTITIONS)]


async def measure(bootstrap: str, n: int, answer_ms: int, slots: int) -> None:
    sim_port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    models = models_on_every_partition()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "nexus.toml"
        config.write_text("".join(
            f'[models."{m}"]\nendpoints = [{{ url = "http://127.0.0.1:{sim_port}", max_concurrency = {slots} }}]\n'
            for m in models))
        env, kafka = isolated_env(bootstrap, f"http://127.0.0.1:{sim_port}", config)
        env["NEXUS_KAFKA_PARTITIONS"] = str(PARTITIONS)
        kafka = dataclasses.replace(kafka, partitions=PARTITIONS)
        await ensure_topics(kafka)
        simulator = role(["simulate-ollama", "--port", str(sim_port), "--ttft-ms", str(answer_ms),
                          "--tokens-per-s", "0", "--parallel", str(slots * PARTITIONS), "--models", ",".join(models)], env)
        procs.append(simulator)
        await wait_http(f"http://127.0.0.1:{sim_port}/api/version")
        codec = Codec.from_directory()
        requests = [InferenceRequest(f"churn-{i}", models[i % PARTITIONS], f"question {i}", ModelContext(f"s{i}"))
                    for i in range(n)]
        async with RequestProducer(kafka) as producer:
            await producer.submit_many(requests)
        reader = AIOKafkaConsumer(kafka.responses_topic, **client_options(kafka), group_id=None,
                                  auto_offset_reset="earliest")
        await reader.start()
        counts: Counter[str] = Counter()
        workers: list[subprocess.Popen[bytes]] = []
        stops: list[float] = []

        LOGS_DIR.mkdir(parents=True, exist_ok=True)

        ports: list[int] = []

        def start_worker() -> subprocess.Popen[bytes]:
            log = open(LOGS_DIR / f"worker-{len(workers)}.log", "wb")
            ports.append(free_port())
            worker = subprocess.Popen([sys.executable, "-m", "nexus", "worker", "--loglevel", "info"],
                                      env={**env, "NEXUS_WORKER_WEB_PORT": str(ports[-1])}, cwd=REPO,
                                      stdout=log, stderr=subprocess.STDOUT)
            log.close()
            procs.append(worker)
            workers.append(worker)
            return worker

        async def leave(worker: subprocess.Popen[bytes]) -> None:
            began = time.monotonic()
            worker.send_signal(signal.SIGTERM)
            while worker.poll() is None:
                await asyncio.sleep(0.05)
            stops.append(time.monotonic() - began)

        steps = [(n // 9, "join"), (3 * n // 9, "join"), (5 * n // 9, "leave", 0), (7 * n // 9, "leave", 1)]
        try:
            started = time.monotonic()
            start_worker()
            first_answer = None
            deadline = started + 120 + n * 0.2
            leaving: list[asyncio.Task[None]] = []
            while len(counts) < n and time.monotonic() < deadline:
                batch = await reader.getmany(timeout_ms=200)
                for records in batch.values():
                    for record in records:
                        counts[decode_response(codec, record.value).id] += 1
                if counts and first_answer is None:
                    first_answer = time.monotonic() - started
                while steps and len(counts) >= steps[0][0]:
                    step = steps.pop(0)
                    if step[1] == "join":
                        start_worker()
                    else:
                        leaving.append(asyncio.ensure_future(leave(workers[step[2]])))
            await asyncio.gather(*leaving)
            if len(counts) < n:
                async with httpx.AsyncClient() as http:
                    for i, worker in enumerate(workers):
                        if worker.poll() is None:
                            health = await http.get(f"http://127.0.0.1:{ports[i]}/health")
                            print(f"worker {i} stalled with {len(counts)}/{n} answered: {health.text}")
                            metrics = await http.get(f"http://127.0.0.1:{ports[i]}/metrics")
                            print("\n".join(line for line in metrics.text.splitlines()
                                            if "redeliveries" in line or "batch_size_count" in line))
            # Late duplicates: read on until the topic is quiet for 3 s.
            quiet = time.monotonic()
            while time.monotonic() - quiet < 3:
                batch = await reader.getmany(timeout_ms=500)
                for records in batch.values():
                    quiet = time.monotonic()
                    for record in records:
                        counts[decode_response(codec, record.value).id] += 1
        finally:
            await reader.stop()
            stop_all(procs)
    answered = len(counts)
    written = sum(counts.values())
    duplicates = written - answered
    print(f"churn: {n} requests, 4 partitions, {slots} slots per model, answers in {answer_ms} ms; "
          f"2 joins, 2 graceful leaves")
    print(f"  answered {answered}/{n}; responses written {written}; duplicates {duplicates} "
          f"({100 * duplicates / n:.1f}% of requests; target under 5%)")
    print(f"  backlog: first answer {first_answer:.2f} s after the first worker was started"
          if first_answer is not None else "  backlog: no answer")
    print(f"  graceful leaves took {', '.join(f'{s:.1f} s' for s in stops)}")
    if answered < n:
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=900)
    parser.add_argument("--answer-ms", type=int, default=100)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--bootstrap")
    args = parser.parse_args()
    run_on_broker(lambda b: measure(b, args.n, args.answer_ms, args.slots), args.bootstrap)


if __name__ == "__main__":
    main()
