"""The simulator tells when a client cut a generation short: the stream closed early, generation stopped.

Tests of cancellation (a worker aborting a running call) need to see from the model server's side
that the call really stopped, as Ollama stops generating when its client goes away.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from localdev.simulator.model import MAX_STOPPED, SimulatorConfig, SimulatorStats
from localdev.simulator.server import RunningSimulator, start_server
from tests.eventually import eventually

LONG_PROMPT = " ".join(["word"] * 200)  # over 200 tokens at 50 tok/s: about 4 s if never stopped


@asynccontextmanager
async def running(**overrides: Any) -> AsyncIterator[tuple[httpx.AsyncClient, RunningSimulator]]:
    config = SimulatorConfig(**{"ttft_ms": 0.0, "tokens_per_s": 0.0, **overrides})
    async with await start_server(config, port=0) as sim:
        async with httpx.AsyncClient(base_url=sim.url, timeout=5.0) as client:
            yield client, sim


async def test_a_stream_closed_by_its_client_stops_the_generation_and_says_which() -> None:
    async with running(tokens_per_s=50.0) as (client, sim):
        async with client.stream("POST", "/api/generate",
                                 json={"model": "mistral", "prompt": LONG_PROMPT}) as response:
            lines = response.aiter_lines()
            for _ in range(3):
                assert json.loads(await anext(lines))["done"] is False
        await eventually(lambda: sim.stats.generations_stopped == 1, "the simulator saw the stream closed")
        tokens = sim.stats.tokens_generated
        stats = (await client.get("/simulator/stats")).json()
        # The generation does not go on after the client left: no more tokens are made.
        assert sim.stats.tokens_generated == tokens
    assert stats["generations_stopped"] == stats["streams_closed_early"] == 1
    [stopped] = stats["stopped"]
    assert stopped["path"] == "/api/generate" and stopped["model"] == "mistral" and stopped["stream"] is True
    assert stopped["prompt"] == LONG_PROMPT[:200]
    assert 3 <= stopped["tokens_streamed"] < stopped["tokens_planned"], stopped
    assert stats["active"] == 0, "its slot is free again"


async def test_a_non_streamed_call_abandoned_mid_generation_is_a_stop_but_not_a_closed_stream() -> None:
    async with running(ttft_ms=3000.0) as (client, sim):
        try:
            await client.post("/api/chat", json={"model": "mistral", "stream": False,
                                                 "messages": [{"role": "user", "content": "slow one"}]}, timeout=0.3)
        except httpx.TimeoutException:
            pass
        await eventually(lambda: sim.stats.generations_stopped == 1, "the simulator saw the call abandoned")
        snapshot = sim.stats.snapshot()
    assert snapshot["streams_closed_early"] == 0
    [stopped] = snapshot["stopped"]
    assert stopped == {"path": "/api/chat", "model": "mistral", "prompt": "slow one", "stream": False,
                       "tokens_streamed": 0, "tokens_planned": stopped["tokens_planned"]}


async def test_a_finished_stream_and_a_client_waiting_for_a_slot_are_not_stops() -> None:
    async with running(parallel=1, tokens_per_s=50.0) as (client, sim):
        async with client.stream("POST", "/api/generate",
                                 json={"model": "mistral", "prompt": LONG_PROMPT}) as holder:
            lines = holder.aiter_lines()  # kept: a dropped line iterator closes the stream
            await anext(lines)  # holds the only slot
            try:  # queued behind it, then gives up before it got the slot
                await client.post("/api/generate", json={"model": "mistral", "prompt": "q", "stream": False},
                                  timeout=0.2)
            except httpx.TimeoutException:
                pass
            await eventually(lambda: sim.stats.disconnects == 1, "the queued client's leaving was seen")
            assert sim.stats.generations_stopped == 0
        await eventually(lambda: sim.stats.generations_stopped == 1, "the holder's stream closed early")
        done = await client.post("/api/generate", json={"model": "mistral", "prompt": "quick"}, timeout=5)
        assert done.status_code == 200 and done.text.strip().splitlines()[-1].find('"done":true') >= 0
    assert sim.stats.generations_stopped == 1, "a stream read to its end is no stop"


def test_the_stopped_list_is_bounded_and_keeps_the_newest() -> None:
    stats = SimulatorStats()
    for i in range(MAX_STOPPED + 5):
        stats.record_stop("/api/generate", "m", f"p{i}", i, i + 1, stream=True)
    assert stats.generations_stopped == stats.streams_closed_early == MAX_STOPPED + 5
    assert len(stats.stopped) == MAX_STOPPED and stats.stopped[-1]["prompt"] == f"p{MAX_STOPPED + 4}"
