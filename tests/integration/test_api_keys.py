"""API keys end to end: a worker, a gateway and a bridge with ``NEXUS_API_KEYS``, on the real broker.

The roles run on topics of their own. Key ``alpha`` may use every model, ``beta`` only mistral.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from websockets.exceptions import InvalidStatus

from localdev.broker import free_port
from tests.integration.bridge_support import WsClient
from tests.integration.support import Role, stack_env, start_gateway

ALPHA = f"alpha-{secrets.token_urlsafe(16)}"
BETA = f"beta-{secrets.token_urlsafe(16)}"
WRONG = f"wrong-{secrets.token_urlsafe(16)}"


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Keyed:
    gateway: Role
    bridge: Role
    worker: Role
    ws_url: str

    @property
    def url(self) -> str:
        return self.gateway.url

    def logs(self) -> str:
        return "".join(r.log_path.read_text(errors="replace") for r in (self.gateway, self.bridge, self.worker))


@pytest.fixture(scope="module")
def keyed(bootstrap: str, simulator: str, logs_dir: Path) -> Iterator[Keyed]:
    run = uuid.uuid4().hex[:8]
    port = free_port()
    env = stack_env(
        bootstrap,
        simulator,
        NEXUS_KAFKA_REQUESTS_TOPIC=f"keys-{run}.requests",
        NEXUS_KAFKA_RESPONSES_TOPIC=f"keys-{run}.responses",
        NEXUS_KAFKA_TOKENS_TOPIC=f"keys-{run}.tokens",
        NEXUS_KAFKA_DLQ_TOPIC=f"keys-{run}.dlq",
        NEXUS_KAFKA_STATE_TOPIC=f"keys-{run}.state",
        NEXUS_WORKER_APP_ID=f"nexus-keys-test-{run}",
        NEXUS_BRIDGE_HOST="127.0.0.1",
        NEXUS_BRIDGE_PORT=str(port),
        NEXUS_API_KEYS=f"alpha:{sha(ALPHA)};beta:{sha(BETA)}:mistral",
    )
    worker = Role("worker", ["worker"], env, logs_dir).start()
    bridge = Role("bridge", ["bridge"], env, logs_dir).start()
    gateway: Role | None = None
    try:
        bridge.wait_http(f"http://127.0.0.1:{port}/health")
        gateway = start_gateway(env, logs_dir)
        yield Keyed(gateway, bridge, worker, f"ws://127.0.0.1:{port}/ws")
    finally:
        if gateway is not None:
            gateway.stop()
        bridge.stop()
        worker.stop()


def _infer(model: str, text: str, session: str, stream: bool = False) -> dict[str, object]:
    return {"model_id": model, "input": text, "stream": stream, "context": {"session_id": session}}


async def test_infer_metrics_and_models_need_a_bearer_token(keyed: Keyed) -> None:
    async with httpx.AsyncClient(base_url=keyed.url, timeout=30) as http:
        body = _infer("llama3.1", "hello", "s-http")
        missing = await http.post("/infer", json=body)
        assert missing.status_code == 401
        assert missing.headers["WWW-Authenticate"] == 'Bearer realm="nexus"'
        assert "Authorization: Bearer" in missing.json()["error"]
        wrong = await http.post("/infer", json=body, headers=bearer(WRONG))
        assert wrong.status_code == 401
        assert wrong.headers["WWW-Authenticate"] == 'Bearer realm="nexus", error="invalid_token"'
        assert wrong.json() == {"error": "the API key is not valid"}
        assert (await http.post("/infer", json=body, headers={"Authorization": f"Basic {ALPHA}"})).status_code == 401

        accepted = await http.post("/infer", json=body, headers=bearer(ALPHA))
        assert accepted.status_code == 202, accepted.text
        forbidden = await http.post("/infer", json=body, headers=bearer(BETA))
        assert forbidden.status_code == 403
        assert forbidden.json() == {"error": "API key 'beta' may not use model 'llama3.1'; it may use ['mistral']"}
        assert (await http.post("/infer", json={**body, "model_id": "mistral"}, headers=bearer(BETA))).status_code == 202

        assert (await http.get("/metrics")).status_code == 401
        assert (await http.get("/metrics", headers=bearer(WRONG))).status_code == 401
        metrics = await http.get("/metrics", headers=bearer(BETA))
        assert metrics.status_code == 200 and 'nexus_gateway_requests_total{code="403",model="llama3.1"} 1.0' in metrics.text

        assert (await http.get("/models")).status_code == 401
        assert [m["id"] for m in (await http.get("/models", headers=bearer(BETA))).json()["models"]] == ["mistral"]
        assert [m["id"] for m in (await http.get("/models", headers=bearer(ALPHA))).json()["models"]] == [
            "llama3.1", "mistral"]

        # Probes, the page and the documentation stay open.
        for path in ("/health", "/openapi.json", "/config.json", "/api/version"):
            assert (await http.get(path)).status_code in (200, 503), path
        assert (await http.get("/config.json")).json()["api_keys"] is True
        page = await http.get("/", headers={"Accept": "text/html"})
        assert page.status_code == 200 and 'id="key-token"' in page.text


async def test_the_workers_metrics_and_models_pages_need_a_token_too(keyed: Keyed) -> None:
    web = f"http://127.0.0.1:{keyed.worker.env['NEXUS_WORKER_WEB_PORT']}"
    keyed.worker.wait_http(f"{web}/metrics")
    async with httpx.AsyncClient(base_url=web, timeout=30) as http:
        for path in ("/metrics", "/models"):
            missing = await http.get(path)
            assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == 'Bearer realm="nexus"', path
            assert (await http.get(path, headers=bearer(WRONG))).status_code == 401, path
            assert (await http.get(path, headers=bearer(BETA))).status_code == 200, path
        assert "nexus_worker_requests_total" in (await http.get("/metrics", headers=bearer(ALPHA))).text


async def test_openai_client_with_api_key(keyed: Keyed) -> None:
    client = openai.AsyncOpenAI(base_url=f"{keyed.url}/v1", api_key=ALPHA, max_retries=0)
    answer = await client.chat.completions.create(
        model="llama3.1", messages=[{"role": "user", "content": "hi from openai"}]
    )
    assert answer.choices[0].message.content == "[simulated llama3.1] You said: hi from openai"

    with pytest.raises(openai.AuthenticationError) as unauthenticated:
        await openai.AsyncOpenAI(base_url=f"{keyed.url}/v1", api_key=WRONG, max_retries=0).completions.create(
            model="llama3.1", prompt="x"
        )
    assert unauthenticated.value.status_code == 401
    assert unauthenticated.value.code == "invalid_api_key"

    beta = openai.AsyncOpenAI(base_url=f"{keyed.url}/v1", api_key=BETA, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as forbidden:
        await beta.chat.completions.create(model="llama3.1", messages=[{"role": "user", "content": "x"}])
    assert forbidden.value.code == "model_not_allowed"
    assert [m.id async for m in beta.models.list()] == ["mistral"]
    stream = await beta.completions.create(model="mistral", prompt="streamed for beta", stream=True)
    text = "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])
    assert text == "[simulated mistral] You said: streamed for beta"


async def test_ollama_client_sends_the_key_as_a_header(keyed: Keyed) -> None:
    session = f"ollama-{uuid.uuid4().hex}"
    watcher = await WsClient.open(keyed.ws_url, additional_headers=bearer(BETA))
    await watcher.send({"type": "subscribe", "session_id": session})
    await watcher.next_of("subscribed")
    client = ollama.AsyncClient(host=keyed.url, headers={**bearer(BETA), "X-Nexus-Session": session})
    answer = await client.generate(model="mistral", prompt="hi from ollama", stream=False)
    assert answer.response == "[simulated mistral] You said: hi from ollama"
    result = await watcher.next_of("result")  # the drop-in call's request was stamped with the key
    assert (result["key_name"], result["output"]) == ("beta", answer.response)
    await watcher.close()
    assert [m.model for m in (await client.list()).models] == ["mistral"]
    with pytest.raises(ollama.ResponseError) as forbidden:
        await client.chat(model="llama3.1", messages=[{"role": "user", "content": "x"}])
    assert forbidden.value.status_code == 403
    with pytest.raises(ollama.ResponseError) as load_call:  # no prompt: Ollama's "load the model"
        await client.generate(model="llama3.1:latest")
    assert load_call.value.status_code == 403
    assert (await client.generate(model="mistral:latest")).done_reason == "load"
    with pytest.raises(ollama.ResponseError) as unauthenticated:
        await ollama.AsyncClient(host=keyed.url).generate(model="mistral", prompt="x", stream=False)
    assert unauthenticated.value.status_code == 401


async def test_the_websocket_handshake_needs_a_token(keyed: Keyed) -> None:
    for kwargs in ({}, {"additional_headers": bearer(WRONG)}):
        with pytest.raises(InvalidStatus) as refused:
            await WsClient.open(keyed.ws_url, **kwargs)
        assert refused.value.response.status_code == 401
        assert refused.value.response.headers["WWW-Authenticate"].startswith("Bearer")
    with pytest.raises(InvalidStatus):
        await WsClient.open(f"{keyed.ws_url}?token={WRONG}")
    for client in (await WsClient.open(keyed.ws_url, additional_headers=bearer(ALPHA)),
                   await WsClient.open(f"{keyed.ws_url}?token={ALPHA}")):
        await client.send({"type": "subscribe", "session_id": f"hs-{uuid.uuid4().hex}"})
        assert (await client.next_of("subscribed"))["type"] == "subscribed"
        await client.close()


def _ids(client: WsClient, kind: str) -> set[str]:
    return {f["id"] for f in client.of(kind)}


async def test_a_key_sees_its_own_sessions_results_and_never_another_keys(keyed: Keyed) -> None:
    run = uuid.uuid4().hex[:8]
    mine, theirs = f"{run}-alpha", f"{run}-beta"
    a = await WsClient.open(keyed.ws_url, additional_headers=bearer(ALPHA))
    b = await WsClient.open(f"{keyed.ws_url}?token={BETA}")
    try:
        # a subscribes to everything and, before anyone used it, to beta's session: both are allowed.
        await a.send({"type": "subscribe", "all": True})
        await a.send({"type": "subscribe", "session_id": theirs})
        await b.send({"type": "subscribe", "all": True})
        await a.wait_for(lambda fs: len(fs) == 2)
        await b.wait_for(lambda fs: len(fs) == 1)

        # beta submits a streamed request through the bridge; a model outside its list is refused.
        await b.send({"type": "submit", "id": f"{run}-b0", **_infer("llama3.1", "not mine", theirs)})
        refused = await b.next_of("error")
        assert refused["status"] == 403 and refused["id"] == f"{run}-b0"
        await b.send({"type": "submit", "id": f"{run}-b1", **_infer("mistral", "beta's secret question", theirs, True)})
        # alpha submits through the gateway (the request is stamped with alpha's key there).
        async with httpx.AsyncClient(timeout=30) as http:
            response = await http.post(f"{keyed.url}/infer", headers=bearer(ALPHA),
                                       json={"id": f"{run}-a1", **_infer("llama3.1", "alpha's question", mine)})
            assert response.status_code == 202

        await b.wait_for(lambda fs: f"{run}-b1" in {f.get("id") for f in fs if f["type"] == "result"})
        await a.wait_for(lambda fs: f"{run}-a1" in {f.get("id") for f in fs if f["type"] == "result"})
        assert b.of("token"), "beta's request was streamed to beta"
        [result_a] = [f for f in a.of("result") if f["id"] == f"{run}-a1"]
        assert result_a["key_name"] == "alpha"

        # Now the bridge knows the session is beta's: alpha's subscription to it is refused.
        await a.send({"type": "subscribe", "session_id": theirs})
        refusal = await a.next_of("error")
        assert refusal["status"] == 403 and "belongs to another API key" in refusal["reason"]
        # And a replay of everything since the start shows alpha only alpha's records.
        c = await WsClient.open(keyed.ws_url, additional_headers=bearer(ALPHA))
        await c.send({"type": "subscribe", "all": True, "since": 0})
        await c.next_of("replayed")
        # The positive control first: once alpha's own answer reached both, beta's (older) would have too.
        for client in (a, c):
            await client.wait_for(lambda fs: f"{run}-a1" in {f.get("id") for f in fs if f["type"] in ("result", "token")})

        for client in (a, c):
            seen = _ids(client, "result") | _ids(client, "token")
            assert f"{run}-a1" in seen  # the positive control: alpha's own result arrives
            assert not {f"{run}-b0", f"{run}-b1"} & seen, "alpha received beta's records"
            assert "beta's secret" not in json.dumps(client.frames)
            assert all(f.get("key_name") == "alpha" for f in client.of("result"))
        assert f"{run}-a1" not in _ids(b, "result") | _ids(b, "token")
        assert all(f.get("key_name") == "beta" for f in b.of("result"))
        await c.close()
    finally:
        await a.close()
        await b.close()


async def test_secrets_never_appear_in_logs_or_metrics(keyed: Keyed) -> None:
    async with httpx.AsyncClient(base_url=keyed.url, timeout=30) as http:
        # Successful and failed calls of every kind, with every token, so each could leak.
        for token in (ALPHA, BETA, WRONG):
            await http.post("/infer", json=_infer("llama3.1", "leak?", "s-leak"), headers=bearer(token))
            await http.post("/v1/completions", json={"model": "llama3.1", "prompt": "leak?"}, headers=bearer(token))
            await http.get("/metrics", headers=bearer(token))
        with pytest.raises(InvalidStatus):
            await WsClient.open(f"{keyed.ws_url}?token={WRONG}")
        metrics = (await http.get("/metrics", headers=bearer(ALPHA))).text
    await asyncio.sleep(0.5)  # the roles' buffered log lines
    logs = keyed.logs()
    assert logs, "the roles logged something, so the check below means something"
    for secret in (ALPHA, BETA, WRONG):
        assert secret not in logs
        assert secret not in metrics


async def test_the_keyed_gateways_answers_fit_its_openapi_document(keyed: Keyed) -> None:
    from openapi_spec_validator import validate as validate_openapi

    from tests.integration.test_openapi import check

    async with httpx.AsyncClient(base_url=keyed.url, timeout=30) as http:
        spec = (await http.get("/openapi.json")).json()  # open: documentation needs no key
        validate_openapi(spec)
        scheme = spec["components"]["securitySchemes"]["bearerAuth"]
        assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
        assert spec["paths"]["/infer"]["post"]["security"] == [{"bearerAuth": []}]
        assert "security" not in spec["paths"]["/health"]["get"]
        body = _infer("llama3.1", "spec", "s-spec")
        cases = [
            ("post", "/infer", {"json": body}, 401),
            ("post", "/infer", {"json": body, "headers": bearer(WRONG)}, 401),
            ("post", "/infer", {"json": body, "headers": bearer(BETA)}, 403),
            ("post", "/infer", {"json": body, "headers": bearer(ALPHA)}, 202),
            ("get", "/metrics", {}, 401),
            ("get", "/models", {"headers": bearer(BETA)}, 200),
            ("post", "/v1/chat/completions", {"json": {"model": "llama3.1", "messages": []}}, 401),
            ("post", "/v1/chat/completions", {"headers": bearer(BETA), "json": {
                "model": "llama3.1", "messages": [{"role": "user", "content": "x"}]}}, 403),
            ("get", "/v1/models", {"headers": bearer(WRONG)}, 401),
            ("post", "/api/generate", {"json": {"model": "llama3.1", "prompt": "x"}}, 401),
            ("post", "/api/generate", {"headers": bearer(BETA), "json": {"model": "llama3.1", "prompt": "x"}}, 403),
            ("get", "/api/tags", {}, 401),
        ]
        for method, path, kwargs, status in cases:
            reply = await http.request(method.upper(), path, **kwargs)
            assert reply.status_code == status, (path, reply.text)
            check(spec, method, path, reply)


async def test_the_page_asks_for_a_key_and_works_with_one(keyed: Keyed) -> None:
    async_api = pytest.importorskip("playwright.async_api", reason="playwright is in the [test] extra")
    from tests.integration.test_bridge import CHROMIUM_ARGS, chromium_path

    executable = chromium_path()
    prompt = "Hello from the page, with a key"
    async with async_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(keyed.url + "/")
            await page.wait_for_selector("#key-token", state="visible", timeout=15_000)  # no token: it asks
            await page.fill("#key-token", BETA)
            await page.click("#key button")
            await page.wait_for_selector("#connection[data-state=open]", timeout=15_000)
            assert await page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == ["mistral"]
            await page.fill("#prompt", prompt)
            await page.click("#submit")
            await page.wait_for_selector("#answer[data-state=done]", timeout=30_000)
            answer = await page.text_content("#answer")
            url = page.url
        finally:
            await browser.close()
    assert errors == []
    assert answer == f"[simulated mistral] You said: {prompt}"
    assert BETA not in url


@pytest.mark.parametrize("role", ["worker", "gateway", "bridge"])
def test_the_compose_healthchecks_pass_with_keys_on(keyed: Keyed, role: str) -> None:
    """docker-compose.yml's healthcheck of each role, run against these keyed roles: it asks /health,
    which needs no key (asking /metrics, as the worker's once did, fails with 401)."""
    import re
    import subprocess
    import sys

    import yaml

    compose = yaml.safe_load((Path(__file__).resolve().parents[2] / "docker-compose.yml").read_text())
    kind, *command = compose["services"][role]["healthcheck"]["test"]
    assert kind == "CMD" and command[:2] == ["python", "-c"], command
    port = {"worker": keyed.worker.env["NEXUS_WORKER_WEB_PORT"], "gateway": keyed.gateway.url.rsplit(":", 1)[1],
            "bridge": keyed.bridge.env["NEXUS_BRIDGE_PORT"]}[role]
    code = re.sub(r"//localhost:\d+/", f"//127.0.0.1:{port}/", command[2])
    if role == "worker":
        keyed.worker.wait_http(f"http://127.0.0.1:{port}/health")
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert probe.returncode == 0, probe.stderr
    metrics = subprocess.run([sys.executable, "-c", code.replace("/health", "/metrics")], capture_output=True,
                             text=True, timeout=30)
    assert metrics.returncode != 0 and "401" in metrics.stderr, "/metrics should need a key"


async def test_the_bridges_metrics_need_a_token(keyed: Keyed) -> None:
    web = f"http://127.0.0.1:{keyed.bridge.env['NEXUS_BRIDGE_PORT']}"
    async with httpx.AsyncClient(base_url=web, timeout=30) as http:
        assert (await http.get("/metrics")).status_code == 401
        assert (await http.get("/metrics", headers=bearer(WRONG))).status_code == 401
        allowed = await http.get("/metrics", headers=bearer(ALPHA))
    assert allowed.status_code == 200 and "process_cpu_seconds_total" in allowed.text
    assert ALPHA not in allowed.text
