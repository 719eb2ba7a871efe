"""`nexus up` with OLLAMA_HOST=0.0.0.0 (as set on servers): a local backend is started, on every
interface, the roles reach it at 127.0.0.1, and they log in the format `up` was given.

Runs against the session's broker (``--bootstrap``) on private topics, with the real Ollama the
suite builds once (``make ollama``).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx

from localdev.broker import free_port
from tests.eventually import eventually
from tests.integration.support import REPO, stack_env
from tests.integration.test_cli_submit import private_topics


async def test_up_starts_a_local_backend_for_ollama_host_0000_and_passes_on_its_logging(
    bootstrap: str, tmp_path: Path
) -> None:
    run = f"up-{uuid.uuid4().hex[:8]}"
    ollama_port, gateway_port, bridge_port = free_port(), free_port(), free_port()
    env = stack_env(bootstrap, f"0.0.0.0:{ollama_port}", **private_topics(run),
                    NEXUS_GATEWAY_PORT=str(gateway_port), NEXUS_BRIDGE_PORT=str(bridge_port),
                    NEXUS_BRIDGE_HOST="127.0.0.1")
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen([sys.executable, "-m", "nexus", "up", "--bootstrap", bootstrap, "--log-format", "json"],
                              env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        async with httpx.AsyncClient(timeout=5) as http:

            async def served() -> Any:
                assert up.poll() is None, f"nexus up exited:\n{log.read_text()[-3000:]}"
                models = (await http.get(f"http://127.0.0.1:{gateway_port}/models")).json()["models"]
                return models if models and models[0]["endpoints"][0].get("live") else None

            models: Any = await eventually(served, "the worker reports the local backend", timeout=180,
                                           interval=0.2, context=lambda: log.read_text()[-3000:])
        # The real model, not the simulator, dialled at the loopback.
        assert [m["id"] for m in models] == ["smollm2:135m"], models
        assert [e["url"] for e in models[0]["endpoints"]] == [f"http://127.0.0.1:{ollama_port}"]
        assert "SIMULATED" not in log.read_text()
        await eventually(lambda: f'"message": "worker nexus-{run} started' in log.read_text(),
                         "the worker says it started", timeout=60, context=lambda: log.read_text()[-3000:])
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(timeout=60)
    assert code == 0, log.read_text()[-3000:]
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    said = {(r["role"], r["level"], r["message"].split(" on ")[0]) for r in records}
    assert {("gateway", "INFO", "gateway listening"), ("bridge", "INFO", "bridge listening")} <= said, said
    assert any(r["role"] == "worker" and r["level"] == "INFO" and r["message"].startswith(f"worker nexus-{run} started")
               for r in records)
