"""Session fixtures: one real Kafka broker, a simulator, a worker and a gateway; a real Ollama.

The broker is started once per test session on a free port, unless
``NEXUS_TEST_BOOTSTRAP`` names an existing cluster. Every role runs as the
user would run it: a ``python -m nexus ...`` subprocess configured through
``NEXUS_*`` environment variables.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from localdev.broker import LocalKafka, free_port
from localdev.ollama import LocalOllama, LocalOllamaError
from tests.integration.support import Role, stack_env, start_gateway, start_simulator


@pytest.fixture(scope="session")
def bootstrap() -> Iterator[str]:
    existing = os.environ.get("NEXUS_TEST_BOOTSTRAP")
    if existing:
        yield existing
        return
    with tempfile.TemporaryDirectory(prefix="nexus-test-kafka-") as data:
        kafka = LocalKafka(port=free_port(), data_dir=Path(data))
        kafka.start()
        try:
            yield kafka.bootstrap
        finally:
            kafka.stop()


@pytest.fixture(scope="session")
def logs_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="nexus-test-logs-") as path:
        yield Path(path)


@pytest.fixture(scope="session")
def simulator(logs_dir: Path) -> Iterator[str]:
    """A simulated Ollama with the default models; yields its URL."""
    role = start_simulator(logs_dir, ["--ttft-ms", "0", "--tokens-per-s", "0", "--parallel", "64"])
    try:
        yield role.url
    finally:
        role.stop()


@pytest.fixture(scope="session")
def stack(bootstrap: str, simulator: str, logs_dir: Path) -> Iterator[dict[str, str]]:
    """The shared worker and gateway on the default topics; yields their environment."""
    env = stack_env(bootstrap, simulator)
    worker = Role("worker", ["worker"], env, logs_dir).start()
    gateway = start_gateway(env, logs_dir)
    try:
        yield {**env, "GATEWAY_URL": gateway.url}
    finally:
        gateway.stop()
        worker.stop()


@pytest.fixture()
def gateway_url(stack: dict[str, str]) -> str:
    return stack["GATEWAY_URL"]


@pytest.fixture(scope="session")
def real_ollama(logs_dir: Path) -> Iterator[str]:
    """A real Ollama 0.17.4 serving smollm2:135m on a free port; yields its URL.

    Built and fetched into the Nexus home first if needed (`make ollama` does it ahead, as CI
    does), with progress lines on the terminal. A missing prerequisite fails the tests that use
    it with the message naming it: never a silent skip.
    """

    def say(line: str) -> None:
        print(line, file=sys.__stderr__, flush=True)  # past pytest's capture: a build takes minutes

    ollama = LocalOllama(port=free_port(), log_path=logs_dir / "ollama.log", progress=say)
    failure = None
    try:
        ollama.start(timeout=120)
    except LocalOllamaError as exc:
        failure = f"the real Ollama could not be started: {exc}"
    if failure:
        pytest.fail(failure, pytrace=False)
    try:
        yield ollama.url
    finally:
        ollama.stop()
