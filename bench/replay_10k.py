"""How long ``nexus replay --join`` takes over a run of N requests, against producing them.

    .venv/bin/python bench/replay_10k.py [-n 10000] [--bootstrap HOST:PORT]

Starts (unless --bootstrap) a local broker, then a simulator at --ttft-ms 0, and a worker
with a fresh group id; produces N requests through the producer API (two models, 100
sessions), waits until every one is answered, then runs the real command,
``python -m nexus replay --join --since S --until U``, over exactly that range, and
prints its join report with the timings. The replay reads requests and responses
(2N records) with no consumer group.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid

from common import REPO, role, run_on_broker, wait_http
from localdev.broker import free_port
from nexus.settings import KafkaSettings
from nexus.kafka.topics import ensure_topics
from producers.client import RequestProducer
from producers.replies import ReplyIndex, ReplyReader
from schemas import Codec, InferenceRequest, ModelContext


async def measure(bootstrap: str, n: int) -> None:
    sim_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env.update(NEXUS_KAFKA_BOOTSTRAP=bootstrap, OLLAMA_HOST=f"http://127.0.0.1:{sim_port}",
               NEXUS_WORKER_WEB_PORT=str(free_port()), NEXUS_WORKER_APP_ID=f"bench-{uuid.uuid4().hex[:6]}")
    kafka = KafkaSettings(bootstrap=bootstrap)
    await ensure_topics(kafka)
    procs = [role(["simulate-ollama", "--port", str(sim_port), "--ttft-ms", "0", "--tokens-per-s", "0",
                   "--parallel", "64", "--max-queue", "100000"], env)]
    try:
        await wait_http(f"http://127.0.0.1:{sim_port}/")
        procs.append(role(["worker"], env))
        run = uuid.uuid4().hex[:8]
        async with RequestProducer(kafka) as producer:
            # Warm up: the worker has joined its group once this is answered.
            await producer.submit_and_wait(
                InferenceRequest(f"{run}-warmup", "llama3.1", "warm up", ModelContext(f"{run}-warmup")), 120)
            answers = ReplyIndex()
            listener = ReplyReader(kafka, None, answers, Codec.from_directory())  # every answer
            await listener.start()  # at the end of the responses: before producing
            requests = [
                InferenceRequest(f"{run}-{i}", ("llama3.1", "mistral")[i % 2], f"question {i}",
                                 ModelContext(f"{run}-s{i % 100}", {"n": str(i)}))
                for i in range(n)
            ]
            futures = [answers.expect(r.id, stream=False).done for r in requests]
            since = int(time.time() * 1000)
            started = time.perf_counter()
            for chunk in range(0, n, 1000):
                await producer.submit_many(requests[chunk:chunk + 1000])
            produced_s = time.perf_counter() - started
            until = int(time.time() * 1000) + 1
            await asyncio.wait_for(asyncio.gather(*futures), timeout=600)
            answered_s = time.perf_counter() - started
            await listener.stop()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()

    command = [sys.executable, "-m", "nexus", "replay", "--bootstrap", bootstrap, "--join",
               "--since", str(since), "--until", str(until), "--no-progress"]
    started = time.perf_counter()
    table = subprocess.run([*command, "--format", "table"], cwd=REPO, capture_output=True, text=True)
    replay_s = time.perf_counter() - started
    as_json = subprocess.run([*command, "--format", "jsonl"], cwd=REPO, capture_output=True, text=True)
    report = json.loads(as_json.stdout)

    print(f"{n} requests, simulator --ttft-ms 0 --tokens-per-s 0, one worker, 2 cores")
    print(f"  producing (acks=all, producer API):    {produced_s:7.2f} s  ({n / produced_s:,.0f} requests/s)")
    print(f"  produced and all answered:             {answered_s:7.2f} s")
    print(f"  nexus replay --join over that range:   {replay_s:7.2f} s  (the whole command, Python start "
          f"included; {2 * n / replay_s:,.0f} records/s)")
    print(f"  replay / producing:                    {replay_s / produced_s:7.2f}x")
    print(f"  replay / producing and answering:      {replay_s / answered_s:7.2f}x")
    print(f"  exit status {table.returncode}; all answered: {report['complete']}, requests {report['requests']}, "
          f"answered {report['answered']}, duplicates {len(report['duplicate_responses'])}")
    print()
    print(table.stdout.rstrip())
    if table.returncode not in (0, 1):
        print(table.stderr, file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=10_000)
    parser.add_argument("--bootstrap")
    args = parser.parse_args()
    run_on_broker(lambda bootstrap: measure(bootstrap, args.n), args.bootstrap)


if __name__ == "__main__":
    main()
