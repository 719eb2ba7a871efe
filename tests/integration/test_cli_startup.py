"""Roles as an operator starts them: why one cannot start, in one line, and logs at the level and
in the format asked (``--log-level``/``NEXUS_LOG_LEVEL``, ``--log-format``/``NEXUS_LOG_FORMAT``).

Real ``python -m nexus`` processes; a busy port is a socket this test listens on, an unreachable
Kafka a port nobody listens on.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from localdev.broker import free_port
from tests.eventually import eventually_sync
from tests.integration.support import REPO, stack_env

NOBODY = "http://127.0.0.1:1"  # the gateway needs no model server to start


def _nexus(args: list[str], env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nexus", *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture()
def busy_port() -> Iterator[int]:
    """A port another program listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("role", "variable", "address", "setting"),
    [
        ("gateway", "NEXUS_GATEWAY_PORT", "127.0.0.1", "gateway.port"),
        ("worker", "NEXUS_WORKER_WEB_PORT", "0.0.0.0", "worker.web_port"),
    ],
)
def test_a_busy_port_is_one_line_and_exit_code_1(bootstrap: str, busy_port: int, role: str, variable: str,
                                                 address: str, setting: str) -> None:
    env = stack_env(bootstrap, NOBODY, **{variable: str(busy_port)})
    started = time.monotonic()
    done = _nexus([role], env)
    # Said at once, before any wait for Kafka, and at the default log level.
    assert time.monotonic() - started < 15
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [
        f"nexus {role}: cannot listen on {address}:{busy_port} ({setting}): Address already in use"], done.stderr


@pytest.mark.parametrize("role", ["gateway", "worker", "bridge"])
def test_an_unreachable_kafka_is_one_line_and_exit_code_1(role: str) -> None:
    closed = free_port()  # nobody listens there
    env = stack_env(f"127.0.0.1:{closed}", NOBODY, NEXUS_KAFKA_CONNECT_TIMEOUT_S="3",
                    NEXUS_GATEWAY_PORT=str(free_port()), NEXUS_BRIDGE_PORT=str(free_port()))
    started = time.monotonic()
    done = _nexus([role, "--log-level", "warning"], env)
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    [line] = done.stderr.splitlines()  # aiokafka's error per attempt is not shown while waiting
    assert line.startswith(f"nexus {role}: no Kafka broker answered at 127.0.0.1:{closed} within 3s "
                           "(kafka.connect_timeout_s"), line
    assert elapsed < 25, f"gave up after {elapsed:.1f}s"
    # At the default level the wait is announced first, and nothing else is said.
    done = _nexus([role], env)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and "INFO waiting up to 3s for a Kafka broker" in lines[0], done.stderr


def _run_gateway(env: dict[str, str], args: list[str], stderr_path: Path) -> None:
    """Start a gateway, wait until it answers, stop it with SIGTERM; its stderr goes to ``stderr_path``."""
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "nexus", "gateway", *args], env=env, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=stderr)
    url = f"http://127.0.0.1:{env['NEXUS_GATEWAY_PORT']}/health"
    try:
        def answers() -> bool:
            assert proc.poll() is None, f"the gateway exited: {stderr_path.read_text()}"
            return httpx.get(url, timeout=1).status_code in (200, 503)

        eventually_sync(answers, "the gateway answers", timeout=60, interval=0.1, context=stderr_path.read_text)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, stderr_path.read_text()


def test_a_role_logs_json_lines_at_the_level_asked(bootstrap: str, busy_port: int, tmp_path: Path) -> None:
    port = free_port()
    env = stack_env(bootstrap, NOBODY, NEXUS_GATEWAY_PORT=str(port), NEXUS_LOG_FORMAT="json")
    log = tmp_path / "gateway.jsonl"
    _run_gateway(env, [], log)
    records = [json.loads(line) for line in log.read_text().splitlines()]  # every line is one JSON object
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records), records
    listening = [r for r in records if r["message"] == f"gateway listening on http://127.0.0.1:{port}"]
    assert [(r["level"], r["logger"], r["role"]) for r in listening] == [("INFO", "producers.gateway.app", "gateway")]
    assert not [r for r in records if r["logger"].startswith(("aiokafka", "faust")) and r["level"] == "INFO"]

    # --log-level beats NEXUS_LOG_LEVEL; at warning the "listening" line is not shown.
    quiet = tmp_path / "gateway-warning.jsonl"
    _run_gateway({**env, "NEXUS_LOG_LEVEL": "debug"}, ["--log-level", "warning"], quiet)
    assert not [line for line in quiet.read_text().splitlines() if "listening" in line]

    # The reason a role stops is a JSON record too.
    done = _nexus(["gateway", "--log-format", "json"], {**env, "NEXUS_GATEWAY_PORT": str(busy_port)})
    assert done.returncode == 1
    [failure] = [json.loads(line) for line in done.stderr.splitlines()]
    assert failure["level"] == "ERROR" and failure["message"].startswith(
        f"nexus gateway: cannot listen on 127.0.0.1:{busy_port} (gateway.port)")
