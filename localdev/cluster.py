"""A real N-node Kafka cluster (KRaft, every node a combined broker+controller) on one host.

Why: replication is only real with several brokers. Losing a partition leader, an ISR
shrinking, a group coordinator or the active controller moving: none of that exists on
the single-node :class:`~localdev.broker.LocalKafka`, and a mock cannot show what
aiokafka and Faust do when it happens. Each node is a LocalKafka subprocess with its
own node id, the cluster's static ``controller.quorum.voters`` and replicated defaults
(``default.replication.factor=3``, ``min.insync.replicas=2``, internal topics RF 3).

Typical use::

    with LocalKafkaCluster(tmp, nodes=3) as cluster:
        leader = await cluster.leader("inference.requests", 0)
        cluster.kill(leader)      # SIGKILL, like a crashed machine
        cluster.restart(leader)   # same ports, same data

Data dirs are meant to be fresh per cluster (tests, benchmarks); a node's restart
reuses its ports and data.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient

from localdev.broker import KafkaError as KafkaError  # re-exported: the old name
from localdev.broker import LocalKafka, LocalKafkaError, fetch_kafka, free_port
from localdev.metadata import broker_ids  # re-exported: it used to live here


def replicated_defaults(nodes: int) -> dict[str, str]:
    """The brokers' defaults: with 3+ nodes every topic has 3 replicas and acks=all needs 2 of
    them, so it survives one lost broker and keeps accepting writes (fewer nodes: all of them,
    and 1 in sync, so a 1-node cluster is the single broker for comparison).

    A SIGKILLed broker is fenced (and its partitions' leadership moved) after its session times
    out: 4 s rather than 9 s keeps failovers short; heartbeats every 1 s keep a busy box from
    fencing a live broker.
    """
    replicas = min(3, nodes)
    min_isr = 2 if replicas >= 3 else 1
    return {
        "default.replication.factor": str(replicas),
        "min.insync.replicas": str(min_isr),
        "offsets.topic.replication.factor": str(replicas),
        "transaction.state.log.replication.factor": str(replicas),
        "transaction.state.log.min.isr": str(min_isr),
        "broker.session.timeout.ms": "4000",
        "broker.heartbeat.interval.ms": "1000",
    }


class ClusterNode(LocalKafka):
    """One node of a :class:`LocalKafkaCluster`: LocalKafka's broker with a node id, the
    cluster's voters and cluster id, and replicated defaults."""

    def __init__(
        self,
        node_id: int,
        voters: str,
        cluster_id: str,
        defaults: dict[str, str],
        *,
        port: int,
        controller_port: int,
        data_dir: Path,
        host: str,
        libs_dir: Path | None,
        heap: str,
    ) -> None:
        super().__init__(port=port, data_dir=data_dir, controller_port=controller_port, host=host,
                         libs_dir=libs_dir, heap=heap)
        self.node_id = node_id
        self.voters = voters
        self.cluster_id = cluster_id  # LocalKafka formats storage with it: one id for all nodes
        self.defaults = defaults

    def _server_properties(self, controller_port: int) -> str:
        """LocalKafka's properties with this node's identity and the replicated defaults."""
        overrides = {"node.id": str(self.node_id), "controller.quorum.voters": self.voters,
                     **self.defaults}
        lines = []
        for line in super()._server_properties(controller_port).splitlines():
            key = line.partition("=")[0].strip()
            lines.append(f"{key}={overrides.pop(key)}" if key in overrides else line)
        lines += [f"{key}={value}" for key, value in overrides.items()]
        return "\n".join(lines) + "\n"

    def kill(self) -> None:
        """SIGKILL: no controlled shutdown, no flush, like a crashed machine."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        self._forget()


class LocalKafkaCluster:
    """``nodes`` combined broker+controller KRaft nodes on ``host``, node ids 1..N.

    Ready means every broker is registered and unfenced: a Metadata request lists all N.
    """

    def __init__(
        self,
        data_dir: Path,
        nodes: int = 3,
        host: str = "127.0.0.1",
        libs_dir: Path | None = None,
        heap: str = "384m",
    ) -> None:
        if nodes < 1:
            raise ValueError(f"a cluster needs at least one node, got nodes={nodes}")
        self.data_dir = Path(data_dir)
        ports = _distinct_free_ports(2 * nodes, host)
        broker_ports, controller_ports = ports[:nodes], ports[nodes:]
        voters = ",".join(f"{i + 1}@{host}:{p}" for i, p in enumerate(controller_ports))
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        while cluster_id.startswith("-"):  # CLIs would read it as a flag, as in LocalKafka
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        self.cluster_id = cluster_id
        defaults = replicated_defaults(nodes)
        self.nodes = [
            ClusterNode(i + 1, voters, cluster_id, defaults, port=broker_ports[i],
                        controller_port=controller_ports[i], data_dir=self.data_dir / f"node-{i + 1}",
                        host=host, libs_dir=libs_dir, heap=heap)
            for i in range(nodes)
        ]

    @property
    def bootstrap(self) -> str:
        """Every broker's ``host:port``, comma-separated: clients survive any one being down."""
        return ",".join(node.bootstrap for node in self.nodes)

    def node(self, node_id: int) -> ClusterNode:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise LocalKafkaError(f"no node {node_id} in this cluster (ids 1..{len(self.nodes)})")

    def running(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.is_running()]

    # -- lifecycle -----------------------------------------------------------------

    def start(self, timeout: float = 120) -> None:
        """Launch every node at once (a lone voter cannot elect a controller), then wait
        until all brokers are registered and unfenced. ``timeout`` starts after the jars are fetched."""
        fetch_kafka(self.nodes[0].libs_dir)  # once, not by every node at once; a first fetch takes a while
        deadline = time.monotonic() + timeout
        atexit.register(self.stop)
        try:
            with ThreadPoolExecutor(len(self.nodes)) as pool:
                for future in [pool.submit(node.start, timeout) for node in self.nodes]:
                    future.result()
            self._wait_brokers({node.node_id for node in self.nodes}, self.nodes, deadline)
        except BaseException:
            self.stop()
            raise

    def kill(self, node_id: int) -> None:
        """SIGKILL one node; the others elect new leaders once its broker session expires."""
        self.node(node_id).kill()

    def restart(self, node_id: int, timeout: float = 90) -> None:
        """Start a stopped or killed node again on its ports and data; wait until all
        running brokers, it included, are listed in its own metadata."""
        deadline = time.monotonic() + timeout
        node = self.node(node_id)
        node.start(timeout)
        self._wait_brokers({n.node_id for n in self.running()}, [node], deadline)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM every node at once (so none waits for a quorum the others already left),
        SIGKILL what hangs; idempotent."""
        atexit.unregister(self.stop)
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda node: node.stop(timeout), self.nodes))

    def _wait_brokers(self, expected: set[int], asked: list[ClusterNode], deadline: float) -> None:
        """Poll Metadata until every node in ``asked`` lists exactly ``expected`` as live brokers."""
        seen: dict[int, set[int]] = {}
        while True:
            seen = {node.node_id: broker_ids(node.host, node.port, timeout=2.0, client_id="nexus-localcluster")
                    for node in asked}
            if all(ids == expected for ids in seen.values()):
                return
            if time.monotonic() > deadline:
                raise LocalKafkaError(
                    f"cluster {self.bootstrap}: brokers {sorted(expected)} not all registered in time "
                    f"(live brokers as each node sees them: {seen}); see the kafka.log files under "
                    f"{self.data_dir}"
                )
            time.sleep(0.2)  # poll interval between Metadata requests

    # -- metadata ------------------------------------------------------------------

    async def leader(self, topic: str, partition: int, timeout: float = 15) -> int:
        """The node id leading ``topic``/``partition`` now, from the cluster's metadata."""
        return (await self.describe(topic, partition, timeout))["leader"]

    async def describe(self, topic: str, partition: int, timeout: float = 15) -> dict[str, Any]:
        """Leader, replicas and ISR of one partition (aiokafka's metadata dict).

        Waits up to ``timeout`` while the partition is unknown to the broker asked (a new
        topic reaches the brokers' metadata one by one) or has no leader (an election).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=10_000)
        await admin.start()
        try:
            while True:
                [description] = await admin.describe_topics([topic])
                found = [p for p in description.get("partitions", []) if p["partition"] == partition]
                if found and found[0]["leader"] >= 0:
                    return found[0]
                if loop.time() > deadline:
                    raise LocalKafkaError(f"{topic}/{partition} has no leader on {self.bootstrap} "
                                          f"after {timeout:g}s: {description}")
                await asyncio.sleep(0.2)  # poll interval while metadata propagates
        finally:
            await admin.close()

    def __enter__(self) -> LocalKafkaCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        up = [node.node_id for node in self.running()]
        return f"LocalKafkaCluster({self.bootstrap}, running={up}, data_dir={str(self.data_dir)!r})"


def _distinct_free_ports(count: int, host: str) -> list[int]:
    """``count`` different free ports (the OS may hand the same free port out twice in a row)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port(host)
        if port not in ports:
            ports.append(port)
    return ports
