"""Throughput in tokens/s with a real model at client concurrency 1, 2, 4, 8: straight to Ollama vs through Nexus.

    .venv/bin/python bench/real_throughput.py [-r 12] [--tokens 32] [--bootstrap HOST:PORT]

Starts (unless --bootstrap) a local broker, the project's real Ollama (0.17.4, SmolLM2-135M,
see localdev/ollama.py) with ``OLLAMA_NUM_PARALLEL=4``, and a Nexus worker and gateway whose
one endpoint is that Ollama (``max_concurrency = 4``). For each concurrency C, R non-streamed
``POST /api/generate`` calls of ``--tokens`` tokens go out with C in flight at a time, first
straight to Ollama, then through Nexus's drop-in API; throughput is the generated tokens
(``eval_count``) over the wall time. Requests carry no seed, so the response cache never
answers them. Prints both, Nexus's share of the best direct figure, and where the CPU went
during each run (the model, the worker, the gateway, the rest of the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import httpx

from common import cpu_seconds, descendants, isolated_env, role, run_on_broker, stop_all, wait_http
from localdev.ollama import MODEL_NAME, LocalOllama, free_port

CONCURRENCY = (1, 2, 4, 8)


def machine_busy_seconds() -> float:
    """CPU seconds every core spent busy so far (``/proc/stat``): the whole machine's work."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds spent by the model (Ollama and its runner), the worker, the gateway and the rest."""

    def __init__(self, ollama: int, worker: int, gateway: int) -> None:
        self._pids = {"worker": worker, "gateway": gateway}
        self._ollama = ollama

    def sample(self) -> dict[str, float]:
        out = {name: cpu_seconds(pid) for name, pid in self._pids.items()}
        out["model"] = sum(_cpu_or_zero(pid) for pid in descendants(self._ollama))
        out["machine"] = machine_busy_seconds()
        return out

    @staticmethod
    def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        used = {name: after[name] - before[name] for name in before}
        used["rest"] = used["machine"] - used["model"] - used["worker"] - used["gateway"]
        return used


def _cpu_or_zero(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except OSError:  # it ended between the listing and the reading
        return 0.0


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
        cpu: dict[tuple[str, int], dict[str, float]] = {}
        assert ollama.pid is not None
        meter = CpuMeter(ollama.pid, procs[0].pid, procs[1].pid)
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

                started, before = time.perf_counter(), meter.sample()
                counts = await asyncio.gather(*(limited(i) for i in range(requests)))
                elapsed = time.perf_counter() - started
                cpu[(base, concurrency)] = {k: v / elapsed for k, v in CpuMeter.spent(before, meter.sample()).items()}
                return sum(counts) / elapsed

            await one(ollama.url, -1)  # the model loaded
            await one(gateway, -2)  # the worker's group joined
            for concurrency in CONCURRENCY:
                results[("direct", concurrency)] = await run(ollama.url, concurrency)
                results[("nexus", concurrency)] = await run(gateway, concurrency)
    finally:
        stop_all(procs)
        ollama.stop()

    paths = {"direct": ollama.url, "nexus": gateway}
    best = max(v for (path, _), v in results.items() if path == "direct")
    print(f"{requests} POST /api/generate of {tokens} tokens per run, real Ollama ({MODEL_NAME}, "
          "OLLAMA_NUM_PARALLEL=4), endpoint max_concurrency 4")
    print(f"{'concurrency':>12}{'direct tok/s':>14}{'nexus tok/s':>13}{'nexus/direct':>14}{'nexus/best':>12}")
    for c in CONCURRENCY:
        d, n = results[("direct", c)], results[("nexus", c)]
        print(f"{c:>12}{d:14.1f}{n:13.1f}{n / d:14.2f}{n / best:12.2f}")
    print("\nCPU in use during each run, in cores (of 2): the model (Ollama and its runner), Nexus's roles, the rest "
          "(broker, this client, the machine)")
    print(f"{'concurrency':>12}{'path':>8}{'model':>8}{'worker':>8}{'gateway':>9}{'rest':>7}{'machine':>9}")
    for c in CONCURRENCY:
        for path, base in paths.items():
            used = cpu[(base, c)]
            print(f"{c:>12}{path:>8}{used['model']:8.2f}{used['worker']:8.2f}{used['gateway']:9.2f}"
                  f"{used['rest']:7.2f}{used['machine']:9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-r", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--bootstrap")
    args = parser.parse_args()
    run_on_broker(lambda bootstrap: measure(bootstrap, args.r, args.tokens), args.bootstrap)


if __name__ == "__main__":
    main()
