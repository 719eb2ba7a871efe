"""Nexus's routing against weighted round-robin, on two real Ollamas of different speed.

    .venv/bin/python bench/real_routing.py [-r 24] [--tokens 32] [-c 8] [--rounds 2] [--slots 1]
                                           [--bootstrap HOST:PORT]

Starts (unless --bootstrap) a local broker, two of the project's real Ollamas (0.17.4,
SmolLM2-135M, see localdev/ollama.py) pinned to a core each, every thread: ``fast`` on core 0
(with this client, the broker and Nexus's roles), ``slow`` on core 1, which it shares with a
busy loop started for the purpose, so it gets about half a core. Each runs one request at a
time (``OLLAMA_NUM_PARALLEL=1``: on this CPU four parallel sequences give fewer tokens/s than
one) with one thread (``num_thread`` 1 in every request's options), behind Ollama's default
queue. A first version made the slow one slower by fewer slots (1 against 4), and the two
unpinned runners starved each other: it measured nothing.

Nexus (a worker and a gateway) has both as endpoints of the model, configured alike (weight
1, ``max_concurrency`` = ``--slots``, ``retries = 2``): which one is slower, it has to learn.
Two dispatchers, one after the other, a round each in turn (WRR, Nexus, WRR, Nexus):

- Nexus: the client's non-streamed ``POST /api/generate`` to the gateway's drop-in API;
  which endpoint served a request is read from the worker's ``/metrics``
  (``nexus_worker_backend_requests_total`` before and after the round).
- weighted RR, the baseline: the same calls straight to the two Ollamas with httpx, nginx's
  smooth weighted round-robin with the same weights (1:1), ``--slots`` requests at once per
  endpoint (a request waits for the slot of the endpoint its turn named), a failure retried
  on the next endpoint, up to 2 retries. No Kafka in its path.

With ``--slots 1`` (the default, each Ollama's own parallelism) requests beyond the two
running wait where a dispatcher can still choose; with more, they queue inside the Ollamas.

Each round sends R requests of ``--tokens`` tokens, distinct prompts, no seed (so Nexus's
response cache never answers), with C in flight at a time. Both Ollamas (the model loaded)
and Nexus (its worker's group joined) get a call first. Prints per round and over all
rounds: tokens/s (the answers' ``eval_count`` over the wall time), p50 and p99 latency per
request (from its send to its answer), errors, the requests each Ollama served and the
failed calls to each (retried), then Nexus/WRR for tokens/s and p99. The numbers are of one
run on one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from common import isolated_env, percentile, pin, role, run_on_broker, stop_all, wait_http
from localdev.ollama import MODEL_NAME, LocalOllama, free_port

CORES = {"slow": 1, "fast": 0}  # the core each Ollama (and its runner) is pinned to; slow listed first
HOG_CORE = 1  # a busy loop shares this core with the slow Ollama
RETRIES = 2
TIMEOUT_S = 300


@dataclass
class Run:
    dispatcher: str
    label: str
    tokens: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    served: Counter[str] = field(default_factory=Counter)  # endpoint name -> requests answered
    failed: Counter[str] = field(default_factory=Counter)  # endpoint name -> calls that failed

    def add(self, other: Run) -> None:
        self.tokens += other.tokens
        self.elapsed += other.elapsed
        self.latencies += other.latencies
        self.errors += other.errors
        self.served += other.served
        self.failed += other.failed

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed if self.elapsed else 0.0

    def seconds(self, q: float) -> float:
        return percentile(self.latencies, q) if self.latencies else float("nan")


def body(prompt: str, tokens: int) -> dict[str, object]:
    # One thread per runner: llama.cpp's threads spin while they wait, so two runners of two threads
    # each on a 2-core machine starve each other (0.7 tokens/s in all). Nexus passes the option on.
    return {"model": MODEL_NAME, "prompt": prompt, "stream": False, "options": {"num_predict": tokens, "num_thread": 1}}


async def drive(run: Run, prompts: list[str], concurrency: int, call: Callable[[str], Awaitable[int]]) -> Run:
    """Send every prompt through ``call`` (which returns the answer's eval_count) with ``concurrency`` in flight."""
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt: str) -> None:
        async with gate:
            sent = time.perf_counter()
            try:
                count = await call(prompt)  # not `run.tokens += await ...`: that reads the total before the await
            except (httpx.HTTPError, KeyError, ValueError):
                run.errors += 1
                return
            run.tokens += count
            run.latencies.append(time.perf_counter() - sent)

    started = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    run.elapsed = time.perf_counter() - started
    return run


class WeightedRoundRobin:
    """nginx's smooth weighted round-robin, a slot limit per endpoint, and a failed request
    moved to the next endpoint of the list. It knows nothing of speed or health."""

    def __init__(self, http: httpx.AsyncClient, urls: dict[str, str], weights: dict[str, int], slots: int,
                 retries: int) -> None:
        self._http = http
        self._names = list(urls)
        self._urls = urls
        self._weights = weights
        self._slots = {name: asyncio.Semaphore(slots) for name in urls}
        self._current = {name: 0 for name in urls}
        self._retries = retries
        self.served: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()

    def _next(self) -> int:
        total = 0
        for name in self._names:
            self._current[name] += self._weights[name]
            total += self._weights[name]
        best = max(range(len(self._names)), key=lambda i: self._current[self._names[i]])
        self._current[self._names[best]] -= total
        return best

    async def generate(self, prompt: str, tokens: int) -> int:
        """The answer's eval_count; raises the last failure when every attempt failed."""
        index = self._next()
        failure: Exception = RuntimeError("no attempt")
        for _ in range(self._retries + 1):
            name = self._names[index]
            async with self._slots[name]:
                try:
                    reply = await self._http.post(f"{self._urls[name]}/api/generate", json=body(prompt, tokens))
                    reply.raise_for_status()
                    count = int(reply.json()["eval_count"])
                    self.served[name] += 1
                    return count
                except (httpx.HTTPError, KeyError, ValueError) as exc:
                    self.failed[name] += 1
                    failure = exc
            index = (index + 1) % len(self._names)
        raise failure


async def backend_calls(http: httpx.AsyncClient, metrics_url: str, names: dict[str, str]) -> dict[str, Counter[str]]:
    """The worker's calls so far per outcome ("ok", "error") and endpoint name, from its Prometheus page."""
    calls: dict[str, Counter[str]] = {"ok": Counter(), "error": Counter()}
    text = (await http.get(metrics_url)).text
    for family in text_string_to_metric_families(text):
        if family.name != "nexus_worker_backend_requests":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("outcome") in calls:
                name = names.get(sample.labels["endpoint"], sample.labels["endpoint"])
                calls[sample.labels["outcome"]][name] += int(sample.value)
    return calls


def config_toml(urls: dict[str, str], slots: int) -> str:
    tables = ", ".join(f'{{ url = "{url}", weight = 1, max_concurrency = {slots} }}' for url in urls.values())
    return f'[models."{MODEL_NAME}"]\nendpoints = [{tables}]\nretries = {RETRIES}\ntimeout_s = {TIMEOUT_S}\n'


async def measure(bootstrap: str, requests: int, tokens: int, concurrency: int, rounds: int, slots: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="nexus-bench-"))
    ollamas = {name: LocalOllama(port=free_port(), env={"OLLAMA_NUM_PARALLEL": "1"},
                                 log_path=work / f"ollama-{name}.log") for name in CORES}
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    os.sched_setaffinity(hog.pid, {HOG_CORE})
    procs = [hog]
    runs: list[Run] = []
    try:
        for name, ollama in ollamas.items():
            ollama.start()
            assert ollama.pid is not None
            pin(ollama.pid, {CORES[name]})
        urls = {name: ollama.url for name, ollama in ollamas.items()}
        names = {url: name for name, url in urls.items()}
        env, _ = isolated_env(bootstrap, urls["fast"])
        port = free_port()
        (work / "nexus.toml").write_text(config_toml(urls, slots))
        env.update(NEXUS_CONFIG=str(work / "nexus.toml"), NEXUS_GATEWAY_PORT=str(port),
                   NEXUS_GATEWAY_HOST="127.0.0.1")
        procs += [role(["worker"], env), role(["gateway"], env)]
        gateway = f"http://127.0.0.1:{port}"
        metrics_url = f"http://127.0.0.1:{env['NEXUS_WORKER_WEB_PORT']}/metrics"
        await wait_http(f"{gateway}/api/version")
        await wait_http(metrics_url)
        async with httpx.AsyncClient(timeout=TIMEOUT_S * (RETRIES + 1)) as http:

            async def nexus(prompt: str) -> int:
                reply = await http.post(f"{gateway}/api/generate", json=body(prompt, tokens))
                reply.raise_for_status()
                return int(reply.json()["eval_count"])

            for i, url in enumerate(urls.values()):  # the model loaded in each Ollama
                (await http.post(f"{url}/api/generate", json=body(f"Say hello, {i}.", tokens))).raise_for_status()
            for name, ollama in ollamas.items():  # its runner too, now that it runs
                assert ollama.pid is not None
                pin(ollama.pid, {CORES[name]})
            await nexus("Say hello, Nexus.")  # the worker's group joined
            serial = itertools.count()  # distinct prompts across rounds and dispatchers: no prompt cache helps
            for n in range(1, rounds + 1):
                wrr = WeightedRoundRobin(http, urls, {name: 1 for name in urls}, slots, RETRIES)
                prompts = [f"Write a short story about a robot, part {next(serial)}." for _ in range(requests)]
                call = partial(wrr.generate, tokens=tokens)
                run = await drive(Run("weighted RR", str(n)), prompts, concurrency, call)
                run.served, run.failed = wrr.served, wrr.failed
                runs.append(run)

                before = await backend_calls(http, metrics_url, names)
                prompts = [f"Write a short story about a robot, part {next(serial)}." for _ in range(requests)]
                run = await drive(Run("Nexus", str(n)), prompts, concurrency, nexus)
                after = await backend_calls(http, metrics_url, names)
                run.served, run.failed = after["ok"] - before["ok"], after["error"] - before["error"]
                runs.append(run)
    finally:
        stop_all(procs)
        for ollama in ollamas.values():
            ollama.stop()

    report(runs, requests, tokens, concurrency, slots, work)


def report(runs: list[Run], requests: int, tokens: int, concurrency: int, slots: int, work: Path) -> None:
    totals = {d: Run(d, "all") for d in ("weighted RR", "Nexus")}
    for run in runs:
        totals[run.dispatcher].add(run)
    rows = runs + list(totals.values()) if len(runs) > 2 else runs
    print(f"{requests} POST /api/generate of {tokens} tokens per round, {concurrency} in flight; real Ollamas "
          f"({MODEL_NAME}), 1 slot each, fast alone on a core, slow sharing one with a busy loop; "
          f"both weight 1, {slots} in flight per endpoint, "
          f"{RETRIES} retries (logs in {work})")
    print(f"{'dispatcher':14}{'round':>6}{'tok/s':>8}{'p50 s':>8}{'p99 s':>8}{'errors':>8}"
          f"{'fast':>6}{'slow':>6}{'failed fast':>13}{'failed slow':>13}")
    for r in rows:
        print(f"{r.dispatcher:14}{r.label:>6}{r.tokens_per_s:8.1f}{r.seconds(.5):8.2f}{r.seconds(.99):8.2f}"
              f"{r.errors:8d}{r.served['fast']:6d}{r.served['slow']:6d}{r.failed['fast']:13d}{r.failed['slow']:13d}")
    wrr, nexus = totals["weighted RR"], totals["Nexus"]
    if wrr.tokens and nexus.tokens:
        print(f"Nexus / weighted RR: tokens/s {nexus.tokens_per_s / wrr.tokens_per_s:.2f}, "
              f"p99 {nexus.seconds(.99) / wrr.seconds(.99):.2f} (over all rounds)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-r", type=int, default=24, help="requests per round and dispatcher")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("-c", type=int, default=8, help="requests in flight from the client")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of WRR then Nexus")
    parser.add_argument("--slots", type=int, default=1,
                        help="requests in flight per endpoint (Nexus's max_concurrency, the baseline's limit); "
                             "1 is each Ollama's own parallelism: the rest wait where a dispatcher can choose")
    parser.add_argument("--bootstrap")
    args = parser.parse_args()
    # Everything but the two Ollamas and the busy loop (this client, the broker, the roles) on core 0,
    # with the fast Ollama: the slow one's core holds only it and the loop.
    os.sched_setaffinity(0, {CORES["fast"]})
    run_on_broker(lambda bootstrap: measure(bootstrap, args.r, args.tokens, args.c, args.rounds, args.slots), args.bootstrap)


if __name__ == "__main__":
    main()
