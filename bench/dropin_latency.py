"""Latency Nexus adds to a synchronous Ollama-API call, against the same call straight to the simulator.

    .venv/bin/python bench/dropin_latency.py [-n 200] [--bootstrap HOST:PORT]

Starts (unless --bootstrap) a local broker, then a simulator at --ttft-ms 0 --tokens-per-s 0,
a worker and a gateway on free ports and topics of their own. Sends N ``POST /api/generate``
calls with ``"stream": false``, one after another, to the gateway (gateway -> Kafka -> worker ->
simulator -> Kafka -> the gateway's reply reader -> answer) and the same N straight to the
simulator, and prints p50/p99 of each and the difference. The requests are not deterministic
(no temperature or seed), so the response cache never answers them. Everything runs on one
machine, so the difference is Nexus's overhead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid

import httpx

from common import percentile, role, run_on_broker, wait_http
from localdev.broker import free_port


async def measure(bootstrap: str, n: int) -> None:
    sim_port, gw_port = free_port(), free_port()
    run = uuid.uuid4().hex[:6]
    # Worker settings (e.g. NEXUS_WORKER_MAX_WAIT_MS) pass through, to compare windows.
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_") or k.startswith("NEXUS_WORKER_")}
    env.update(
        NEXUS_KAFKA_BOOTSTRAP=bootstrap, OLLAMA_HOST=f"http://127.0.0.1:{sim_port}",
        NEXUS_GATEWAY_PORT=str(gw_port), NEXUS_GATEWAY_HOST="127.0.0.1", NEXUS_WORKER_WEB_PORT=str(free_port()),
        NEXUS_WORKER_APP_ID=f"bench-{run}", NEXUS_KAFKA_REQUESTS_TOPIC=f"bench{run}.requests",
        NEXUS_KAFKA_RESPONSES_TOPIC=f"bench{run}.responses", NEXUS_KAFKA_TOKENS_TOPIC=f"bench{run}.tokens",
        NEXUS_KAFKA_DLQ_TOPIC=f"bench{run}.dlq", NEXUS_KAFKA_STATE_TOPIC=f"bench{run}.state",
    )
    procs = [role(["simulate-ollama", "--port", str(sim_port), "--ttft-ms", "0", "--tokens-per-s", "0"], env)]
    try:
        await wait_http(f"http://127.0.0.1:{sim_port}/")
        procs += [role(["worker"], env), role(["gateway"], env)]
        await wait_http(f"http://127.0.0.1:{gw_port}/api/version")
        body = {"model": "llama3.1", "prompt": "Hello, world!", "stream": False}
        async with httpx.AsyncClient(timeout=120) as http:

            async def call(base: str) -> float:
                started = time.perf_counter()
                reply = await http.post(f"{base}/api/generate", json=body)
                elapsed = time.perf_counter() - started
                reply.raise_for_status()
                assert reply.json()["response"] == "[simulated llama3.1] You said: Hello, world!", reply.text
                return elapsed

            nexus_url, sim_url = f"http://127.0.0.1:{gw_port}", f"http://127.0.0.1:{sim_port}"
            await call(nexus_url)  # the first one waits for the worker to join its group
            for _ in range(10):
                await call(nexus_url)
                await call(sim_url)
            nexus = [await call(nexus_url) for _ in range(n)]
            baseline = [await call(sim_url) for _ in range(n)]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()

    def ms(values: list[float], q: float) -> float:
        return percentile(values, q) * 1000

    print(f"{n} sequential POST /api/generate (stream false), simulator --ttft-ms 0 --tokens-per-s 0")
    print(f"{'':30}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for name, values in (("through Nexus (Ollama API)", nexus), ("straight to the simulator", baseline)):
        print(f"{name:30}{ms(values, .5):10.2f}{ms(values, .99):10.2f}{statistics.mean(values) * 1000:10.2f}")
    print(f"{'added by Nexus':30}{ms(nexus, .5) - ms(baseline, .5):10.2f}{ms(nexus, .99) - ms(baseline, .99):10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--bootstrap")
    args = parser.parse_args()
    run_on_broker(lambda bootstrap: measure(bootstrap, args.n), args.bootstrap)


if __name__ == "__main__":
    main()
