"""End-to-end latency of the README's curl example, against calling the simulator directly.

    .venv/bin/python bench/e2e_latency.py [-n 200] [--bootstrap HOST:PORT]

Starts (unless --bootstrap) a local broker, then a simulator at --ttft-ms 0, a worker and a
gateway on free ports; sends the seed request N times one after another and measures from
``POST /infer`` to the response's arrival on ``inference.responses``. The baseline is the same
prompt sent straight to the simulator's ``/api/generate`` with httpx. Both run in one process
on one machine, so the difference is Nexus's overhead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition

from common import percentile, role, run_on_broker, wait_http
from localdev.broker import free_port
from schemas import Codec, decode_response


async def measure(bootstrap: str, n: int) -> None:
    sim_port, gw_port = free_port(), free_port()
    # Worker settings (e.g. NEXUS_WORKER_MAX_WAIT_MS) pass through, to compare windows.
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_") or k.startswith("NEXUS_WORKER_")}
    env.update(NEXUS_KAFKA_BOOTSTRAP=bootstrap, OLLAMA_HOST=f"http://127.0.0.1:{sim_port}",
               NEXUS_GATEWAY_PORT=str(gw_port), NEXUS_GATEWAY_HOST="127.0.0.1",
               NEXUS_WORKER_WEB_PORT=str(free_port()), NEXUS_WORKER_APP_ID=f"bench-{uuid.uuid4().hex[:6]}")
    procs = [role(["simulate-ollama", "--port", str(sim_port), "--ttft-ms", "0", "--tokens-per-s", "0"], env)]
    try:
        await wait_http(f"http://127.0.0.1:{sim_port}/")
        procs += [role(["worker"], env), role(["gateway"], env)]
        await wait_http(f"http://127.0.0.1:{gw_port}/models")
        codec = Codec.from_directory()
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
        await consumer.start()
        try:
            parts = consumer.partitions_for_topic("inference.responses")
            while not parts:
                await consumer._client.force_metadata_update()
                parts = consumer.partitions_for_topic("inference.responses")
            tps = [TopicPartition("inference.responses", p) for p in parts]
            consumer.assign(tps)
            await consumer.seek_to_end(*tps)
            for tp in tps:
                await consumer.position(tp)
            async with httpx.AsyncClient() as http:
                body = {"model_id": "llama3.1", "input": "Hello, world!",
                        "context": {"session_id": "session123", "metadata": {"user": "alice", "lang": "en"}}}

                acked: list[float] = []
                in_worker: list[float] = []

                async def through_nexus() -> float:
                    started = time.perf_counter()
                    request_id = uuid.uuid4().hex
                    reply = await http.post(f"http://127.0.0.1:{gw_port}/infer", json={**body, "id": request_id})
                    assert reply.status_code == 202, reply.text
                    acked.append(time.perf_counter() - started)
                    while True:
                        batches = await consumer.getmany(timeout_ms=1000)
                        for records in batches.values():
                            for record in records:
                                response = decode_response(codec, record.value)
                                if response.id == request_id:
                                    # Broker append time of the response minus the request's created_at.
                                    in_worker.append(record.timestamp / 1000 - response.completed_at.timestamp()
                                                     + response.latency_ms / 1000)
                                    return time.perf_counter() - started

                async def direct() -> float:
                    started = time.perf_counter()
                    reply = await http.post(f"http://127.0.0.1:{sim_port}/api/generate", json={
                        "model": "llama3.1", "prompt": "Hello, world!", "stream": False})
                    reply.raise_for_status()
                    return time.perf_counter() - started

                await through_nexus()  # the first one waits for the worker to join its group
                for _ in range(10):
                    await through_nexus()
                    await direct()
                acked.clear()
                in_worker.clear()
                nexus = [await through_nexus() for _ in range(n)]
                baseline = [await direct() for _ in range(n)]
        finally:
            await consumer.stop()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()

    def ms(values: list[float], q: float) -> float:
        return percentile(values, q) * 1000

    print(f"{n} sequential requests, simulator --ttft-ms 0 --tokens-per-s 0")
    print(f"{'':28}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for name, values in (("POST /infer -> response", nexus), ("direct /api/generate", baseline)):
        print(f"{name:28}{ms(values, .5):10.2f}{ms(values, .99):10.2f}{statistics.mean(values) * 1000:10.2f}")
    print(f"{'added by Nexus':28}{ms(nexus, .5) - ms(baseline, .5):10.2f}{ms(nexus, .99) - ms(baseline, .99):10.2f}")
    print(f"{'  of which: POST -> 202':28}{ms(acked, .5):10.2f}{ms(acked, .99):10.2f}")
    print(f"{'  created -> response log':28}{ms(in_worker, .5):10.2f}{ms(in_worker, .99):10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--bootstrap")
    args = parser.parse_args()
    run_on_broker(lambda bootstrap: measure(bootstrap, args.n), args.bootstrap)


if __name__ == "__main__":
    main()
