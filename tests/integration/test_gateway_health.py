"""A gateway whose background readers die: /health goes red, the readers restart, /health goes green.

The gateway runs in this process against the real broker and the shared worker, with its
readers' consumers wrapped so the test can make them raise, and hold their restart until
it has seen /health red (no sleeps: every wait is a condition with a deadline).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer

from localdev.broker import free_port
from nexus.kafka import readers
from nexus.settings import KafkaSettings, load_settings
from producers import replies
from producers.gateway import create_app
from tests.eventually import eventually

READERS = ("replies", "endpoint-state")


REAL_READER = readers.reader


class Faults:
    """Wraps the readers' consumer factory: ``kill`` makes a reader's next fetch raise;
    while ``restarts`` is clear, a new consumer cannot start (the restart is held)."""

    def __init__(self) -> None:
        self.made: dict[str, int] = {name: 0 for name in READERS}
        self.kill: set[str] = set()
        self.restarts = asyncio.Event()
        self.restarts.set()

    def factory(self, which: str) -> Callable[..., AIOKafkaConsumer]:
        def make(kafka: KafkaSettings, client_id: str = "nexus", **options: Any) -> AIOKafkaConsumer:
            consumer = REAL_READER(kafka, client_id, **options)
            fetch, start = consumer.getmany, consumer.start

            async def faulty_fetch(*args: Any, **kwargs: Any) -> Any:
                if which in self.kill:
                    self.kill.discard(which)
                    raise ConnectionResetError(f"injected: the {which} consumer died")
                return await fetch(*args, **kwargs)

            async def held_start() -> None:
                await self.restarts.wait()
                await start()

            consumer.getmany = faulty_fetch  # type: ignore[method-assign]
            consumer.start = held_start  # type: ignore[method-assign]
            self.made[which] += 1
            return consumer

        return make


@pytest.fixture()
async def gateway(stack: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[str, Faults]]:
    faults = Faults()
    monkeypatch.setattr(replies, "reader", faults.factory("replies"))
    endpoint_state = faults.factory("endpoint-state")

    def make(kafka: KafkaSettings, client_id: str = "nexus", **options: Any) -> AIOKafkaConsumer:
        # The compacted-topic readers share one factory: only the endpoint-state one is faulty.
        faulty = client_id == "nexus-gateway-endpoint-state"
        return (endpoint_state if faulty else REAL_READER)(kafka, client_id, **options)

    monkeypatch.setattr(readers, "reader", make)
    settings = load_settings(environ=stack)
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", faults
    finally:
        faults.restarts.set()
        await runner.cleanup()


async def generate(http: httpx.AsyncClient, prompt: str) -> httpx.Response:
    return await http.post("/api/generate", json={"model": "llama3.1", "prompt": prompt, "stream": False})


async def test_dead_readers_turn_health_red_until_their_restart_is_up(gateway: tuple[str, Faults]) -> None:
    url, faults = gateway
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:

        async def health() -> dict[str, Any]:
            reply = await http.get("/health")
            return {"code": reply.status_code, **reply.json()}

        async def green() -> dict[str, Any] | None:
            seen = await health()
            return seen if seen["code"] == 200 else None

        first = await eventually(green, "a healthy gateway", timeout=30)
        assert {first["checks"][f"reader:{r}"]["status"] for r in READERS} == {"ok"}
        assert (await generate(http, "before")).json()["response"] == "[simulated llama3.1] You said: before"

        faults.restarts.clear()  # hold the restarts until /health was seen red
        faults.kill.update(READERS)

        async def red() -> dict[str, Any] | None:
            seen = await health()
            checks = [seen["checks"][f"reader:{r}"] for r in READERS]
            # Down with its failure on record: a dying reader is briefly down before its error is.
            return seen if all(c["status"] == "down" and "last_error" in c for c in checks) else None

        seen = await eventually(red, "both readers reported down", timeout=30)
        assert seen["code"] == 503 and seen["status"] == "unavailable"
        for name in READERS:
            check = seen["checks"][f"reader:{name}"]
            assert f"ConnectionResetError: injected: the {name} consumer died" in check["reason"], check
            assert check["last_error"] == f"ConnectionResetError: injected: the {name} consumer died"
        refused = await generate(http, "while down")  # refused at once, not left to time out
        assert refused.status_code == 503 and "reply reader" in refused.json()["error"], refused.text

        faults.restarts.set()

        seen = await eventually(green, "both readers up again", timeout=30)
        for name in READERS:
            assert seen["checks"][f"reader:{name}"] == {
                "status": "ok", "restarts": 1, "last_error": f"ConnectionResetError: injected: the {name} consumer died"}
        assert faults.made == {name: 2 for name in READERS}  # a new consumer each, assigned again

        # The reply reader follows from the ends again: a call is answered; the state is read again.
        assert (await generate(http, "after")).json()["response"] == "[simulated llama3.1] You said: after"

        async def live_models() -> bool:
            [endpoint] = [m for m in (await http.get("/models")).json()["models"] if m["id"] == "llama3.1"][0]["endpoints"]
            return endpoint["live"]["workers_reporting"] >= 1

        await eventually(live_models, "GET /models has live data again", timeout=30)
