"""Throughput in tokens/s with a real model at client concurrency 1, 2, 4, 8: straight to Ollama vs through Nexus.

    .venv/bin/python bench/real_throughput.py [-r 12] [--tokens 32] [--bootstrap HOST:PORT]

Starts (unless --bootstrap) a local broker, the project's real Ollama (0.17.4, SmolLM2-135M,
see localdev/ollama.py) with ``OLLAMA_NUM_PARALLEL=4``, and a Nexus worker and gateway whose
one endpoint is that Ollama (``max_concurrency = 4``). For each concurrency C, R non-streamed
``POST /api/generate`` calls of ``--tokens`` tokens go out with C in flight at a time, first
straight to Ollama, then through Nexus's drop-in API; throughput is the generated tokens
(``eval_count``) over the wall time. Requests carry no seed, so the response cache never
answers them. Prints both, and Nexus's share of the best direct figure.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx

from common import isolated_env, role, run_on_broker, stop_all, wait_http
from localdev.ollama import MODEL_NAME, LocalOllama, free_port

CONCURRENCY = (1, 2, 4, 8)


async def measure(bootstrap: str, requests: int, tokens: int) -> None:
    ollama = LocalOllama(port=free_port(), env={"OLLAMA_NUM_PARALLEL": "4"})
    ollama.start()
    procs = []
    try:
        env, _ = isolated_env(bootstrap, ollama.url)
        port = free_port()
        config = f'[models."{MODEL_NAME}"]\nendpoints = [{{ url = "{ollama.url}", max_concurrency = 4 }}]\ntimeout_s = 300\n'
        path = Path(tempfile.mkdtemp(prefix="nexus-bench-")) / "nexus.toml"
        path.write_text(config)
        env.update(NEXUS_CONFIG=str(path), NEXUS_GATEWAY_PORT=str(port), NEXUS_GATEWAY_HOST="127.0.0.1")
        procs += [role(["worker"], env), role(["gateway"], env)]
        gateway = f"http://127.0.0.1:{port}"
        await wait_http(f"{gateway}/api/version")
        results: dict[tuple[str, int], float] = {}
        async with httpx.AsyncClient(timeout=600) as http:

            async def one(base: str, i: int) -> int:
                body = {"model": MODEL_NAME, "prompt": f"Write a short story about a robot, part {i}.",
                        "stream": False, "options": {"num_predict": tokens}}
                reply = await http.post(f"{base}/api/generate", json=body)
                reply.raise_for_status()
                return int(reply.json()["eval_count"])

            async def run(base: str, concurrency: int) -> float:
                gate = asyncio.Semaphore(concurrency)

                async def limited(i: int) -> int:
                    async with gate:
                        return await one(base, i)

                started = time.perf_counter()
                counts = await asyncio.gather(*(limited(i) for i in range(requests)))
                return sum(counts) / (time.perf_counter() - started)

            await one(ollama.url, -1)  # the model loaded
            await one(gateway, -2)  # the worker's group joined
            for concurrency in CONCURRENCY:
                results[("direct", concurrency)] = await run(ollama.url, concurrency)
                results[("nexus", concurrency)] = await run(gateway, concurrency)
    finally:
        stop_all(procs)
        ollama.stop()

    best = max(v for (path, _), v in results.items() if path == "direct")
    print(f"{requests} POST /api/generate of {tokens} tokens per run, real Ollama ({MODEL_NAME}, "
          "OLLAMA_NUM_PARALLEL=4), endpoint max_concurrency 4")
    print(f"{'concurrency':>12}{'direct tok/s':>14}{'nexus tok/s':>13}{'nexus/direct':>14}{'nexus/best':>12}")
    for c in CONCURRENCY:
        d, n = results[("direct", c)], results[("nexus", c)]
        print(f"{c:>12}{d:14.1f}{n:13.1f}{n / d:14.2f}{n / best:12.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-r", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--bootstrap")
    args = parser.parse_args()
    run_on_broker(lambda bootstrap: measure(bootstrap, args.r, args.tokens), args.bootstrap)


if __name__ == "__main__":
    main()
