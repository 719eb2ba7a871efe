"""`nexus submit -` prints each answer as it arrives, and a request that times out does not hold the others.

A simulator that generates 4 tokens a second, a worker on private topics, and the command as a
user runs it: a slow request (hundreds of tokens) first, a fast one (one token) second.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.support import REPO, Role, stack_env, start_simulator

TIMEOUT_S = 15  # the slow request needs ~60 s at 4 tokens/s


def private_topics(run: str) -> dict[str, str]:
    """Every topic and the worker's group of this test's own, so the shared stack never sees them."""
    return {
        "NEXUS_KAFKA_PARTITIONS": "2",
        **{f"NEXUS_KAFKA_{name.upper()}_TOPIC": f"{run}.{name}"
           for name in ("requests", "responses", "tokens", "dlq", "cancels", "state", "queue")},
        "NEXUS_WORKER_APP_ID": f"nexus-{run}",
    }


@pytest.fixture(scope="module")
def slow_stack(bootstrap: str, logs_dir: Path) -> Iterator[dict[str, str]]:
    simulator = start_simulator(logs_dir, ["--ttft-ms", "0", "--tokens-per-s", "4", "--parallel", "8"])
    env = stack_env(bootstrap, simulator.url, **private_topics(f"submit-{uuid.uuid4().hex[:8]}"),
                    NEXUS_WORKER_STOP_GRACE_S="1")  # the slow answer still runs when the test ends
    worker = Role("worker", ["worker"], env, logs_dir).start()
    try:
        worker.wait_http(f"http://127.0.0.1:{env['NEXUS_WORKER_WEB_PORT']}/health")
        yield env
    finally:
        worker.stop()
        simulator.stop()


def test_answers_print_as_they_arrive_and_a_timeout_is_reported_alone(slow_stack: dict[str, str]) -> None:
    run = uuid.uuid4().hex[:8]
    slow = {"id": f"{run}-slow", "model_id": "llama3.1", "input": " ".join(["word"] * 240)}
    fast = {"id": f"{run}-fast", "model_id": "mistral", "input": "hi", "options": {"max_tokens": 1}}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nexus", "submit", "-", "--timeout", str(TIMEOUT_S)],
        env=slow_stack, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(slow) + "\n" + json.dumps(fast) + "\n")
        proc.stdin.close()
        readable, _, _ = select.select([proc.stdout], [], [], TIMEOUT_S + 30)
        assert readable, "nothing printed"
        first = json.loads(proc.stdout.readline())
        # The fast answer is out while the command still waits for the slow one (it has not timed out).
        assert proc.poll() is None
        assert (first["id"], first["status"]) == (fast["id"], "ok")
        proc.wait(timeout=TIMEOUT_S + 30)  # little output: the pipes cannot fill meanwhile
        assert proc.stderr is not None
        rest, errors = proc.stdout.read(), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rest == ""
    assert errors.splitlines() == [
        f"nexus submit: request {slow['id']} (llama3.1): no answer within {TIMEOUT_S}s (--timeout); it stays submitted"]
    assert proc.returncode == 1
