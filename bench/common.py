"""Helpers shared by the benchmarks: start Nexus's roles as real processes, wait for them, percentiles.

Every benchmark runs the roles the way an operator does (``python -m nexus <role>`` with
``NEXUS_*`` settings), so what is measured is the shipped code, not an in-process imitation.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from aiokafka.admin import AIOKafkaAdminClient

from localdev.broker import LocalKafka, free_port
from nexus.settings import KafkaSettings

REPO = Path(__file__).resolve().parent.parent
# Downloads and builds (Kafka's jars, the real Ollama) in the checkout's ignored .cache, as `make` does.
os.environ.setdefault("NEXUS_HOME", str(REPO / ".cache"))


def percentile(values: list[float], q: float) -> float:
    """The q-quantile by nearest rank: the same definition in every benchmark, so they compare."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def role(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``python -m nexus <args>`` from the repository, its output discarded."""
    return subprocess.Popen(
        [sys.executable, "-m", "nexus", *args], env=env, cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """Terminate every started role and wait for each, so no process outlives the benchmark."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_http(url: str) -> None:
    """Return once ``url`` answers at all (any status): the role is listening."""
    async with httpx.AsyncClient() as http:
        for _ in range(600):
            try:
                await http.get(url, timeout=1)
                return
            except httpx.HTTPError:
                await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} never answered")


def isolated_env(bootstrap: str, ollama_host: str, config: Path | None = None) -> tuple[dict[str, str], KafkaSettings]:
    """Environment for roles on topics and a group of their own, and the matching KafkaSettings.

    Fresh topics per run keep one benchmark's backlog out of the next one's numbers.
    """
    run = uuid.uuid4().hex[:6]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("NEXUS_") or k.startswith("NEXUS_WORKER_") or k == "NEXUS_HOME"}
    topics = {"requests": f"bench{run}.requests", "responses": f"bench{run}.responses",
              "tokens": f"bench{run}.tokens", "dlq": f"bench{run}.dlq", "state": f"bench{run}.state"}
    env.update(
        NEXUS_KAFKA_BOOTSTRAP=bootstrap, OLLAMA_HOST=ollama_host,
        NEXUS_WORKER_WEB_PORT=str(free_port()), NEXUS_WORKER_APP_ID=f"bench-{run}",
        **{f"NEXUS_KAFKA_{name.upper()}_TOPIC": topic for name, topic in topics.items()},
    )
    if config is not None:
        env["NEXUS_CONFIG"] = str(config)
    kafka = KafkaSettings(bootstrap=bootstrap, requests_topic=topics["requests"],
                          responses_topic=topics["responses"], tokens_topic=topics["tokens"],
                          dlq_topic=topics["dlq"], state_topic=topics["state"])
    return env, kafka


@contextmanager
def broker(bootstrap: str | None) -> Iterator[str]:
    """The given cluster, or a fresh local single-node broker for the duration."""
    if bootstrap:
        yield bootstrap
        return
    with tempfile.TemporaryDirectory() as data, LocalKafka(port=free_port(), data_dir=Path(data)) as kafka:
        yield kafka.bootstrap


def run_on_broker(measure: Callable[[str], Awaitable[None]], bootstrap: str | None) -> None:
    """Run ``measure(bootstrap)`` on --bootstrap or on a local broker started for it.

    On --bootstrap the run's own topics (:func:`isolated_env`'s, and its workers' Faust topics)
    are deleted afterwards: they would pile up run after run, and every client's metadata and the
    broker's own work grow with them, skewing the next runs' numbers."""
    with broker(bootstrap) as address:
        before = asyncio.run(_bench_topics(address)) if bootstrap else set()
        try:
            asyncio.run(measure(address))  # type: ignore[arg-type]
        finally:
            if bootstrap:
                asyncio.run(_delete_topics(address, asyncio.run(_bench_topics(address)) - before))


_BENCH_TOPIC = re.compile(r"^bench(-?)[0-9a-f]{6}[.-]")  # isolated_env's names and its app ids'


async def _bench_topics(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return {t for t in await admin.list_topics() if _BENCH_TOPIC.match(t)}
    finally:
        await admin.close()


async def _delete_topics(bootstrap: str, topics: set[str]) -> None:
    if not topics:
        return
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(sorted(topics))
    finally:
        await admin.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far (Linux /proc): tells which role is the bottleneck."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """``pid`` and every process under it (e.g. Ollama's server and its model runner)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def pin(pid: int, cores: set[int]) -> None:
    """Every thread of ``pid`` and of the processes under it onto ``cores``.

    ``os.sched_setaffinity(pid)`` moves one thread only; a Go server starts its children
    from any of its threads, so each thread is moved, and children started later inherit it.
    """
    for process in descendants(pid):
        for task in Path(f"/proc/{process}/task").glob("*"):
            try:
                os.sched_setaffinity(int(task.name), cores)
            except OSError:  # the thread ended meanwhile
                pass
