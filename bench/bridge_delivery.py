"""The websocket bridge: delivery rate to many clients, and submit-to-token latency on the page.

    .venv/bin/python bench/bridge_delivery.py [--clients 500] [--results 20000]
        [--latency-runs 20] [--page-runs 10] [--bootstrap HOST:PORT]

1. Delivery: one ``nexus bridge`` (on topics of its own), ``--clients`` websocket clients each
   subscribed to its own session; ``--results`` results for those sessions are produced straight
   to Kafka as fast as the producer goes, and the clock runs from the first produce until every
   client has all of its results. Reports results/s delivered and the lag from a result's
   ``completed_at`` to its arrival at the client.
2. Latency: a simulator at ``--ttft-ms 200 --tokens-per-s 50``, a worker, the bridge and a
   gateway; a websocket client does what the page does (submit with ``stream: true`` over the
   socket, wait for the first token and the result), ``--latency-runs`` times one after another;
   then headless Chromium (Debian's ``chromium``, if installed) does it ``--page-runs`` times on
   the page itself, measured by the page's own clock.

Everything runs on this one machine (broker, bridge, worker, clients), so the numbers are an
upper bound on what a real deployment adds, not a capacity plan.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path

import httpx
from aiokafka import AIOKafkaProducer
from websockets.asyncio.client import ClientConnection, connect

from localdev.broker import LocalKafka, free_port
from nexus.settings import KafkaSettings
from nexus.kafka.topics import ensure_topics
from schemas import Codec, InferenceResponse, ModelContext, encode_response, utcnow

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Hello, world! Tell me about Kafka."
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values: list[float]) -> str:
    return (f"p50 {percentile(values, 0.5):7.1f} ms   p90 {percentile(values, 0.9):7.1f} ms   "
            f"max {max(values):7.1f} ms   mean {statistics.fmean(values):7.1f} ms")


class Roles:
    """``python -m nexus`` subprocesses sharing one environment; stopped together."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str) -> None:
        log = open(self.logs / f"{args[0]}-{len(self.procs)}.log", "wb")
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "nexus", *args], env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        ))
        log.close()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


async def wait_http(url: str, roles: Roles, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient() as http:
        while True:
            for proc in roles.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args} exited with {proc.returncode}; logs in {roles.logs}")
            try:
                await http.get(url, timeout=1)
                return
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url} never answered; logs in {roles.logs}") from None
                await asyncio.sleep(0.1)


@asynccontextmanager
async def stack(bootstrap: str, logs: Path, *, simulator: list[str] | None, worker: bool,
                gateway: bool) -> AsyncIterator[dict[str, str]]:
    """A bridge (and optionally a simulator, worker and gateway) on topics of their own."""
    run = uuid.uuid4().hex[:8]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    sim_port, bridge_port, gw_port = free_port(), free_port(), free_port()
    env.update(
        NEXUS_KAFKA_BOOTSTRAP=bootstrap, OLLAMA_HOST=f"http://127.0.0.1:{sim_port}",
        NEXUS_KAFKA_REQUESTS_TOPIC=f"bench-{run}.requests", NEXUS_KAFKA_RESPONSES_TOPIC=f"bench-{run}.responses",
        NEXUS_KAFKA_TOKENS_TOPIC=f"bench-{run}.tokens", NEXUS_KAFKA_DLQ_TOPIC=f"bench-{run}.dlq",
        NEXUS_WORKER_APP_ID=f"bench-bridge-{run}", NEXUS_WORKER_WEB_PORT=str(free_port()),
        NEXUS_BRIDGE_HOST="127.0.0.1", NEXUS_BRIDGE_PORT=str(bridge_port),
        NEXUS_GATEWAY_HOST="127.0.0.1", NEXUS_GATEWAY_PORT=str(gw_port), PYTHONUNBUFFERED="1",
    )
    roles = Roles(env, logs)
    try:
        if simulator is not None:
            roles.start("simulate-ollama", "--port", str(sim_port), *simulator)
            await wait_http(f"http://127.0.0.1:{sim_port}/", roles)
        roles.start("bridge")
        await wait_http(f"http://127.0.0.1:{bridge_port}/health", roles)
        env["BRIDGE_PID"] = str(roles.procs[-1].pid)
        if worker:
            roles.start("worker")
        if gateway:
            roles.start("gateway")
            await wait_http(f"http://127.0.0.1:{gw_port}/models", roles)
        yield {**env, "WS_URL": f"ws://127.0.0.1:{bridge_port}/ws", "GATEWAY_URL": f"http://127.0.0.1:{gw_port}"}
    finally:
        roles.stop()


# -- 1. delivery rate --------------------------------------------------------------------


def cpu_seconds(pid: str) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def produce(bootstrap: str, topic: str, prefix: str, clients: int, results: int, rate: float) -> None:
    """``--produce`` mode: ``results`` results round-robin over the sessions, at ``rate``/s (0: flat out)."""
    codec = Codec.from_directory()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=256 * 1024)
    await producer.start()
    try:
        started = time.perf_counter()
        futures = []
        for n in range(results):
            if rate and n % 100 == 0:  # pace in steps of 100 records
                ahead = n / rate - (time.perf_counter() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            session = f"{prefix}-{n % clients}"
            response = InferenceResponse(
                id=f"{session}-{n}", model_id="llama3.1", status="ok", context=ModelContext(session),
                latency_ms=1, completed_at=utcnow(), output="[simulated llama3.1] You said: a short answer",
            )
            futures.append(await producer.send(topic, encode_response(codec, response), key=session.encode()))
        await asyncio.gather(*futures)
        print(json.dumps({"seconds": time.perf_counter() - started}))
    finally:
        await producer.stop()


async def delivery(bootstrap: str, logs: Path, clients: int, results: int, rate: float) -> None:
    async with stack(bootstrap, logs, simulator=None, worker=False, gateway=False) as env:
        prefix = f"bench-{uuid.uuid4().hex[:8]}"
        sessions = [f"{prefix}-{i}" for i in range(clients)]
        expected = [results // clients + (1 if i < results % clients else 0) for i in range(clients)]
        received = [0] * clients
        wrong = 0
        lags: list[float] = []
        all_done = asyncio.Event()
        remaining = sum(1 for e in expected if e)

        async def client(i: int, ws: ClientConnection) -> None:
            nonlocal wrong, remaining
            marker = f'"session_id":"{sessions[i]}"'
            async for message in ws:
                now = time.time()
                if '"type":"result"' not in message:
                    continue
                if marker not in message:
                    wrong += 1
                received[i] += 1
                if received[i] % 10 == 1:  # sample the lag; parsing every frame would cost the clients
                    completed = json.loads(message)["completed_at"]
                    lags.append((now - datetime.fromisoformat(completed).timestamp()) * 1000)
                if received[i] == expected[i]:
                    remaining -= 1
                    if remaining == 0:
                        all_done.set()

        gate = asyncio.Semaphore(100)

        async def join(i: int) -> ClientConnection:
            async with gate:
                ws = await connect(env["WS_URL"], max_size=None)
                await ws.send(json.dumps({"type": "subscribe", "session_id": sessions[i]}))
                assert json.loads(await ws.recv())["type"] == "subscribed"
                return ws

        started = time.perf_counter()
        sockets = await asyncio.gather(*(join(i) for i in range(clients)))
        print(f"  {clients} clients connected and subscribed in {time.perf_counter() - started:.2f}s")
        readers = [asyncio.create_task(client(i, ws)) for i, ws in enumerate(sockets)]

        # The producer runs in a process of its own, so the clients' process only reads.
        bridge_cpu = cpu_seconds(env["BRIDGE_PID"])
        clients_cpu = time.process_time()
        started = time.perf_counter()
        producer = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--produce", bootstrap, env["NEXUS_KAFKA_RESPONSES_TOPIC"], prefix,
            str(clients), str(results), str(rate), stdout=asyncio.subprocess.PIPE, cwd=REPO,
        )
        try:
            await asyncio.wait_for(all_done.wait(), timeout=300)
            elapsed = time.perf_counter() - started
            bridge_cpu = cpu_seconds(env["BRIDGE_PID"]) - bridge_cpu
            clients_cpu = time.process_time() - clients_cpu
            out, _ = await producer.communicate()
            if producer.returncode:
                raise RuntimeError(f"the producer process failed with {producer.returncode}")
            produced = json.loads(out)["seconds"]
        finally:
            if producer.returncode is None:
                producer.kill()
            for task in readers:
                task.cancel()
            await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
        assert received == expected, "some client got a different number of results"
        assert wrong == 0, f"{wrong} results reached a client not subscribed to them"
        print(f"  producer process: {results} results in {produced:.2f}s ({results / produced:,.0f}/s, acks=all)")
        print(f"  delivered all {results} to their {clients} clients in {elapsed:.2f}s: "
              f"{results / elapsed:,.0f} results/s")
        print(f"  bridge CPU: {bridge_cpu:.2f}s for {results} results "
              f"({bridge_cpu / results * 1e6:.0f} us per result; {results / bridge_cpu:,.0f} results per CPU-second)")
        print(f"  the {clients} clients' process: {clients_cpu:.2f}s CPU in those {elapsed:.2f}s "
              f"(one core: {clients_cpu / elapsed:.0%}); the machine has {os.cpu_count()} cores for all of it")
        print(f"  lag completed_at -> client (sampled {len(lags)}): {summary(lags)}")


# -- 2. submit -> first token -> result --------------------------------------------------


async def latency_ws(ws_url: str, runs: int) -> tuple[list[float], list[float]]:
    ttfts: list[float] = []
    totals: list[float] = []
    async with connect(ws_url) as ws:
        for n in range(runs + 1):  # the first run warms the worker's group assignment up
            request_id = uuid.uuid4().hex
            started = time.perf_counter()
            await ws.send(json.dumps({
                "type": "submit", "id": request_id, "model_id": "llama3.1", "input": PROMPT, "stream": True,
                "context": {"session_id": f"bench-ws-{request_id[:6]}"},
            }))
            first = None
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
                if frame.get("id") != request_id:
                    continue
                if frame["type"] == "token" and first is None:
                    first = time.perf_counter()
                elif frame["type"] == "result":
                    done = time.perf_counter()
                    break
                elif frame["type"] == "error":
                    raise RuntimeError(frame)
            if n and first is not None:
                ttfts.append((first - started) * 1000)
                totals.append((done - started) * 1000)
    return ttfts, totals


async def latency_page(gateway_url: str, runs: int) -> tuple[list[float], list[float]] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        chromium = None
    if chromium is None:
        print("  (no chromium or playwright: page measurement skipped; apt-get install chromium)")
        return None
    ttfts: list[float] = []
    totals: list[float] = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.goto(gateway_url + "/")
            await page.wait_for_selector("#connection[data-state=open]", timeout=15_000)
            await page.select_option("#model", "llama3.1")
            await page.fill("#prompt", PROMPT)
            for n in range(runs + 1):
                previous = await page.evaluate("window.nexusPage.lastRun && window.nexusPage.lastRun.id")
                await page.click("#submit")
                await page.wait_for_function(
                    "prev => window.nexusPage.lastRun && window.nexusPage.lastRun.id !== prev", arg=previous,
                    timeout=60_000,
                )
                run = await page.evaluate("window.nexusPage.lastRun")
                if n and run["ttft_ms"] is not None:
                    ttfts.append(run["ttft_ms"])
                    totals.append(run["result_ms"])
                await page.wait_for_selector("#submit:not([disabled])")
        finally:
            await browser.close()
    return ttfts, totals


async def latency(bootstrap: str, logs: Path, runs: int, page_runs: int) -> None:
    simulator = ["--ttft-ms", "200", "--tokens-per-s", "50", "--parallel", "8"]
    async with stack(bootstrap, logs, simulator=simulator, worker=True, gateway=True) as env:
        ttfts, totals = await latency_ws(env["WS_URL"], runs)
        print(f"  websocket client, {len(totals)} runs (simulator --ttft-ms 200 --tokens-per-s 50):")
        print(f"    submit -> first token  {summary(ttfts)}")
        print(f"    submit -> result       {summary(totals)}")
        if page_runs:
            measured = await latency_page(env["GATEWAY_URL"], page_runs)
            if measured:
                ttfts, totals = measured
                print(f"  the page in headless Chromium, {len(totals)} runs (the page's own clock):")
                print(f"    submit -> first token  {summary(ttfts)}")
                print(f"    submit -> result       {summary(totals)}")


async def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--produce":
        bootstrap, topic, prefix, clients, results, rate = sys.argv[2:8]
        await produce(bootstrap, topic, prefix, int(clients), int(results), float(rate))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--results", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=0, help="results/s to produce (default 0: flat out)")
    parser.add_argument("--latency-runs", type=int, default=20)
    parser.add_argument("--page-runs", type=int, default=10)
    parser.add_argument("--bootstrap", help="an existing broker (default: start a local one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nexus-bench-bridge-") as tmp:
        logs = Path(tmp)
        kafka = None
        if args.bootstrap is None:
            kafka = LocalKafka(port=free_port(), data_dir=logs / "kafka")
            kafka.start()
        bootstrap = args.bootstrap or kafka.bootstrap  # type: ignore[union-attr]
        try:
            await ensure_topics(KafkaSettings(bootstrap=bootstrap))
            print(f"delivery: {args.results} results to {args.clients} websocket clients on one bridge")
            await delivery(bootstrap, logs, args.clients, args.results, args.rate)
            print("latency: submit over the websocket, streamed")
            await latency(bootstrap, logs, args.latency_runs, args.page_runs)
        finally:
            if kafka is not None:
                kafka.stop()


if __name__ == "__main__":
    asyncio.run(main())
