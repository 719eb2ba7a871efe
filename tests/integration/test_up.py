"""`nexus up` (what `make run` starts): embedded Kafka, a model backend, worker, gateway and bridge."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from localdev.broker import free_port
from tests.integration.support import REPO, TopicReader, stack_env, wait_for_responses
from tests.integration.test_pipeline import SEED_BODY, simulated


async def test_up_simulated_serves_the_seed_example_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    kafka_port, gateway_port, ollama_port = free_port(), free_port(), free_port()
    bridge_port = free_port()
    env = stack_env(
        f"127.0.0.1:{kafka_port}",
        f"http://127.0.0.1:{ollama_port}",  # nothing answers there: --simulate starts the simulator
        NEXUS_GATEWAY_PORT=str(gateway_port),
        NEXUS_BRIDGE_PORT=str(bridge_port),
    )
    del env["NEXUS_KAFKA_BOOTSTRAP"]  # up runs its own broker
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "nexus", "up", "--simulate", "--kafka-port", str(kafka_port),
             "--kafka-data", str(tmp_path / "kafka")],
            env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
        )
    gateway = f"http://127.0.0.1:{gateway_port}"
    try:
        await _wait_healthy(gateway, up, log)
        async with TopicReader(f"127.0.0.1:{kafka_port}", "inference.responses") as responses:
            async with httpx.AsyncClient() as http:
                reply = await http.post(f"{gateway}/infer", json=SEED_BODY)
            assert reply.status_code == 202, reply.text
            answers = await wait_for_responses(responses, {"test1"})
        assert answers.by_id["test1"][0].output == simulated("llama3.1", "Hello, world!")
        assert "SIMULATED" in log.read_text()
        await _wait_healthy(f"http://127.0.0.1:{bridge_port}", up, log)  # the websocket bridge
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(timeout=60)
    assert code == 0, log.read_text()[-3000:]
    for port in (gateway_port, kafka_port, ollama_port, bridge_port):
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
        except httpx.ConnectError:
            continue
        raise AssertionError(f"port {port} still answers after nexus up stopped")


async def _wait_healthy(gateway: str, up: subprocess.Popen[bytes], log: Path) -> None:
    async with httpx.AsyncClient() as http:
        for _ in range(600):
            if up.poll() is not None:
                raise AssertionError(f"nexus up exited:\n{log.read_text()[-3000:]}")
            try:
                if (await http.get(f"{gateway}/health", timeout=2)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)  # polling a readiness condition, not waiting for time
    raise AssertionError(f"gateway never healthy:\n{log.read_text()[-3000:]}")



async def test_up_answers_with_a_real_model_when_no_ollama_runs(tmp_path: Path) -> None:
    """No Ollama at OLLAMA_HOST: up starts the project's real Ollama and serves its model, honestly named."""
    kafka_port, gateway_port, ollama_port, bridge_port = free_port(), free_port(), free_port(), free_port()
    env = stack_env(f"127.0.0.1:{kafka_port}", f"http://127.0.0.1:{ollama_port}",
                    NEXUS_GATEWAY_PORT=str(gateway_port), NEXUS_BRIDGE_PORT=str(bridge_port))
    del env["NEXUS_KAFKA_BOOTSTRAP"]
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "nexus", "up", "--kafka-port", str(kafka_port), "--kafka-data", str(tmp_path / "kafka")],
            env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
        )
    gateway = f"http://127.0.0.1:{gateway_port}"
    try:
        await _wait_healthy(gateway, up, log)
        async with httpx.AsyncClient(timeout=120) as http:
            models = (await http.get(f"{gateway}/models")).json()
            assert [m["id"] for m in models["models"]] == ["smollm2:135m"], models
            reply = await http.post(f"{gateway}/api/generate", json={
                "model": "smollm2:135m", "prompt": "The capital of France is", "stream": False,
                "options": {"num_predict": 4, "temperature": 0, "seed": 1}})
        assert reply.status_code == 200, reply.text
        answer = reply.json()
        assert answer["response"] and "simulated" not in answer["response"], answer
        assert answer["eval_count"] <= 4
        assert "SIMULATED" not in log.read_text()
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(timeout=60)
    assert code == 0, log.read_text()[-3000:]
    for port in (gateway_port, ollama_port):
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
        except httpx.ConnectError:
            continue
        raise AssertionError(f"port {port} still answers after nexus up stopped")
