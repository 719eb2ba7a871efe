"""Batching goodput: does Nexus keep every slot of a backend busy?

    .venv/bin/python bench/goodput.py [-n 200] [--parallel 4] [--ttft-ms 200] [--bootstrap HOST:PORT]

Starts (unless --bootstrap) a local broker, a simulator with --parallel slots and a fixed
service time (--ttft-ms, --tokens-per-s 0), and a worker configured with ``max_concurrency =
--parallel`` for it, on topics of their own. The ideal is parallel / service time answers/s
(4 / 200 ms = 20/s). N requests are submitted at once through the producer API and timed until
the last answer is read; goodput = N / that time. The baseline is a one-at-a-time caller
(sequential httpx straight to the simulator), which can use one slot: 1/parallel of the ideal.
Target of issue 6: Nexus at least 95 % of the ideal.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from common import isolated_env, role, run_on_broker, stop_all, wait_http
from localdev.broker import free_port
from nexus.kafka.topics import ensure_topics
from producers.client import RequestProducer
from schemas import InferenceRequest, ModelContext


async def measure(bootstrap: str, n: int, parallel: int, ttft_ms: int) -> None:
    sim_port = free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "nexus.toml"
        config.write_text(f'[models."llama3.1"]\nendpoints = [{{ url = "{sim_url}", max_concurrency = {parallel} }}]\n')
        env, kafka = isolated_env(bootstrap, sim_url, config)
        await ensure_topics(kafka)
        procs = [role(["simulate-ollama", "--port", str(sim_port), "--ttft-ms", str(ttft_ms),
                       "--tokens-per-s", "0", "--parallel", str(parallel), "--max-queue", "10000"], env)]
        try:
            await wait_http(f"{sim_url}/")
            procs.append(role(["worker"], env))
            run = uuid.uuid4().hex[:8]
            async with RequestProducer(kafka) as producer:
                # Warm-up: the worker has joined its group once this is answered.
                await producer.submit_and_wait(InferenceRequest(f"{run}-warm", "llama3.1", "warm up",
                                                                ModelContext(f"{run}-w")), 120)
                requests = [InferenceRequest(f"{run}-{i}", "llama3.1", f"question {i}", ModelContext(f"{run}-s{i % 50}"))
                            for i in range(n)]
                started = time.perf_counter()
                responses = await producer.submit_many_and_wait(requests, timeout_s=600)
                nexus_s = time.perf_counter() - started
            ok = sum(r.status == "ok" for r in responses)
            sequential_n = max(10, n // 10)
            async with httpx.AsyncClient(timeout=60) as http:
                started = time.perf_counter()
                for i in range(sequential_n):
                    reply = await http.post(f"{sim_url}/api/generate", json={
                        "model": "llama3.1", "prompt": f"question {i}", "stream": False})
                    reply.raise_for_status()
                sequential_s = time.perf_counter() - started
        finally:
            stop_all(procs)

    ideal = parallel / (ttft_ms / 1000)
    nexus, one_at_a_time = ok / nexus_s, sequential_n / sequential_s
    print(f"simulator --parallel {parallel} --ttft-ms {ttft_ms} --tokens-per-s 0: ideal {ideal:.1f} answers/s")
    print(f"  Nexus, {n} at once (max_concurrency {parallel}): {ok} ok in {nexus_s:.2f} s = {nexus:6.2f}/s "
          f"= {nexus / ideal:6.1%} of ideal (target >= 95%)")
    print(f"  one-at-a-time httpx, {sequential_n} calls:        {sequential_s:.2f} s = {one_at_a_time:6.2f}/s "
          f"= {one_at_a_time / ideal:6.1%} of ideal (1/{parallel} = {1 / parallel:.1%})")
    print(f"  Nexus / one-at-a-time: {nexus / one_at_a_time:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--ttft-ms", type=int, default=200)
    parser.add_argument("--bootstrap")
    args = parser.parse_args()
    run_on_broker(lambda b: measure(b, args.n, args.parallel, args.ttft_ms), args.bootstrap)


if __name__ == "__main__":
    main()
