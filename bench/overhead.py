"""Latency Nexus adds to a call, at light load and at 80 % of the backend's capacity.

    .venv/bin/python bench/overhead.py [-n 200] [--parallel 4] [--ttft-ms 50] [--load 0.8]
                                       [--bootstrap HOST:PORT]

Starts (unless --bootstrap) a local broker, then a simulator with --parallel slots and a fixed
service time (--ttft-ms, --tokens-per-s 0), a worker configured with ``max_concurrency =
--parallel`` for it, and a gateway, on topics of their own. Its capacity is parallel / ttft
(4 / 50 ms = 80 requests/s). Two loads, each sent through Nexus and straight to the simulator:

- light: N requests one after another;
- loaded: N requests arriving on a fixed schedule (open loop, not waiting for answers) at
  --load × capacity (64 requests/s by default), so queueing shows as it would in production.

Through Nexus a latency runs from ``POST /infer`` to the response's arrival on the responses
topic; straight, from the httpx call to its answer. Printed: p50/p99 of both, their difference
(what Nexus adds), and Nexus's own share per request: end to end minus the response's
``backend_latency_ms`` (the worker's call to the simulator). Everything shares this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from common import isolated_env, percentile, role, run_on_broker, stop_all, wait_http
from localdev.broker import free_port
from nexus.kafka.topics import ensure_topics
from producers.replies import ReplyIndex, ReplyReader
from schemas import Codec

Call = Callable[[], Awaitable[float]]


async def sequential(call: Call, n: int) -> list[float]:
    """Light load: each call starts when the previous one answered."""
    return [await call() for _ in range(n)]


async def paced(call: Call, n: int, rate: float) -> list[float]:
    """Open loop: call i starts at i / rate seconds whatever the answers, as independent clients do."""
    started = time.perf_counter()

    async def at(i: int) -> float:
        await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
        return await call()

    return list(await asyncio.gather(*(at(i) for i in range(n))))


async def measure(bootstrap: str, n: int, parallel: int, ttft_ms: int, load: float) -> None:
    sim_port, gw_port = free_port(), free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "nexus.toml"
        config.write_text(f'[models."llama3.1"]\nendpoints = [{{ url = "{sim_url}", max_concurrency = {parallel} }}]\n')
        env, kafka = isolated_env(bootstrap, sim_url, config)
        env.update(NEXUS_GATEWAY_PORT=str(gw_port), NEXUS_GATEWAY_HOST="127.0.0.1")
        await ensure_topics(kafka)
        procs = [role(["simulate-ollama", "--port", str(sim_port), "--ttft-ms", str(ttft_ms),
                       "--tokens-per-s", "0", "--parallel", str(parallel), "--max-queue", "10000"], env)]
        try:
            await wait_http(f"{sim_url}/")
            procs += [role(["worker"], env), role(["gateway"], env)]
            await wait_http(f"http://127.0.0.1:{gw_port}/models")
            answers = ReplyIndex()
            listener = ReplyReader(kafka, None, answers, Codec.from_directory())  # every answer
            await listener.start()
            limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
            async with httpx.AsyncClient(timeout=120, limits=limits) as http:
                own: list[float] = []  # end to end minus backend_latency_ms, per Nexus request
                backend: list[float] = []  # the worker's call to the simulator, per Nexus request

                async def through_nexus() -> float:
                    request_id = uuid.uuid4().hex
                    answer = answers.expect(request_id, stream=False).done
                    started = time.perf_counter()
                    reply = await http.post(f"http://127.0.0.1:{gw_port}/infer", json={
                        "id": request_id, "model_id": "llama3.1", "input": "Hello, world!",
                        "context": {"session_id": f"s{request_id[:2]}", "metadata": {"user": "alice"}}})
                    assert reply.status_code == 202, reply.text
                    response = await asyncio.wait_for(answer, 120)
                    elapsed = time.perf_counter() - started
                    assert response.status == "ok", response
                    own.append(elapsed - response.backend_latency_ms / 1000)
                    backend.append(response.backend_latency_ms / 1000)
                    return elapsed

                async def direct() -> float:
                    started = time.perf_counter()
                    reply = await http.post(f"{sim_url}/api/generate", json={
                        "model": "llama3.1", "prompt": "Hello, world!", "stream": False})
                    reply.raise_for_status()
                    return time.perf_counter() - started

                await through_nexus()  # the first one waits for the worker to join its group
                for _ in range(10):
                    await through_nexus()
                    await direct()
                capacity = parallel / (ttft_ms / 1000)
                rate = load * capacity
                results: list[tuple[str, list[float], list[float], list[float], list[float]]] = []
                for name, run in (("light (sequential)", lambda c: sequential(c, n)),
                                  (f"loaded ({rate:.0f}/s open loop)", lambda c: paced(c, n, rate))):
                    own.clear()
                    backend.clear()
                    nexus = await run(through_nexus)
                    nexus_own, nexus_backend = list(own), list(backend)
                    stats = (await http.get(f"{sim_url}/simulator/stats")).json()
                    print(f"{name}: simulator's most concurrent calls so far {stats.get('max_concurrent')}")
                    baseline = await run(direct)
                    results.append((name, nexus, baseline, nexus_own, nexus_backend))
            await listener.stop()
        finally:
            stop_all(procs)

    def ms(values: list[float], q: float) -> float:
        return percentile(values, q) * 1000

    print(f"{n} requests per case; simulator --parallel {parallel} --ttft-ms {ttft_ms} --tokens-per-s 0 "
          f"(capacity {capacity:.0f}/s), worker max_concurrency {parallel}")
    print(f"{'':44}{'p50 ms':>9}{'p99 ms':>9}")
    for name, nexus, baseline, nexus_own, nexus_backend in results:
        print(name)
        print(f"{'  POST /infer -> response on Kafka':44}{ms(nexus, .5):9.2f}{ms(nexus, .99):9.2f}")
        print(f"{'  straight to the simulator (httpx)':44}{ms(baseline, .5):9.2f}{ms(baseline, .99):9.2f}")
        print(f"{'  added by Nexus (difference)':44}{ms(nexus, .5) - ms(baseline, .5):9.2f}"
              f"{ms(nexus, .99) - ms(baseline, .99):9.2f}")
        print(f"{'  Nexus end to end - backend_latency_ms':44}{ms(nexus_own, .5):9.2f}{ms(nexus_own, .99):9.2f}")
        print(f"{'  the worker call (backend_latency_ms)':44}{ms(nexus_backend, .5):9.2f}{ms(nexus_backend, .99):9.2f}")
        print(f"{'  ratio Nexus / straight':44}{ms(nexus, .5) / ms(baseline, .5):9.2f}"
              f"{ms(nexus, .99) / ms(baseline, .99):9.2f}")
    print("target (issue 6): added p50 < 5 ms, p99 < 25 ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--ttft-ms", type=int, default=50)
    parser.add_argument("--load", type=float, default=0.8)
    parser.add_argument("--bootstrap")
    args = parser.parse_args()
    run_on_broker(lambda b: measure(b, args.n, args.parallel, args.ttft_ms, args.load), args.bootstrap)


if __name__ == "__main__":
    main()
