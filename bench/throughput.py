"""Requests/s through the whole pipeline, against the raw ceilings of Kafka on the same broker.

    .venv/bin/python bench/throughput.py [-n 5000] [--quick] [--bootstrap HOST:PORT] [--profile FILE]
                                         [--deterministic]

Starts (unless --bootstrap) a local broker and a zero-latency simulator (``--ttft-ms 0
--tokens-per-s 0 --parallel 64``). Two runs, each on topics of its own (8 partitions), each
with its consumer in a separate process, each fed N requests by the producer API as fast as
acks allow (two models, so two keys) and timed from the first submit to the N-th response read:

- Nexus: the worker (``python -m nexus worker``), both models at the simulator with
  ``max_concurrency = 64`` (a TOML file in NEXUS_CONFIG);
- raw ceiling: this file with ``--raw-worker``, a plain aiokafka loop doing what any Kafka
  processor must: a consumer in a group reads the requests, produces a small response per
  record (acks=all, idempotent) and commits after the produce acks. No decoding, no HTTP;
- raw with HTTP: the same loop making one aiohttp call per record to the same simulator
  (``/api/generate``, the record's key as the model) before producing its response, at most
  64 calls at a time, as the worker's endpoints allow: the fair ceiling of a Kafka processor that
  calls a model (issue 17).

Prints the rates, Nexus against both ceilings (targets: issue 6, at least 0.5 of the raw loop;
issue 17, at least 0.5 of the raw loop with HTTP) and each consumer's CPU seconds per request
(issue 17: the worker's halved from 0.37 ms). --quick: 1000 requests. With --profile FILE the
worker runs under pyinstrument and its text report goes to FILE (pip install pyinstrument).
With --deterministic every request has temperature 0 and a prompt of its own: each answer is
stored in the response cache (none is a hit), so the run measures what caching costs the worker.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from common import REPO, cpu_seconds, isolated_env, role, run_on_broker, stop_all, wait_http
from nexus.kafka.clients import client_options
from localdev.broker import free_port
from nexus.settings import KafkaSettings
from nexus.kafka.readers import read_from_end
from nexus.kafka.topics import ensure_topics
from producers.client import RequestProducer
from schemas import InferenceOptions, InferenceRequest, ModelContext


CONCURRENCY = 64  # the simulator's slots, and each model's max_concurrency in the worker's config


async def raw_worker(bootstrap: str, requests_topic: str, responses_topic: str, group: str,
                     model_url: str | None = None) -> None:
    """The ceiling: consume, produce one small record per request with acks=all, commit after the
    acks; with ``model_url``, one call to its ``/api/generate`` per record first (at most
    CONCURRENCY at a time), its body the response."""
    consumer = AIOKafkaConsumer(requests_topic, bootstrap_servers=bootstrap, group_id=group,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=1)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY))
    slots = asyncio.Semaphore(CONCURRENCY)

    async def answer(record: Any) -> Any:
        if model_url is None:
            return await producer.send(responses_topic, key=record.key, value=b"ok:%d" % record.offset)
        async with slots:
            async with http.post(f"{model_url}/api/generate", json={
                    "model": record.key.decode(), "prompt": f"question {record.offset}", "stream": False}) as reply:
                body = await reply.read()
        return await producer.send(responses_topic, key=record.key, value=body)

    await consumer.start()
    await producer.start()
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=100, max_records=500)
            acks = await asyncio.gather(*(answer(record) for records in batches.values() for record in records))
            if acks:
                await asyncio.gather(*acks)
                await consumer.commit()
    finally:
        await http.close()
        await producer.stop()
        await consumer.stop()


async def drive(
    kafka: KafkaSettings, n: int, pids: list[int], models: tuple[str, ...] = ("llama3.1", "mistral"),
    options: InferenceOptions | None = None,
) -> tuple[float, list[float]]:
    """Submit N requests (round-robin over ``models``, the record key) as fast as acks allow; return
    requests/s until the N-th response is read, and the CPU seconds each of ``pids`` used meanwhile
    (after the warm-up)."""
    run = uuid.uuid4().hex[:8]
    reader = AIOKafkaConsumer(**client_options(kafka), group_id=None, enable_auto_commit=False)
    await reader.start()
    try:
        async with RequestProducer(kafka) as producer:
            # Warm-up, one request per model (so per partition used): once all are answered, the
            # consumers owning those partitions have joined the group and are reading.
            await read_from_end(reader, [kafka.responses_topic])
            await producer.submit_many([InferenceRequest(f"{run}-warm-{model}", model, "warm up",
                                                         ModelContext(f"{run}-w")) for model in models])
            warm = 0
            while warm < len(models):
                warm += sum(len(records) for records in (await reader.getmany(timeout_ms=1000)).values())
            await read_from_end(reader, [kafka.responses_topic])
            requests = [InferenceRequest(f"{run}-{i}", models[i % len(models)], f"question {i}",
                                         ModelContext(f"{run}-s{i % 100}"), options=options or InferenceOptions())
                        for i in range(n)]

            async def produce() -> None:
                for chunk in range(0, n, 1000):
                    await producer.submit_many(requests[chunk:chunk + 1000])

            cpu = [cpu_seconds(pid) for pid in pids]
            started = time.perf_counter()
            producing = asyncio.create_task(produce())
            seen = 0
            while seen < n:
                for records in (await reader.getmany(timeout_ms=1000)).values():
                    seen += len(records)
            elapsed = time.perf_counter() - started
            cpu = [cpu_seconds(pid) - before for pid, before in zip(pids, cpu)]
            await producing
            return n / elapsed, cpu
    finally:
        await reader.stop()


async def measure(bootstrap: str, n: int, profile: Path | None, deterministic: bool = False) -> None:
    sim_port = free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "nexus.toml"
        config.write_text("".join(
            f'[models."{model}"]\nendpoints = [{{ url = "{sim_url}", max_concurrency = 64 }}]\n'
            for model in ("llama3.1", "mistral")))
        env, nexus_kafka = isolated_env(bootstrap, sim_url, config)
        _, raw_kafka = isolated_env(bootstrap, sim_url)
        _, http_kafka = isolated_env(bootstrap, sim_url)
        for kafka in (nexus_kafka, raw_kafka, http_kafka):
            await ensure_topics(kafka)
        procs = [role(["simulate-ollama", "--port", str(sim_port), "--ttft-ms", "0", "--tokens-per-s", "0",
                       "--parallel", str(CONCURRENCY), "--max-queue", "100000"], env)]
        try:
            await wait_http(f"{sim_url}/")
            rates, cpus = [], []
            for kafka, extra in ((raw_kafka, []), (http_kafka, ["--model-url", sim_url])):
                raw = subprocess.Popen(
                    [sys.executable, __file__, "--bootstrap", bootstrap, "--raw-worker", kafka.requests_topic,
                     kafka.responses_topic, f"raw-{uuid.uuid4().hex[:6]}", *extra], cwd=REPO)
                procs.append(raw)
                rate, (cpu,) = await drive(kafka, n, [raw.pid])
                rates.append(rate)
                cpus.append(cpu)
                stop_all([procs.pop()])
            (raw_rate, http_rate), (raw_cpu, http_cpu) = rates, cpus
            if profile is None:
                worker = role(["worker"], env)
            else:
                worker = subprocess.Popen(
                    [sys.executable, "-m", "pyinstrument", "-r", "text", "-o", str(profile), "-m", "nexus", "worker"],
                    env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(worker)
            nexus_rate, (worker_cpu, sim_cpu) = await drive(
                nexus_kafka, n, [worker.pid, procs[0].pid],
                options=InferenceOptions(temperature=0) if deterministic else None)
            if profile is not None:  # SIGINT: a clean stop, so pyinstrument writes its report
                worker.send_signal(signal.SIGINT)
                worker.wait(timeout=60)
        finally:
            stop_all(procs)

    print(f"{n} requests (two models), 8 partitions, simulator --ttft-ms 0 --tokens-per-s 0 --parallel {CONCURRENCY}"
          + ("; Nexus's requests deterministic, each answer cached" if deterministic else ""))
    print(f"  raw aiokafka consume -> produce (acks=all) -> commit: {raw_rate:8.0f} requests/s")
    print(f"  raw loop + one aiohttp call per record ({CONCURRENCY} at a time): {http_rate:8.0f} requests/s")
    print(f"  Nexus (producer API -> worker -> simulator -> Kafka): {nexus_rate:8.0f} requests/s")
    print(f"  CPU per request: raw loop {raw_cpu / n * 1000:.3f} ms, raw loop + HTTP {http_cpu / n * 1000:.3f} ms; "
          f"Nexus worker {worker_cpu / n * 1000:.3f} ms (target of issue 17: <= 0.185), "
          f"simulator {sim_cpu / n * 1000:.3f} ms")
    print(f"  ratio Nexus / raw: {nexus_rate / raw_rate:.2f} (target of issue 6: >= 0.5)")
    print(f"  ratio Nexus / raw + HTTP: {nexus_rate / http_rate:.2f} (target of issue 17: >= 0.5)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=5000)
    parser.add_argument("--quick", action="store_true", help="1000 requests")
    parser.add_argument("--bootstrap")
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--deterministic", action="store_true", help="temperature 0: every answer is cached")
    parser.add_argument("--raw-worker", nargs=3, metavar=("REQUESTS", "RESPONSES", "GROUP"), help=argparse.SUPPRESS)
    parser.add_argument("--model-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_worker:
        try:
            requests_topic, responses_topic, group = args.raw_worker
            asyncio.run(raw_worker(args.bootstrap, requests_topic, responses_topic, group, args.model_url))
        except KeyboardInterrupt:
            pass
        return
    n = 1000 if args.quick else args.n
    run_on_broker(lambda b: measure(b, n, args.profile, args.deterministic), args.bootstrap)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
