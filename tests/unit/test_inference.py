"""Inference's waiting line for endpoint slots, without Kafka or HTTP: who is woken, when.

A freed slot wakes the oldest waiting request, promptly; a waiter that leaves by another
way leaves the line, so no later wake-up is spent on it. The timeouts below are shorter
than the safety-net poll (routing.MAX_WAIT_S), so a lost wake-up fails them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from nexus.settings import EndpointSettings, ModelSettings, Settings
from schemas import InferenceRequest, ModelContext
from streams.answering.cache import CacheEntry
from streams.answering.inference import Inference, Unavailable
from streams.metrics import WorkerMetrics
from streams.answering.routing import MAX_WAIT_S

URL = "http://a.invalid"
PROMPT_WAKE_S = MAX_WAIT_S / 2


class NoCache:
    def get(self, key: bytes) -> CacheEntry | None:
        return None

    async def put(self, request: InferenceRequest, key: bytes, entry: CacheEntry) -> None:
        return None


@pytest.fixture()
async def inference() -> AsyncIterator[Inference]:
    settings = Settings(models=(
        ModelSettings("m", (EndpointSettings(URL, max_concurrency=1),), fallback="b"),
        ModelSettings("b", (EndpointSettings("http://b.invalid"),)),
    ))
    async with aiohttp.ClientSession() as http:  # never used: nothing here calls an endpoint
        yield Inference(settings, http, WorkerMetrics(), NoCache())


def request(n: int) -> InferenceRequest:
    return InferenceRequest(f"r{n}", "m", "x", ModelContext(f"s{n}"))


async def until(condition: Callable[[], bool]) -> None:
    """Let the other tasks run until ``condition`` holds (bounded, no clock involved)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


def acquire(inf: Inference, n: int, can_fall_back: bool = False) -> asyncio.Task[tuple[str, float]]:
    deadline = time.monotonic() + 30
    return asyncio.ensure_future(inf._acquire(inf.routers["m"], request(n), deadline, frozenset(), can_fall_back))


async def test_a_freed_slot_wakes_the_oldest_waiter_promptly(inference: Inference) -> None:
    router = inference.routers["m"]
    await acquire(inference, 0)
    waiters = [acquire(inference, n) for n in (1, 2, 3)]
    await until(lambda: len(inference._waiting["m"]) == 3)
    for turn, waiter in enumerate(waiters):
        router.succeeded(URL, 0.1)
        inference._notify(router)
        await asyncio.wait_for(waiter, timeout=PROMPT_WAKE_S)  # the oldest, long before the poll
        await until(lambda: router.endpoints[URL].in_flight == 1)
        assert [w.done() for w in waiters] == [i <= turn for i in range(3)], "one slot, one waiter"
        assert len(inference._waiting["m"]) == 2 - turn


async def test_a_waiter_served_by_the_safety_poll_leaves_the_line(inference: Inference) -> None:
    """Otherwise the next freed slot's wake-up goes to a request that is no longer waiting."""
    router = inference.routers["m"]
    await acquire(inference, 0)
    first = acquire(inference, 1)
    await until(lambda: len(inference._waiting["m"]) == 1)
    router.released(URL)  # a slot frees without a wake-up: only the safety-net poll finds it
    await asyncio.wait_for(first, timeout=MAX_WAIT_S * 4)
    assert len(inference._waiting["m"]) == 0
    second = acquire(inference, 2)
    await until(lambda: len(inference._waiting["m"]) == 1)
    router.succeeded(URL, 0.1)
    inference._notify(router)
    await asyncio.wait_for(second, timeout=PROMPT_WAKE_S)


async def test_a_cancelled_waiter_leaves_the_line(inference: Inference) -> None:
    router = inference.routers["m"]
    await acquire(inference, 0)
    gone, staying = acquire(inference, 1), acquire(inference, 2)
    await until(lambda: len(inference._waiting["m"]) == 2)
    gone.cancel()
    await until(lambda: len(inference._waiting["m"]) == 1)
    router.succeeded(URL, 0.1)
    inference._notify(router)
    await asyncio.wait_for(staying, timeout=PROMPT_WAKE_S)


async def test_when_every_endpoint_is_down_waiters_with_a_fallback_leave_at_once(inference: Inference) -> None:
    router = inference.routers["m"]
    await acquire(inference, 0)
    with_fallback, without = acquire(inference, 1, can_fall_back=True), acquire(inference, 2)
    await until(lambda: len(inference._waiting["m"]) == 2)
    router.failed(URL, time.monotonic(), "refused")  # the held request fails ...
    for _ in range(2):  # ... and two more: the circuit opens
        router.endpoints[URL].in_flight += 1
        router.failed(URL, time.monotonic(), "refused")
    inference._notify(router)
    with pytest.raises(Unavailable):
        await asyncio.wait_for(with_fallback, timeout=PROMPT_WAKE_S)
    assert not without.done(), "without a fallback it waits for the endpoint to come back"
    assert len(inference._waiting["m"]) == 1
    without.cancel()
