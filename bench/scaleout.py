"""Requests/s through the whole pipeline with 1, 2 and 4 worker processes, on a 3-broker cluster.

    .venv/bin/python bench/scaleout.py [-n 3000] [--workers 1,2,4] [--models 8] [--nodes 3] [--bootstrap HOST:PORT,...]

Starts (unless --bootstrap) a local 3-node KRaft cluster (``localdev.cluster``) and a
zero-latency simulator (``--ttft-ms 0 --tokens-per-s 0 --parallel 64``). For each worker count
it creates topics of its own (8 partitions, replication factor 3, min ISR 2), starts that many
``python -m nexus worker`` processes in one group, waits until the group is stable with all of
them, and feeds N requests through the producer API exactly as bench/throughput.py does (same
``drive``), timed from the first submit to the N-th response read.

Requests are keyed by model id, so a partition carries traffic only if some model hashes to it:
``--models 8`` (the default) picks 8 model ids that hash to the 8 different partitions, the best
case for scale-out; ``--models 2`` is the two default models, which use at most 2 partitions, so
at most 2 workers have work whatever the count.

``--nodes 1`` runs the same on a 1-node cluster with replication factor 1: the price of
replication, measured on the same machine at the same time.

Prints one row per worker count: requests/s, the ratio to 1 worker, and the CPU seconds each
kind of process used during the timed part (workers, simulator, brokers, this driver) with
their sum over the elapsed time: how many cores the run's processes kept busy, next to how many
were busy machine-wide (from /proc/stat), since a shared machine's other load takes cores too.
Also the brokers' idle CPU and the load average. The workers' logs (info level: rebalances and
assignments) are kept in ``.cache/bench-logs/scaleout/<group>/``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import CoordinatorNotAvailableError
from aiokafka.partitioner import murmur2

from common import REPO, cpu_seconds, isolated_env, role, stop_all, wait_http
from localdev.cluster import LocalKafkaCluster
from localdev.broker import free_port
from nexus.settings import KafkaSettings
from nexus.kafka.topics import ensure_topics
from throughput import drive

PARTITIONS = 8
LOGS_DIR = REPO / ".cache" / "bench-logs" / "scaleout"
STALL_S = 60  # plus 0.1 s per request: far beyond any healthy run here, so only a stall trips it


class StalledRun(RuntimeError):
    """The workers stopped answering: the run measures a hang, not a rate."""


def logged_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``python -m nexus worker --loglevel info`` with its output in ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "nexus", "worker", "--loglevel", "info"], env=env,
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


def models_on_distinct_partitions(count: int, partitions: int = PARTITIONS) -> tuple[str, ...]:
    """``count`` model ids whose keys land on different partitions (Kafka's default partitioner)."""
    chosen: dict[int, str] = {}
    i = 0
    while len(chosen) < min(count, partitions):
        name = f"model-{i}"
        chosen.setdefault((murmur2(name.encode()) & 0x7FFFFFFF) % partitions, name)
        i += 1
    return tuple(chosen.values())


@contextmanager
def cluster(bootstrap: str | None, nodes: int) -> Iterator[tuple[str, list[int]]]:
    """The given cluster (its broker CPU is not measured), or a fresh local one of ``nodes``;
    yields the bootstrap and the brokers' pids."""
    if bootstrap:
        yield bootstrap, []
        return
    with tempfile.TemporaryDirectory() as data, LocalKafkaCluster(Path(data), nodes=nodes) as kafka:
        yield kafka.bootstrap, [node.pid for node in kafka.nodes if node.pid is not None]


async def wait_group(bootstrap: str, group: str, members: int, timeout: float = 120) -> None:
    """Return once ``group`` is Stable with exactly ``members`` members: no rebalance is pending."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        state, group_members = "no coordinator yet", []
        while True:
            try:  # the first group of a cluster waits for __consumer_offsets to be created
                [response] = await admin.describe_consumer_groups([group])
                [(_error, _group, state, _protocol_type, _protocol, group_members, *_)] = response.groups
            except CoordinatorNotAvailableError:
                pass
            if state == "Stable" and len(group_members) == members:
                return
            if loop.time() > deadline:
                raise TimeoutError(f"group {group}: {state} with {len(group_members)} of {members} workers")
            await asyncio.sleep(0.5)  # poll interval while the workers join
    finally:
        await admin.close()


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent not idle since boot (/proc/stat): ours and everyone else's."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class MachineLoad:
    """Samples the machine's busy CPU in the background, to tell afterwards how busy all cores
    were over the last ``seconds``: whether the box itself was the limit, and how much of it
    others took."""

    def __init__(self, interval: float = 0.25) -> None:
        self._interval = interval
        self._samples: list[tuple[float, float]] = []
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self._samples.append((time.monotonic(), machine_busy_seconds()))
            await asyncio.sleep(self._interval)  # the sampling period

    def start(self) -> None:
        self._task = asyncio.create_task(self._sample())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def cores_busy_over_last(self, seconds: float) -> float:
        now, busy_now = time.monotonic(), machine_busy_seconds()
        since = now - seconds
        at, busy = min(self._samples, key=lambda sample: abs(sample[0] - since))
        return (busy_now - busy) / (now - at)


async def idle_cores(pids: list[int], seconds: float = 5.0) -> float:
    """Cores the processes use doing nothing (the brokers' heartbeats and fetch polls): their floor."""
    before = [cpu_seconds(pid) for pid in pids]
    await asyncio.sleep(seconds)  # the measuring interval itself
    return sum(cpu_seconds(pid) - b for pid, b in zip(pids, before)) / seconds


async def uncommitted(kafka: KafkaSettings, group: str) -> dict[int, tuple[int, int]]:
    """Requests partitions whose committed offset is behind their end: where a stall is."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    reader = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, group_id=None)
    await admin.start()
    await reader.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        tps = [TopicPartition(kafka.requests_topic, p) for p in range(PARTITIONS)]
        ends = await reader.end_offsets(tps)
    finally:
        await reader.stop()
        await admin.close()
    done = {tp: committed[tp].offset if tp in committed else -1 for tp in tps}
    return {tp.partition: (done[tp], ends[tp]) for tp in tps if done[tp] < ends[tp]}


@dataclasses.dataclass
class Row:
    workers: int
    rate: float
    elapsed: float
    cpu: dict[str, float]  # CPU seconds by kind of process during the timed part
    machine_cores: float  # cores busy machine-wide meanwhile, other sessions' work included


async def run_one(bootstrap: str, broker_pids: list[int], sim_url: str, sim_pid: int, config: Path,
                  workers: int, n: int, models: tuple[str, ...], replication: int) -> Row:
    env, kafka = isolated_env(bootstrap, sim_url, config)
    env["NEXUS_KAFKA_REPLICATION_FACTOR"] = str(replication)
    env["NEXUS_KAFKA_PARTITIONS"] = str(PARTITIONS)
    kafka = dataclasses.replace(kafka, partitions=PARTITIONS, replication_factor=replication)
    await ensure_topics(kafka)
    # One group (the app id), a web port each; their logs kept, at info level (rebalances and
    # assignments), so a stalled run can be explained afterwards.
    logs = LOGS_DIR / env["NEXUS_WORKER_APP_ID"]
    logs.mkdir(parents=True, exist_ok=True)
    procs = [logged_worker({**env, "NEXUS_WORKER_WEB_PORT": str(free_port())}, logs / f"worker-{i}.log")
             for i in range(workers)]
    machine = MachineLoad()
    try:
        await wait_group(bootstrap, env["NEXUS_WORKER_APP_ID"], workers)
        pids = [p.pid for p in procs] + [sim_pid] + broker_pids + [os.getpid()]
        machine.start()
        try:
            rate, cpu = await asyncio.wait_for(drive(kafka, n, pids, models), timeout=STALL_S + n / 10)
        except TimeoutError:
            behind = await uncommitted(kafka, env["NEXUS_WORKER_APP_ID"])
            raise StalledRun(
                f"{workers} workers did not answer {n} requests in {STALL_S + n / 10:.0f}s; requests partitions "
                f"with uncommitted requests (partition: committed, end): {behind}; probably assigned but not "
                f"consumed (see docs/performance.md, Scale-out); the workers' logs are in {logs}"
            ) from None
        machine_cores = machine.cores_busy_over_last(n / rate)
    finally:
        machine.stop()
        stop_all(procs)
    cpu_by_kind = {
        "workers": sum(cpu[:workers]),
        "simulator": cpu[workers],
        "brokers": sum(cpu[workers + 1:workers + 1 + len(broker_pids)]),
        "driver": cpu[-1],
    }
    return Row(workers, rate, n / rate, cpu_by_kind, machine_cores)


async def measure(bootstrap: str, broker_pids: list[int], n: int, counts: list[int], models: tuple[str, ...],
                  replication: int) -> None:
    sim_port = free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "nexus.toml"
        config.write_text("".join(
            f'[models."{model}"]\nendpoints = [{{ url = "{sim_url}", max_concurrency = 64 }}]\n'
            for model in models))
        simulator = role(["simulate-ollama", "--port", str(sim_port), "--models", ",".join(models),
                          "--ttft-ms", "0", "--tokens-per-s", "0", "--parallel", "64", "--max-queue", "100000"],
                         dict(os.environ))
        try:
            await wait_http(f"{sim_url}/")
            idle = await idle_cores(broker_pids)
            for workers in counts:
                rows.append(await run_one(bootstrap, broker_pids, sim_url, simulator.pid, config, workers, n, models,
                                             replication))
                print(f"  {workers} worker(s): {rows[-1].rate:.0f} requests/s", flush=True)
        finally:
            stop_all([simulator])

    base = rows[0].rate
    brokers = f"{len(broker_pids)} local broker(s)" if broker_pids else "brokers not measured (--bootstrap)"
    used = len({(murmur2(m.encode()) & 0x7FFFFFFF) % PARTITIONS for m in models})
    print(f"\n{n} requests per run, {len(models)} models (keys) on {used} of {PARTITIONS} partitions, "
          f"replication {replication}, {brokers}, {os.cpu_count()} cores, "
          f"simulator --ttft-ms 0 --tokens-per-s 0 --parallel 64")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f}; brokers idle: {idle:.2f} cores")
    print("| workers | requests/s | vs 1 worker | CPU s: workers | simulator | brokers | driver | cores: ours | machine |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        c = row.cpu
        print(f"| {row.workers} | {row.rate:.0f} | {row.rate / base:.2f} | {c['workers']:.1f} | {c['simulator']:.1f} "
              f"| {c['brokers']:.1f} | {c['driver']:.1f} | {sum(c.values()) / row.elapsed:.2f} "
              f"| {row.machine_cores:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=3000)
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts (first is the baseline)")
    parser.add_argument("--models", type=int, default=8,
                        help="models (keys) to spread the requests over; 2 = the default llama3.1 and mistral")
    parser.add_argument("--nodes", type=int, default=3, help="brokers of the local cluster; replication min(3, nodes)")
    parser.add_argument("--bootstrap", help="an existing cluster of at least --nodes brokers")
    args = parser.parse_args()
    counts = [int(c) for c in args.workers.split(",")]
    models = ("llama3.1", "mistral") if args.models == 2 else models_on_distinct_partitions(args.models)
    with cluster(args.bootstrap, args.nodes) as (bootstrap, broker_pids):
        asyncio.run(measure(bootstrap, broker_pids, args.n, counts, models, min(3, args.nodes)))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
