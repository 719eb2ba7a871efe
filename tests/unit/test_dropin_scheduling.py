"""The drop-in APIs and scheduling: the priority and tenant headers, 429 in each API's shape with
Retry-After, X-Nexus-Queue-Ms, and a client that disconnects cancels its request."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from nexus.access import AccessPolicy
from nexus.settings import AccessSettings, Settings, TenantSettings
from producers.gateway import access as access_http
from producers.admission import Admission
from producers.gateway.dropin import DropIn, DropInMetrics
from producers.gateway.dropin.conversation import call_context
from producers.gateway.dropin.ollama import add_ollama_routes
from producers.gateway.dropin.openai import add_openai_routes
from producers.replies import ReplyIndex, ReplyReader
from schemas import Codec, InferenceRequest
from tests.eventually import eventually
from tests.unit.test_dropin_units import MODELS, MISTRAL_ONLY, TOKEN, FakeExchange, answer, response

GENERATE = {"model": "llama3.1", "prompt": "Hi", "stream": False}
CHAT = {"model": "mistral", "messages": [{"role": "user", "content": "Hi"}]}


class CancellingExchange(FakeExchange):
    """A fake exchange that also takes cancels; ``hold`` keeps a call waiting until released."""

    def __init__(self, script: Any, hold: asyncio.Event | None = None, hold_after: int = 0) -> None:
        super().__init__(script)
        self.cancels: list[tuple[str, str, str | None]] = []
        self.hold = hold
        self.hold_after = hold_after  # events handed out before the exchange holds
        self._given = 0

    async def cancel(self, request_id: str, reason: str = "", key_name: str | None = None) -> None:
        self.cancels.append((request_id, reason, key_name))

    async def _wait(self) -> None:
        if self.hold is not None and self._given >= self.hold_after:
            await self.hold.wait()
        self._given += 1

    async def response(self, waiter: InferenceRequest, deadline: float, timeout_s: float) -> object:
        await self._wait()
        return await super().response(waiter, deadline, timeout_s)

    async def next_event(self, waiter: InferenceRequest, deadline: float, timeout_s: float) -> object:
        await self._wait()
        return await super().next_event(waiter, deadline, timeout_s)


class DropInGateway:
    def __init__(self, client: TestClient, exchange: CancellingExchange, registry: CollectorRegistry) -> None:
        self.client, self.exchange, self.registry = client, exchange, registry

    def sample(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def dropin_for() -> AsyncIterator[Callable[..., Any]]:
    clients: list[TestClient] = []

    async def start(exchange: CancellingExchange, *, access: AccessSettings = AccessSettings(),
                    tenants: dict[str, TenantSettings] | None = None, cancel_handlers: bool = True) -> DropInGateway:
        settings = Settings(models=MODELS, access=access, tenants=tenants or {})
        registry = CollectorRegistry()
        index = ReplyIndex()
        reader = ReplyReader(settings.kafka, "gateway-test", index, Codec.from_directory())
        dropin = DropIn(settings, exchange, DropInMetrics(registry, index, reader), "1.2.3",  # type: ignore[arg-type]
                        clock=lambda: 0.0, admission=Admission(settings.tenant))
        app = web.Application()
        access_http.install(app, AccessPolicy(access))
        add_ollama_routes(app, dropin)
        add_openai_routes(app, dropin)
        # The gateway's server cancels a handler whose client disconnected (producers.gateway.app.serve).
        client = TestClient(TestServer(app, handler_cancellation=cancel_handlers))
        await client.start_server()
        clients.append(client)
        return DropInGateway(client, exchange, registry)

    yield start
    for client in clients:
        await client.close()


def test_the_headers_give_priority_and_tenant() -> None:
    call = call_context([("x-nexus-priority", "batch"), ("X-Nexus-Tenant", "team-x")], 30)
    assert (call.priority, call.tenant) == ("batch", "team-x")
    plain = call_context([], 30)
    assert (plain.priority, plain.tenant) == ("interactive", None)


async def test_both_apis_carry_the_headers_into_the_request(dropin_for) -> None:
    gw = await dropin_for(CancellingExchange(answer("hello")))
    headers = {"X-Nexus-Priority": "batch", "X-Nexus-Tenant": "team-x"}
    for path, body in (("/api/generate", GENERATE), ("/api/chat", {**CHAT, "stream": False}),
                       ("/v1/chat/completions", CHAT), ("/v1/completions", {"model": "mistral", "prompt": "Hi"})):
        reply = await gw.client.post(path, json=body, headers=headers)
        assert reply.status == 200, (path, await reply.text())
    assert [(r.priority, r.tenant) for r in gw.exchange.submitted] == [("batch", "team-x")] * 4
    reply = await gw.client.post("/api/generate", json=GENERATE, headers={"X-Nexus-Session": "s7"})
    assert (gw.exchange.submitted[-1].priority, gw.exchange.submitted[-1].tenant) == ("interactive", "s7")


async def test_bad_headers_are_400_in_each_apis_shape(dropin_for) -> None:
    gw = await dropin_for(CancellingExchange(answer("hello")))
    reply = await gw.client.post("/api/generate", json=GENERATE, headers={"X-Nexus-Priority": "now"})
    assert reply.status == 400 and "X-Nexus-Priority" in (await reply.json())["error"]
    reply = await gw.client.post("/v1/chat/completions", json=CHAT, headers={"X-Nexus-Tenant": "x" * 300})
    error = (await reply.json())["error"]
    assert reply.status == 400 and "X-Nexus-Tenant" in error["message"] and error["type"] == "invalid_request_error"
    assert gw.exchange.submitted == []


async def test_with_keys_the_keys_name_is_the_tenant(dropin_for) -> None:
    gw = await dropin_for(CancellingExchange(answer("hello")), access=AccessSettings(keys=(MISTRAL_ONLY,)))
    reply = await gw.client.post("/v1/chat/completions", json=CHAT,
                                 headers={"Authorization": f"Bearer {TOKEN}", "X-Nexus-Tenant": "not-me"})
    assert reply.status == 200
    assert gw.exchange.submitted[-1].tenant == "team"


async def test_over_a_limit_is_429_with_retry_after_in_each_apis_shape(dropin_for) -> None:
    gw = await dropin_for(CancellingExchange(answer("hello")), tenants={"t": TenantSettings(requests_per_minute=1)})
    headers = {"X-Nexus-Tenant": "t"}
    assert (await gw.client.post("/api/generate", json=GENERATE, headers=headers)).status == 200
    reply = await gw.client.post("/api/generate", json=GENERATE, headers=headers)
    body = await reply.json()
    assert reply.status == 429 and set(body) == {"error"} and "requests per minute" in body["error"]
    assert int(reply.headers["Retry-After"]) in range(59, 61)
    reply = await gw.client.post("/v1/chat/completions", json=CHAT, headers=headers)
    body = await reply.json()
    assert reply.status == 429 and int(reply.headers["Retry-After"]) in range(59, 61)
    assert body == {"error": {"message": body["error"]["message"], "type": "rate_limit_error", "param": None,
                              "code": "rate_limit_exceeded"}}
    assert "x-request-id" in reply.headers  # the ids of what was not submitted still name the call
    assert len(gw.exchange.submitted) == 1
    assert gw.sample("nexus_gateway_dropin_requests_total", api="openai", route="chat.completions",
                     model="mistral", code="429") == 1


async def test_a_request_over_the_whole_token_budget_is_413(dropin_for) -> None:
    gw = await dropin_for(CancellingExchange(answer("hello")), tenants={"*": TenantSettings(tokens_per_minute=100)})
    reply = await gw.client.post("/v1/completions", json={"model": "mistral", "prompt": "Hi"})
    assert reply.status == 413 and "Retry-After" not in reply.headers
    assert "max_tokens" in (await reply.json())["error"]["message"]
    reply = await gw.client.post("/v1/completions", json={"model": "mistral", "prompt": "Hi", "max_tokens": 50})
    assert reply.status == 200


async def test_unstreamed_answers_say_how_long_they_queued(dropin_for) -> None:
    def script(request: InferenceRequest) -> list[object]:
        return [response(request.id, output="hi", context=request.context, queue_ms=1234)]

    gw = await dropin_for(CancellingExchange(script))
    reply = await gw.client.post("/api/generate", json=GENERATE)
    assert reply.status == 200 and reply.headers["X-Nexus-Queue-Ms"] == "1234"
    reply = await gw.client.post("/v1/chat/completions", json=CHAT)
    assert reply.status == 200 and reply.headers["X-Nexus-Queue-Ms"] == "1234"


async def test_an_expired_or_cancelled_answer_is_an_error_with_its_reason(dropin_for) -> None:
    gw = await dropin_for(CancellingExchange(answer(status="expired", error="expired: deadline passed in the queue")))
    reply = await gw.client.post("/api/generate", json=GENERATE)
    assert reply.status == 500 and "deadline passed" in (await reply.json())["error"]
    assert "X-Nexus-Queue-Ms" in reply.headers


async def disconnect_while(gw: DropInGateway, path: str, body: dict[str, Any], read_first_line: bool) -> None:
    """Call ``path`` with a client that goes away: at once, or after the first streamed line."""
    async with aiohttp.ClientSession() as session:
        first_line = asyncio.Event()

        async def call() -> None:
            async with session.post(gw.client.make_url(path), json=body) as reply:
                if read_first_line:
                    await reply.content.readline()
                    first_line.set()
                await asyncio.Event().wait()  # until cancelled: then the connection is closed

        task = asyncio.create_task(call())
        await eventually(lambda: len(gw.exchange.submitted) == 1 and (not read_first_line or first_line.is_set()),
                         "the call is submitted (and its first line reached the client)")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize("path, body, api, route", [
    ("/api/generate", GENERATE, "ollama", "generate"),
    ("/v1/chat/completions", CHAT, "openai", "chat.completions"),
])
async def test_a_client_that_disconnects_from_a_waiting_call_cancels_it(dropin_for, path: str, body: dict[str, Any],
                                                                         api: str, route: str) -> None:
    gw = await dropin_for(CancellingExchange(answer("never seen"), hold=asyncio.Event()))
    await disconnect_while(gw, path, body, read_first_line=False)
    (request,) = gw.exchange.submitted
    await eventually(lambda: gw.exchange.cancels == [(request.id, "client disconnected", None)], "the cancel")
    await eventually(lambda: gw.exchange.released == [request.id], "the waiter is released")
    assert gw.sample("nexus_gateway_dropin_disconnects_total", api=api) == 1
    assert gw.sample("nexus_gateway_dropin_requests_total", api=api, route=route, model=request.model_id,
                     code="499") == 1


@pytest.mark.parametrize("cancel_handlers", [True, False], ids=["handler-cancelled", "write-fails"])
async def test_a_client_that_disconnects_from_a_stream_cancels_it(dropin_for, cancel_handlers: bool) -> None:
    hold = asyncio.Event()
    gw = await dropin_for(CancellingExchange(answer("first", "second", "third"), hold=hold, hold_after=1),
                          access=AccessSettings(keys=(MISTRAL_ONLY,)), cancel_handlers=cancel_handlers)
    body = {"model": "mistral", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session:
        first_line = asyncio.Event()

        async def call() -> None:
            async with session.post(gw.client.make_url("/api/chat"), json=body) as reply:
                assert json.loads(await reply.content.readline())["message"]["content"] == "first"
                first_line.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(call())
        await eventually(first_line.is_set, "the first chunk reached the client")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    (request,) = gw.exchange.submitted
    if not cancel_handlers:  # the handler notices only when its next write fails
        server = gw.client.server.runner.server
        await eventually(lambda: all(handler.transport is None for handler in server.connections),
                         "the server saw the connection close")
        hold.set()
    await eventually(lambda: gw.exchange.cancels == [(request.id, "client disconnected", "team")], "the cancel")


async def test_a_client_that_stays_to_the_end_cancels_nothing(dropin_for) -> None:
    gw = await dropin_for(CancellingExchange(answer("a", "b")))
    reply = await gw.client.post("/api/chat", json={**CHAT, "model": "llama3.1"})
    assert reply.status == 200 and len((await reply.text()).splitlines()) == 3
    reply = await gw.client.post("/api/generate", json=GENERATE)
    assert reply.status == 200
    await eventually(lambda: len(gw.exchange.released) == 2, "both calls are released")
    assert gw.exchange.cancels == []
