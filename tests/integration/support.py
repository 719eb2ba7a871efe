"""Test helpers: role subprocesses and topic readers on the real broker."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import httpx
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord

from nexus.kafka.clients import client_options
from localdev.broker import free_port
from nexus.settings import KafkaSettings
from nexus.kafka.readers import read_from_end
from tests.eventually import eventually_sync
from schemas import Codec, InferenceResponse, decode_response

REPO = Path(__file__).resolve().parents[2]
CODEC = Codec.from_directory()


class Role:
    """One ``python -m nexus <args>`` process with its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs_dir: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.log_path = logs_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> Role:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nexus", *self.args],
            env=self.env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup, no commit, like a crashed machine."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_http(self, url: str, timeout: float = 60.0) -> None:
        """Wait until ``url`` answers anything; fail early with the log if the role died."""
        def answers_or_died() -> bool:
            if not self.alive():
                return True  # stop waiting: reported below with the log
            try:
                httpx.get(url, timeout=1.0)
                return True
            except httpx.HTTPError:
                return False

        eventually_sync(answers_or_died, f"{self.name} answers at {url}", timeout=timeout, interval=0.1,
                        context=self.log_tail)
        if not self.alive():
            raise RuntimeError(f"{self.name} exited:\n{self.log_tail()}")


def stack_env(bootstrap: str, ollama_url: str, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_") or k == "NEXUS_HOME"}
    env.update(
        {
            "NEXUS_KAFKA_BOOTSTRAP": bootstrap,
            "OLLAMA_HOST": ollama_url,
            "NEXUS_WORKER_WEB_PORT": str(free_port()),
            "NEXUS_GATEWAY_HOST": "127.0.0.1",
            "NEXUS_KAFKA_SESSION_TIMEOUT_MS": "6000",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(overrides)
    return env


def start_simulator(logs_dir: Path, extra: list[str]) -> Role:
    port = free_port()
    role = Role("simulator", ["simulate-ollama", "--port", str(port), *extra], dict(os.environ), logs_dir)
    role.url = f"http://127.0.0.1:{port}"
    role.start().wait_http(role.url)
    return role


def start_gateway(env: dict[str, str], logs_dir: Path) -> Role:
    port = free_port()
    role = Role("gateway", ["gateway"], {**env, "NEXUS_GATEWAY_PORT": str(port)}, logs_dir)
    role.url = f"http://127.0.0.1:{port}"
    role.start().wait_http(f"{role.url}/models")
    return role


class TopicReader:
    """Reads every partition of a topic from the end offsets at ``start()``, with no group.

    Take the snapshot before producing, so everything produced after is seen.
    ``kafka``: a bootstrap address, or settings for a cluster that needs SASL/TLS.
    """

    def __init__(self, kafka: str | KafkaSettings, topic: str, isolation_level: str = "read_uncommitted") -> None:
        self.topic = topic
        settings = KafkaSettings(bootstrap=kafka) if isinstance(kafka, str) else kafka
        self._consumer = AIOKafkaConsumer(
            **client_options(settings), enable_auto_commit=False, group_id=None, isolation_level=isolation_level
        )
        self.records: list[ConsumerRecord] = []

    async def start(self) -> TopicReader:
        await self._consumer.start()
        await read_from_end(self._consumer, [self.topic], timeout_s=30)
        return self

    async def stop(self) -> None:
        await self._consumer.stop()

    async def __aenter__(self) -> TopicReader:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def read_until(self, done, timeout: float) -> list[ConsumerRecord]:  # type: ignore[no-untyped-def]
        """Read until ``done(records)`` is true; raise TimeoutError with what was seen."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not done(self.records):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError(f"{self.topic}: condition not met; {len(self.records)} records read")
            batches = await self._consumer.getmany(timeout_ms=int(min(left, 0.5) * 1000))
            for records in batches.values():
                self.records.extend(records)
        return self.records

    async def drain(self) -> list[ConsumerRecord]:
        """Read up to the current end of every partition (catches late duplicates)."""
        ends = await self._consumer.end_offsets(list(self._consumer.assignment()))
        while True:
            positions = {tp: await self._consumer.position(tp) for tp in ends}
            if all(positions[tp] >= ends[tp] for tp in ends):
                return self.records
            batches = await self._consumer.getmany(timeout_ms=500)
            for records in batches.values():
                self.records.extend(records)


@dataclass
class Answers:
    by_id: dict[str, list[InferenceResponse]]

    def duplicates(self) -> int:
        return sum(len(v) - 1 for v in self.by_id.values())


async def wait_for_responses(reader: TopicReader, ids: set[str], timeout: float = 90.0) -> Answers:
    """Read responses until every id in ``ids`` has one; then drain to the end."""

    def answered(records: list[ConsumerRecord]) -> bool:
        return ids <= {decode_response(CODEC, r.value).id for r in records}

    await reader.read_until(answered, timeout)
    records = await reader.drain()
    by_id: dict[str, list[InferenceResponse]] = defaultdict(list)
    for record in records:
        response = decode_response(CODEC, record.value)
        if response.id in ids:
            by_id[response.id].append(response)
    return Answers(dict(by_id))
