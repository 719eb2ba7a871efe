"""The websocket bridge on the real broker: `nexus bridge` as a subprocess, real clients.

The bridge (and, for the end-to-end tests, a worker and a gateway) run on topics
of their own, so other tests' traffic cannot reach these clients. Most tests
produce results straight to Kafka, as a worker would, to control what is
produced when; the submit and streaming tests go through the real worker.
"""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from consumers.bridge.server import LIVE_READER, Bridge
from localdev.broker import free_port
from nexus.settings import BridgeSettings, KafkaSettings, Settings
from nexus.tasks import Background
from tests.eventually import eventually
from tests.integration.bridge_support import Publisher, WsClient
from tests.integration.support import CODEC, REPO, Role, stack_env, start_gateway, start_simulator
from schemas import decode_cancel
from schemas.queue_state import QueueReport

SLOW_CLIENT_QUEUE = 64  # NEXUS_BRIDGE_MAX_QUEUE of the bridge under test


@dataclass
class Live:
    env: dict[str, str]
    bootstrap: str
    ws_url: str
    health_url: str
    responses_topic: str
    tokens_topic: str
    logs_dir: Path

    def publisher(self) -> Publisher:
        return Publisher(self.bootstrap, self.responses_topic, self.tokens_topic)


@pytest.fixture(scope="module")
def live(bootstrap: str, logs_dir: Path) -> Iterator[Live]:
    """A simulator and a bridge on private topics (the worker starts only when a test asks)."""
    simulator = start_simulator(logs_dir, ["--ttft-ms", "20", "--tokens-per-s", "100", "--parallel", "64"])
    run = uuid.uuid4().hex[:8]
    port = free_port()
    env = stack_env(
        bootstrap,
        simulator.url,
        NEXUS_KAFKA_REQUESTS_TOPIC=f"bridge-{run}.requests",
        NEXUS_KAFKA_RESPONSES_TOPIC=f"bridge-{run}.responses",
        NEXUS_KAFKA_TOKENS_TOPIC=f"bridge-{run}.tokens",
        NEXUS_KAFKA_DLQ_TOPIC=f"bridge-{run}.dlq",
        NEXUS_KAFKA_QUEUE_TOPIC=f"bridge-{run}.queue",
        NEXUS_KAFKA_CANCELS_TOPIC=f"bridge-{run}.cancels",
        NEXUS_KAFKA_BATCH_REQUESTS_TOPIC=f"bridge-{run}.requests.batch",
        NEXUS_WORKER_APP_ID=f"nexus-bridge-test-{run}",
        NEXUS_BRIDGE_HOST="127.0.0.1",
        NEXUS_BRIDGE_PORT=str(port),
        NEXUS_BRIDGE_MAX_QUEUE=str(SLOW_CLIENT_QUEUE),
        NEXUS_TENANTS="bridge-limited:requests_per_minute=1",
    )
    bridge = Role("bridge", ["bridge"], env, logs_dir).start()
    health = f"http://127.0.0.1:{port}/health"
    try:
        bridge.wait_http(health)
        yield Live(
            env, bootstrap, f"ws://127.0.0.1:{port}/ws", health,
            env["NEXUS_KAFKA_RESPONSES_TOPIC"], env["NEXUS_KAFKA_TOKENS_TOPIC"], logs_dir,
        )
    finally:
        bridge.stop()
        simulator.stop()


@pytest.fixture(scope="module")
def worker(live: Live) -> Iterator[Role]:
    role = Role("worker", ["worker"], live.env, live.logs_dir).start()
    try:
        yield role
    finally:
        role.stop()


def _results(frames: list[dict]) -> list[str]:
    return [f["id"] for f in frames if f["type"] == "result"]


def _run() -> str:
    return uuid.uuid4().hex[:8]


# -- subscriptions -----------------------------------------------------------------------


async def test_results_go_to_the_session_and_request_subscribers_and_nobody_else(live: Live) -> None:
    run = _run()
    by_session = await WsClient.open(live.ws_url)
    by_request = await WsClient.open(live.ws_url)
    bystander = await WsClient.open(live.ws_url)
    try:
        await by_session.send({"type": "subscribe", "session_id": f"{run}-s1"})
        await by_request.send({"type": "subscribe", "request_ids": [f"{run}-r2", f"{run}-r4"]})
        await bystander.send({"type": "subscribe", "session_id": f"{run}-nobody"})
        for client, expected in (
            (by_session, {"type": "subscribed", "session_id": f"{run}-s1"}),
            (by_request, {"type": "subscribed", "request_ids": [f"{run}-r2", f"{run}-r4"]}),
            (bystander, {"type": "subscribed", "session_id": f"{run}-nobody"}),
        ):
            assert await client.next_of("subscribed") == expected

        # One partition for all, so the fence is routed after every record before it.
        async with live.publisher() as publish:
            await publish.token(f"{run}-r1", f"{run}-s1", 0, "ans")
            for request, session in (("r1", "s1"), ("r2", "s2"), ("r3", "s1"), ("r4", "s3"), ("r5", "s4")):
                await publish.result(f"{run}-{request}", f"{run}-{session}", partition=0)
            fence = (f"{run}-fence", f"{run}-nobody")
            await by_session.send({"type": "subscribe", "session_id": fence[1]})
            await by_request.send({"type": "subscribe", "session_id": fence[1]})
            await by_session.next_of("subscribed", after=1)
            await by_request.next_of("subscribed", after=1)
            await publish.result(*fence, partition=0)

        for client in (by_session, by_request, bystander):
            await client.wait_for(lambda frames: fence[0] in _results(frames))
        assert _results(by_session.frames) == [f"{run}-r1", f"{run}-r3", fence[0]]
        assert [f for f in by_session.frames if f["type"] == "token"] == [
            {"type": "token", "id": f"{run}-r1", "seq": 0, "text": "ans"}
        ]
        assert _results(by_request.frames) == [f"{run}-r2", f"{run}-r4", fence[0]]
        assert _results(bystander.frames) == [fence[0]]
        result = next(f for f in by_session.frames if f["type"] == "result")
        assert result["context"] == {"session_id": f"{run}-s1", "metadata": {}}
        assert result["output"] == f"answer to {run}-r1" and result["endpoint"] == "http://test"

        # Unsubscribed: nothing more for that session.
        await by_session.send({"type": "unsubscribe", "session_id": f"{run}-s1"})
        assert (await by_session.next_of("unsubscribed"))["session_id"] == f"{run}-s1"
        async with live.publisher() as publish:
            await publish.result(f"{run}-r6", f"{run}-s1", partition=0)
            await publish.result(f"{run}-fence2", fence[1], partition=0)
        await by_session.wait_for(lambda frames: f"{run}-fence2" in _results(frames))
        assert f"{run}-r6" not in _results(by_session.frames)
    finally:
        for client in (by_session, by_request, bystander):
            await client.close()


async def test_malformed_frames_get_errors_and_the_connection_stays_open(live: Live) -> None:
    client = await WsClient.open(live.ws_url)
    try:
        await client.send("{not json")
        await client.send({"type": "subscribe"})
        await client.send({"type": "subscribe", "session_id": "s", "since": "last tuesday"})
        await client.send({"type": "submit", "model_id": "llama3.1"})
        await client.send({"type": "submit", "model_id": "no-such-model", "input": "hi", "id": "x1"})
        await client.send({"type": "subscribe", "session_id": "still-here"})
        await client.next_of("subscribed")
        errors = client.of("error")
        assert [e["reason"][:30] for e in errors[:2]] == [
            "frame is not valid JSON: Expec", "subscribe needs exactly one of",
        ]
        assert "neither ISO-8601" in errors[2]["reason"]
        assert errors[3]["status"] == 400 and "missing required field 'input'" in errors[3]["reason"]
        assert errors[4]["status"] == 404 and errors[4]["id"] == "x1" and "no-such-model" in errors[4]["reason"]
        assert not client.closed
    finally:
        await client.close()


async def test_the_bridge_answers_health_and_refuses_other_paths(live: Live) -> None:
    async with httpx.AsyncClient() as http:
        health = await http.get(live.health_url)
        other = await http.get(live.health_url.replace("/health", "/nope"))
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert other.status_code == 404


# -- resuming with since -----------------------------------------------------------------


async def test_a_client_reconnecting_with_since_gets_what_it_missed_exactly_once(live: Live) -> None:
    run = _run()
    session = f"{run}-resume"
    ids = [f"{run}-{i:03d}" for i in range(120)]
    first = await WsClient.open(live.ws_url)
    async with live.publisher() as publish:
        await first.send({"type": "subscribe", "session_id": session})
        await first.next_of("subscribed")
        for request_id in ids[:10]:
            await publish.result(request_id, session)
        await first.wait_for(lambda frames: len(_results(frames)) == 10)
        await first.close()
        assert _results(first.frames) == ids[:10]

        # The drop: everything produced from here on was missed. The since is the next
        # millisecond, and production starts only once the clock has passed it.
        since = int(time.time() * 1000) + 1
        while int(time.time() * 1000) < since:
            await asyncio.sleep(0.001)  # wait for a clock condition, not for another task
        for request_id in ids[10:60]:
            await publish.result(request_id, session)

        # Results keep coming while the client resubscribes: the replay must hand over
        # to live delivery with no gap and no duplicate.
        some_produced = asyncio.Event()

        async def produce_during_reconnect() -> None:
            for n, request_id in enumerate(ids[60:]):
                await publish.result(request_id, session)
                if n == 10:
                    some_produced.set()

        producing = asyncio.create_task(produce_during_reconnect())
        await some_produced.wait()
        second = await WsClient.open(live.ws_url)
        try:
            await second.send({"type": "subscribe", "session_id": session, "since": since})
            await second.wait_for(lambda frames: ids[-1] in _results(frames), timeout=30)
            await producing
        finally:
            await second.close()

    assert _results(second.frames) == ids[10:]  # in order, no gap, no duplicate
    kinds = [f["type"] for f in second.frames]
    assert kinds[0] == "subscribed" and second.frames[0]["since"] == since
    assert kinds.count("replayed") == 1
    replayed = second.frames[kinds.index("replayed")]
    assert replayed["count"] >= 50, "the 50 results produced while disconnected come from history"
    assert kinds.index("replayed") == replayed["count"] + 1, "history is delivered before live results"


async def test_since_accepts_iso_8601_and_replays_request_subscriptions_with_their_tokens(live: Live) -> None:
    run = _run()
    # A watcher proves the bridge's live reader is past every record before the replaying
    # client subscribes, so all four must come from the replay.
    watcher = await WsClient.open(live.ws_url)
    for session in (f"{run}-s", f"{run}-other"):
        await watcher.send({"type": "subscribe", "session_id": session})
    await watcher.wait_for(lambda frames: len(watcher.of("subscribed")) == 2)
    async with live.publisher() as publish:
        since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - 2)) + "Z"
        await publish.token(f"{run}-a", f"{run}-s", 0, "Hel")
        await publish.token(f"{run}-a", f"{run}-s", 1, "lo")
        await publish.result(f"{run}-a", f"{run}-s", output="Hello")
        await publish.result(f"{run}-b", f"{run}-other")
        await publish.result(f"{run}-c", f"{run}-other")
    await watcher.wait_for(lambda frames: len(_data(frames)) == 5)
    await watcher.close()
    client = await WsClient.open(live.ws_url)
    try:
        await client.send({"type": "subscribe", "request_ids": [f"{run}-a", f"{run}-c"], "since": since})
        await client.next_of("replayed")
    finally:
        await client.close()
    frames = _data(client.frames)
    assert [(f["type"], f["id"], f.get("seq")) for f in frames] == [
        ("token", f"{run}-a", 0), ("token", f"{run}-a", 1), ("result", f"{run}-a", None), ("result", f"{run}-c", None),
    ]
    assert client.of("replayed")[0]["count"] == 4


def _data(frames: list[dict]) -> list[dict]:
    return [f for f in frames if f["type"] in ("token", "result")]


# -- slow consumers ----------------------------------------------------------------------


async def test_a_slow_consumer_is_closed_while_a_fast_one_keeps_receiving(live: Live) -> None:
    run = _run()
    session = f"{run}-firehose"
    count = 300
    big = "x" * 64 * 1024  # large results fill the socket buffers, then the bridge's queue
    fast = await WsClient.open(live.ws_url)
    slow = await WsClient.open(live.ws_url, max_queue=1)
    slow._reader.cancel()  # it never reads, until the end
    try:
        await slow.send({"type": "subscribe", "session_id": session})
        await fast.send({"type": "subscribe", "session_id": session})
        await fast.next_of("subscribed")
        async with live.publisher() as publish:
            sent = [await publish.result(f"{run}-{i}", session, output=big, wait=False) for i in range(count)]
            await asyncio.gather(*sent)
        await fast.wait_for(lambda frames: len(_results(frames)) == count, timeout=60)
        assert _results(fast.frames) == [f"{run}-{i}" for i in range(count)]

        # Now the slow one reads what reached it, then the close frame.
        async def read_until_closed() -> int:
            received = 0
            try:
                async for _ in slow.ws:
                    received += 1
            except ConnectionClosed:
                pass
            return received

        received = await asyncio.wait_for(read_until_closed(), timeout=30)
        assert received < count
        assert slow.ws.close_code == CloseCode.TRY_AGAIN_LATER, (slow.ws.close_code, slow.ws.close_reason)
        assert "too slow" in (slow.ws.close_reason or "")
        # The fast client is still served.
        async with live.publisher() as publish:
            await publish.result(f"{run}-after", session)
        await fast.wait_for(lambda frames: f"{run}-after" in _results(frames))
        assert not fast.closed
    finally:
        await fast.close()
        await slow.ws.close()


# -- many clients ------------------------------------------------------------------------


async def test_five_hundred_clients_each_get_exactly_their_own_results(live: Live) -> None:
    run = _run()
    n = 500
    fence = f"{run}-fence"
    gate = asyncio.Semaphore(100)

    async def join(i: int) -> WsClient:
        async with gate:
            client = await WsClient.open(live.ws_url)
            await client.send({"type": "subscribe", "session_id": f"{run}-s{i}"})
            await client.send({"type": "subscribe", "session_id": fence})
            await client.wait_for(lambda frames: len(frames) == 2)
            return client

    clients = await asyncio.gather(*(join(i) for i in range(n)))
    try:
        async with live.publisher() as publish:
            # Two results each, interleaved, all on one partition, then the fence behind them.
            sent = [
                await publish.result(f"{run}-s{i}-{k}", f"{run}-s{i}", partition=0, wait=False)
                for k in range(2) for i in range(n)
            ]
            await asyncio.gather(*sent)
            await publish.result(f"{run}-fence-result", fence, partition=0)
        await asyncio.gather(
            *(c.wait_for(lambda frames: f"{run}-fence-result" in _results(frames), timeout=60) for c in clients)
        )
        for i, client in enumerate(clients):
            assert _results(client.frames) == [f"{run}-s{i}-0", f"{run}-s{i}-1", f"{run}-fence-result"]
    finally:
        await asyncio.gather(*(c.close() for c in clients))


# -- through the worker ------------------------------------------------------------------


async def test_submits_over_the_socket_count_against_the_tenants_limits(live: Live) -> None:
    """The bridge admits as the gateway does: the tenant's second request of the minute is refused,
    with when to come back, and nothing is produced for it."""
    run = _run()
    client = await WsClient.open(live.ws_url)
    try:
        for n in (1, 2):
            await client.send({"type": "submit", "id": f"{run}-{n}", "model_id": "llama3.1", "input": "hi",
                               "tenant": "bridge-limited"})
        accepted = await client.next_of("accepted")
        refused = await client.next_of("error")
    finally:
        await client.close()
    assert accepted["id"] == f"{run}-1"
    assert refused["id"] == f"{run}-2" and refused["status"] == 429, refused
    assert refused["limit"] == "requests_per_minute" and 1 <= refused["retry_after_s"] <= 60, refused
    assert "bridge-limited" in refused["reason"]


async def test_submit_over_the_socket_is_accepted_then_answered(live: Live, worker: Role) -> None:
    run = _run()
    client = await WsClient.open(live.ws_url)
    try:
        await client.send({
            "type": "submit", "id": f"{run}-q", "model_id": "llama3.1", "input": "Hello, bridge!",
            "context": {"session_id": f"{run}-s", "metadata": {"user": "alice"}},
        })
        accepted = await client.next_of("accepted")
        assert accepted == {"type": "accepted", "id": f"{run}-q", "session_id": f"{run}-s"}
        result = await client.next_of("result", timeout=60)
    finally:
        await client.close()
    assert result["id"] == f"{run}-q" and result["status"] == "ok", result
    assert result["output"] == "[simulated llama3.1] You said: Hello, bridge!"
    assert result["context"] == {"session_id": f"{run}-s", "metadata": {"user": "alice"}}
    assert result["endpoint"] == live.env["OLLAMA_HOST"]
    assert client.frames.index(accepted) < client.frames.index(result)


async def test_streamed_tokens_arrive_in_order_and_concatenate_to_the_result(live: Live, worker: Role) -> None:
    run = _run()
    prompt = "please stream this answer back to me one small token at a time, in order"
    client = await WsClient.open(live.ws_url)
    try:
        await client.send({
            "type": "submit", "id": f"{run}-stream", "model_id": "mistral", "input": prompt,
            "stream": True, "context": {"session_id": f"{run}-s"},
        })
        result = await client.next_of("result", timeout=60)
    finally:
        await client.close()
    assert result["status"] == "ok", result
    assert result["output"] == f"[simulated mistral] You said: {prompt}"
    tokens = client.of("token")
    assert len(tokens) >= 2, "the simulator streams ~20 tokens over ~200 ms: expected several chunks"
    assert [t["seq"] for t in tokens] == list(range(len(tokens)))
    assert {t["id"] for t in tokens} == {f"{run}-stream"}
    assert "".join(t["text"] for t in tokens) == result["output"]
    assert client.frames.index(tokens[-1]) < client.frames.index(result)


async def test_a_conversation_submitted_over_the_socket_streams_its_tool_call_to_the_result(
    live: Live, worker: Role
) -> None:
    run = _run()
    weather = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    client = await WsClient.open(live.ws_url)
    try:
        await client.send({
            "type": "submit", "id": f"{run}-tools", "model_id": "llama3.1", "stream": True,
            "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Weather in Oslo?"}],
            "tools": [weather], "context": {"session_id": f"{run}-s"},
        })
        result = await client.next_of("result", timeout=60)
    finally:
        await client.close()
    assert result["status"] == "ok", result
    [call] = result["tool_calls"]
    assert call["name"] == "get_weather" and isinstance(call["arguments"]["city"], str)
    assert result["message"] == {"role": "assistant", "content": "", "tool_calls": [call]}
    streamed = [c for t in client.of("token") for c in t.get("tool_calls", [])]
    assert streamed == [call], "the tool call streamed in a token frame, as the model sent it"


# -- the page ----------------------------------------------------------------------------

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
SCREENSHOT = REPO / ".cache" / "screenshots" / "page.png"  # .cache/ and *.png are git-ignored


@pytest.fixture(scope="module")
def page_gateway(live: Live) -> Iterator[Role]:
    """A gateway whose /config.json points the page at the bridge under test."""
    role = start_gateway(live.env, live.logs_dir)
    try:
        yield role
    finally:
        role.stop()


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Debian's chromium is not installed (`apt-get install chromium`; .ci/run installs it)")
    return path


async def test_the_page_submits_a_prompt_and_shows_the_streamed_answer(
    live: Live, worker: Role, page_gateway: Role
) -> None:
    async_api = pytest.importorskip("playwright.async_api", reason="playwright is in the [test] extra")
    executable = chromium_path()
    prompt = "Hello from the page, token by token"
    expected = f"[simulated llama3.1] You said: {prompt}"
    async with async_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1200, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(page_gateway.url + "/")
            await page.wait_for_selector("#connection[data-state=open]", timeout=15_000)
            await page.select_option("#model", "llama3.1")
            await page.fill("#prompt", prompt)
            await page.click("#submit")
            # The streaming state may last only a few frames; the page's own record of the run
            # (chunks shown, first-token time) is what proves the answer arrived token by token.
            await page.wait_for_selector("#answer[data-state=done]", timeout=30_000)
            answer = await page.text_content("#answer")
            run = await page.evaluate("window.nexusPage.lastRun")
            endpoint = await page.text_content("#endpoint")
            recent = await page.eval_on_selector_all("#recent tr", "rows => rows.map(r => r.dataset.id)")
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            await browser.close()
    assert errors == []
    assert answer == expected
    assert run["streamed_text"] == expected and run["chunks"] >= 2, "the answer is shown chunk by chunk"
    assert run["ttft_ms"] is not None
    assert 0 < run["ttft_ms"] <= run["result_ms"]
    assert endpoint == live.env["OLLAMA_HOST"]
    assert run["id"] in recent, "the live view of all sessions lists the request"


async def test_two_bridges_side_by_side_each_deliver_every_result(live: Live) -> None:
    """No consumer group: a second bridge does not take partitions away from the first."""
    port = free_port()
    second = Role("bridge", ["bridge"], {**live.env, "NEXUS_BRIDGE_PORT": str(port)}, live.logs_dir).start()
    try:
        second.wait_http(f"http://127.0.0.1:{port}/health")
        run = _run()
        sessions = [f"{run}-s{i}" for i in range(16)]  # spread over the partitions
        clients = [await WsClient.open(live.ws_url), await WsClient.open(f"ws://127.0.0.1:{port}/ws")]
        for client in clients:
            for session in sessions:
                await client.send({"type": "subscribe", "session_id": session})
            await client.wait_for(lambda frames: len(frames) == len(sessions))
        async with live.publisher() as publish:
            for i, session in enumerate(sessions):
                await publish.result(f"{run}-r{i}", session)
        expected = {f"{run}-r{i}" for i in range(len(sessions))}
        for client in clients:
            await client.wait_for(lambda frames: set(_results(frames)) >= expected)
            assert sorted(_results(client.frames)) == sorted(expected)
            await client.close()
    finally:
        second.stop()


# -- a live reader that dies -------------------------------------------------------------


async def test_a_live_reader_that_dies_is_restarted_where_it_stopped_and_shown_on_health(
    bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process, so its fetch can be made to fail; what was written while it was down still arrives."""
    run = _run()
    kafka = KafkaSettings(
        bootstrap=bootstrap, partitions=2, requests_topic=f"bridge-{run}.requests",
        responses_topic=f"bridge-{run}.responses", tokens_topic=f"bridge-{run}.tokens", dlq_topic=f"bridge-{run}.dlq",
    )
    settings = Settings(kafka=kafka, bridge=BridgeSettings(host="127.0.0.1", port=0))
    fetch = AIOKafkaConsumer.getmany
    failures: list[Exception] = []

    async def fails_when_told(self: AIOKafkaConsumer, *args: object, **kwargs: object) -> object:
        # Only the live reader's fetch (the queue reports' reader fetches too).
        if failures and any(tp.topic == kafka.responses_topic for tp in self.assignment()):
            raise failures.pop()
        return await fetch(self, *args, **kwargs)

    open_reader = Bridge._open_reader
    may_restart = asyncio.Event()

    async def held_restart(self: Bridge) -> AIOKafkaConsumer:
        if self._core.positions:  # not the first start: a restart, held until the test lets it go
            await may_restart.wait()
        return await open_reader(self)

    monkeypatch.setattr(AIOKafkaConsumer, "getmany", fails_when_told)
    monkeypatch.setattr(Bridge, "_open_reader", held_restart)
    bridge = Bridge(settings, background=Background(pauses=(0.05,)))
    await bridge.start()
    client = None
    try:
        health_url = f"http://127.0.0.1:{bridge.port}/health"

        async def reader_state() -> dict:
            async with httpx.AsyncClient() as http:
                return (await http.get(health_url)).json()

        client = await WsClient.open(f"ws://127.0.0.1:{bridge.port}/ws")
        await client.send({"type": "subscribe", "session_id": f"{run}-s"})
        await client.next_of("subscribed")
        async with Publisher(bootstrap, kafka.responses_topic, kafka.tokens_topic) as publish:
            await publish.result(f"{run}-before", f"{run}-s")
            assert (await client.next_of("result"))["id"] == f"{run}-before"

            failures.append(KafkaError("injected: the broker went away"))
            await eventually(lambda: not failures, "the live reader hit the injected failure")
            await publish.result(f"{run}-while-down", f"{run}-s")  # written while no reader runs
            may_restart.set()

            async def restarted() -> dict | None:
                body = await reader_state()
                task = body["tasks"][LIVE_READER]
                return body if task["restarts"] == 1 and task["running"] else None

            body = await eventually(restarted, "the live reader restarted after its injected failure")
            assert body["status"] == "ok" and {"clients", "subscribed"} <= set(body)
            assert "injected: the broker went away" in body["tasks"][LIVE_READER]["last_error"]
            await publish.result(f"{run}-after", f"{run}-s")
            await client.wait_for(lambda fs: f"{run}-after" in {f.get("id") for f in fs if f["type"] == "result"})
        # Nothing written while the reader was down is missed, nothing is delivered twice.
        assert [f["id"] for f in client.of("result")] == [f"{run}-before", f"{run}-while-down", f"{run}-after"]
    finally:
        if client is not None:
            await client.close()
        await bridge.stop()


# -- scheduling: queued frames and cancel ----------------------------------------------


async def test_queued_frames_follow_the_queue_reports_and_cancel_frames_are_written(live: Live) -> None:
    run = _run()
    session = f"{run}-s"
    client = await WsClient.open(live.ws_url)
    producer = AIOKafkaProducer(bootstrap_servers=live.bootstrap)
    await producer.start()
    queue_topic = live.env["NEXUS_KAFKA_QUEUE_TOPIC"]

    async def publish(*positions: int) -> None:
        report = QueueReport(worker=f"fake-{run}", model="llama3.1", at=time.time(), rate_per_s=1.0, waiting=[
            {"id": f"{run}-r{i}", "session_id": session, "tenant": "t", "priority": "interactive",
             "position": p, "eta_s": float(p), "waited_s": 0.0} for i, p in enumerate(positions)])
        await producer.send_and_wait(queue_topic, key=report.key, value=report.to_bytes())

    try:
        await client.send({"type": "subscribe", "session_id": session})
        await client.next_of("subscribed")
        await publish(40, 41)
        await client.wait_for(lambda frames: len([f for f in frames if f["type"] == "queued"]) == 2)
        first = {f["id"]: f for f in client.of("queued")}
        assert first[f"{run}-r0"]["position"] == 40 and first[f"{run}-r0"]["model"] == "llama3.1"
        assert 38_000 <= first[f"{run}-r0"]["eta_ms"] <= 40_000
        await publish(39, 40)  # one place: not worth a frame at position 40
        await publish(20, 21)  # half-way: worth one each
        await client.wait_for(lambda frames: len([f for f in frames if f["type"] == "queued"]) == 4)
        assert [f["position"] for f in client.of("queued")[2:]] == [20, 21]

        cancels = AIOKafkaConsumer(bootstrap_servers=live.bootstrap, group_id=None, auto_offset_reset="earliest")
        await cancels.start()
        try:
            cancels.subscribe([live.env["NEXUS_KAFKA_CANCELS_TOPIC"]])
            await client.send({"type": "cancel", "id": f"{run}-r0"})
            assert await client.next_of("cancelling") == {"type": "cancelling", "id": f"{run}-r0"}
            record = await asyncio.wait_for(cancels.getone(), 20)
            cancel = decode_cancel(CODEC, record.value)
            assert cancel.id == f"{run}-r0" and record.key == f"{run}-r0".encode() and "cancel frame" in cancel.reason
        finally:
            await cancels.stop()
        await client.send({"type": "cancel"})
        assert "'id' must be a non-empty string" in (await client.next_of("error"))["reason"]
    finally:
        await producer.stop()
        await client.close()
