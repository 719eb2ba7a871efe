"""Nexus's added latency against Kafka's own floor, measured side by side in one run.

    .venv/bin/python bench/latency_floor.py [-n 300] [--quick] [--bootstrap HOST:PORT]

Starts (unless --bootstrap) a local broker, then a simulator at ``--ttft-ms 0 --tokens-per-s 0``,
a worker and a gateway on topics of their own, and, in a process of its own, the raw relay that
is the floor of Nexus's path: a consumer in a group reads each request, produces its answer with
``acks=all`` (idempotent, as the worker does) and commits; no decoding, no HTTP. Then, one
request at a time, interleaved so that drift in the machine hits all three alike:

- floor: the driver produces a request with ``acks=all`` and reads the relay's answer;
- Nexus: ``POST /infer`` (httpx) until the response arrives on the responses topic;
- direct: the same prompt to the simulator's ``/api/generate`` (httpx).

"Added by Nexus" is Nexus minus direct (per percentile); the targets of issue 17 are added p50 at
most the floor's p50 + 2 ms and added p99 at most the floor's p99 + 5 ms. The worker's
``nexus-stages`` header (schemas/headers.py) splits each Nexus round trip into stages (the
broker's timestamps are whole milliseconds, so stages next to them are +-1 ms each).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import uuid

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from common import REPO, isolated_env, percentile, role, run_on_broker, stop_all, wait_http
from localdev.broker import free_port
from nexus.kafka.readers import read_from_end
from nexus.kafka.topics import ensure_topics
from schemas import Codec, decode_response, headers

PROMPT = "Hello, world!"
# (label, from, to): from/to are stage names of the nexus-stages header, or the driver's own
# "posted" (POST sent), "acked" (202 read), "response" (the response record's broker timestamp)
# and "read" (the response read).
STAGES = (
    ("POST -> 202 (gateway produce)", "posted", "acked"),
    ("POST -> request appended", "posted", "appended"),
    ("appended -> batched (fetch + window)", "appended", "batched"),
    ("appended -> worker fetched", "appended", "fetched"),
    ("fetched -> batched (window)", "fetched", "batched"),
    ("batched -> dispatched", "batched", "dispatched"),
    ("dispatched -> answered (backend)", "dispatched", "answered"),
    ("answered -> sent", "answered", "sent"),
    ("sent -> response appended", "sent", "response"),
    ("response appended -> read", "response", "read"),
)


async def relay(bootstrap: str, requests_topic: str, responses_topic: str, group: str) -> None:
    """The floor: read in a group, answer each record with acks=all, commit after the acks."""
    consumer = AIOKafkaConsumer(requests_topic, bootstrap_servers=bootstrap, group_id=group,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=0)
    await consumer.start()
    await producer.start()
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=1000)
            acks = [await producer.send(responses_topic, key=record.key, value=b"answer:" + (record.value or b""))
                    for records in batches.values() for record in records]
            if acks:
                await asyncio.gather(*acks)
                await consumer.commit()
    finally:
        await producer.stop()
        await consumer.stop()


async def next_record(consumer: AIOKafkaConsumer, match: bytes) -> tuple[object, float]:
    """The first record whose value contains ``match``, and when it was read (epoch seconds)."""
    while True:
        for records in (await consumer.getmany(timeout_ms=1000)).values():
            for record in records:
                if match in (record.value or b""):
                    return record, time.time()


async def measure(bootstrap: str, n: int) -> None:
    sim_port, gw_port = free_port(), free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    env, kafka = isolated_env(bootstrap, sim_url)
    env.update(NEXUS_GATEWAY_PORT=str(gw_port), NEXUS_GATEWAY_HOST="127.0.0.1")
    _, floor_kafka = isolated_env(bootstrap, sim_url)
    await ensure_topics(kafka)
    await ensure_topics(floor_kafka)
    procs = [role(["simulate-ollama", "--port", str(sim_port), "--ttft-ms", "0", "--tokens-per-s", "0"], env)]
    codec = Codec.from_directory()
    floor: list[float] = []
    nexus: list[float] = []
    direct: list[float] = []
    stages: dict[str, list[float]] = {label: [] for label, _, _ in STAGES}
    try:
        await wait_http(f"{sim_url}/")
        procs += [role(["worker"], env), role(["gateway"], env),
                  subprocess.Popen([sys.executable, __file__, "--bootstrap", bootstrap, "--relay",
                                    floor_kafka.requests_topic, floor_kafka.responses_topic,
                                    f"floor-{uuid.uuid4().hex[:6]}"], cwd=REPO)]
        await wait_http(f"http://127.0.0.1:{gw_port}/models")
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=0)
        floor_reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
        nexus_reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
        for client in (producer, floor_reader, nexus_reader):
            await client.start()
        try:
            await read_from_end(floor_reader, [floor_kafka.responses_topic])
            await read_from_end(nexus_reader, [kafka.responses_topic])
            async with httpx.AsyncClient() as http:
                body = {"model_id": "llama3.1", "input": PROMPT,
                        "context": {"session_id": "session123", "metadata": {"user": "alice", "lang": "en"}}}

                async def through_floor() -> float:
                    token = uuid.uuid4().hex.encode()
                    started = time.perf_counter()
                    await producer.send_and_wait(floor_kafka.requests_topic, key=b"llama3.1", value=token)
                    await next_record(floor_reader, token)
                    return time.perf_counter() - started

                async def through_nexus(keep: bool) -> float:
                    request_id = uuid.uuid4().hex
                    posted, started = time.time(), time.perf_counter()
                    reply = await http.post(f"http://127.0.0.1:{gw_port}/infer", json={**body, "id": request_id})
                    acked = time.time()
                    assert reply.status_code == 202, reply.text
                    while True:
                        record, read = await next_record(nexus_reader, request_id.encode())
                        if decode_response(codec, record.value).id == request_id:  # type: ignore[attr-defined]
                            break
                    elapsed = time.perf_counter() - started
                    if keep:
                        found = dict(record.headers or ())  # type: ignore[attr-defined]
                        times = headers.read_stages(found.get(headers.STAGES, b""))
                        times.update(posted=posted, acked=acked, read=read,
                                     response=record.timestamp / 1000)  # type: ignore[attr-defined]
                        for label, start, end in STAGES:
                            if start in times and end in times:
                                stages[label].append(times[end] - times[start])
                    return elapsed

                async def straight() -> float:
                    started = time.perf_counter()
                    reply = await http.post(f"{sim_url}/api/generate",
                                            json={"model": "llama3.1", "prompt": PROMPT, "stream": False})
                    reply.raise_for_status()
                    return time.perf_counter() - started

                await through_nexus(False)  # the first ones wait for the worker and the relay to join
                await through_floor()
                for _ in range(max(20, n // 10)):  # warm-up: connections, the broker's JIT
                    await through_floor()
                    await through_nexus(False)
                    await straight()
                for _ in range(n):
                    floor.append(await through_floor())
                    nexus.append(await through_nexus(True))
                    direct.append(await straight())
        finally:
            for client in (producer, floor_reader, nexus_reader):
                await client.stop()
    finally:
        stop_all(procs)
    report(n, floor, nexus, direct, stages)


def report(n: int, floor: list[float], nexus: list[float], direct: list[float],
           stages: dict[str, list[float]]) -> None:
    def ms(values: list[float], q: float) -> float:
        return percentile(values, q) * 1000

    print(f"{n} sequential requests each way, interleaved; simulator --ttft-ms 0 --tokens-per-s 0")
    print(f"{'':36}{'p50 ms':>9}{'p99 ms':>9}")
    for name, values in (("floor: raw aiokafka relay", floor), ("Nexus: POST /infer -> response", nexus),
                         ("direct /api/generate", direct)):
        print(f"{name:36}{ms(values, .5):9.2f}{ms(values, .99):9.2f}")
    added50, added99 = ms(nexus, .5) - ms(direct, .5), ms(nexus, .99) - ms(direct, .99)
    print(f"{'added by Nexus (Nexus - direct)':36}{added50:9.2f}{added99:9.2f}")
    print(f"{'added - floor':36}{added50 - ms(floor, .5):9.2f}{added99 - ms(floor, .99):9.2f}")
    print("per stage of the Nexus round trip:")
    for label, values in stages.items():
        if values:
            print(f"  {label:34}{ms(values, .5):9.2f}{ms(values, .99):9.2f}")
    met50, met99 = added50 <= ms(floor, .5) + 2, added99 <= ms(floor, .99) + 5
    print(f"target (issue 17): added p50 <= floor p50 + 2 ms: {'met' if met50 else 'NOT met'}; "
          f"added p99 <= floor p99 + 5 ms: {'met' if met99 else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="50 requests each way")
    parser.add_argument("--bootstrap")
    parser.add_argument("--relay", nargs=3, metavar=("REQUESTS", "RESPONSES", "GROUP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.relay:
        try:
            asyncio.run(relay(args.bootstrap, *args.relay))
        except KeyboardInterrupt:
            pass
        return
    n = 50 if args.quick else args.n
    run_on_broker(lambda bootstrap: measure(bootstrap, n), args.bootstrap)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
