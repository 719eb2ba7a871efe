"""A request's whole answering path against the in-memory backend and a manual clock.

Retries, fallback, deadlines, "server busy" and circuit probes run in-process: time moves
only when the test (or :func:`drive`, jumping to the next timer once every task waits on
time) moves it, so five-second cool-downs take microseconds. Each test asserts the
outcome and how many calls each endpoint received.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import timedelta

import pytest

from nexus.settings import EndpointSettings, ModelSettings, Settings
from schemas import BAD_REQUEST, InferenceOptions, InferenceRequest, Message, ModelContext, Tool, ToolCall, utcnow
from streams.answering.cache import CacheEntry
from streams.answering.clock import ManualClock
from streams.answering.inference import Answer, Inference
from streams.answering.routing import Circuit
from streams.backends.memory import Failure, Hold, MemoryBackend, Reply, bad_request, refused, server_busy, server_error
from streams.metrics import WorkerMetrics

A, B, F = "http://a", "http://b", "http://f"


class DictCache:
    def __init__(self) -> None:
        self.entries: dict[bytes, CacheEntry] = {}

    def get(self, key: bytes) -> CacheEntry | None:
        return self.entries.get(key)

    async def put(self, request: InferenceRequest, key: bytes, entry: CacheEntry) -> None:
        self.entries[key] = entry


class Sink:
    def __init__(self) -> None:
        self.started = False
        self.chunks: list[str] = []
        self.tool_calls: list[ToolCall] = []

    async def chunk(self, text: str, tool_calls: tuple[ToolCall, ...] = (), *, flush: bool = False) -> None:
        self.started = True
        self.chunks.append(text)
        self.tool_calls.extend(tool_calls)


@dataclass
class World:
    inference: Inference
    backend: MemoryBackend
    clock: ManualClock
    metrics: WorkerMetrics

    def answer(self, request: InferenceRequest, sink: Sink | None = None) -> asyncio.Task[Answer]:
        return asyncio.ensure_future(self.inference.answer(request, sink))

    def state(self, model: str, url: str):  # type: ignore[no-untyped-def]
        return self.inference.routers[model].endpoints[url]

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture()
async def make() -> AsyncIterator[Callable[..., World]]:
    made: list[Inference] = []

    def world(*models: ModelSettings) -> World:
        clock = ManualClock()
        backend = MemoryBackend(clock)
        metrics = WorkerMetrics()
        inference = Inference(
            Settings(models=models), None, metrics, DictCache(), clock, random.Random(3), backend=backend
        )
        made.append(inference)
        return World(inference, backend, clock, metrics)

    yield world
    for inference in made:
        await inference.aclose()


def endpoint(url: str, weight: float = 1.0, max_concurrency: int = 4) -> EndpointSettings:
    return EndpointSettings(url, weight=weight, max_concurrency=max_concurrency)


def request(n: int = 0, model: str = "m", deadline_s: float | None = None, **changes: object) -> InferenceRequest:
    deadline = utcnow() + timedelta(seconds=deadline_s) if deadline_s is not None else None
    return InferenceRequest(f"r{n}", model, f"prompt {n}", ModelContext(f"s{n}"), deadline=deadline, **changes)  # type: ignore[arg-type]


async def settle() -> None:
    """Let every task that can run do so; the clock stands still."""
    for _ in range(30):
        await asyncio.sleep(0)


async def drive(clock: ManualClock, condition: Callable[[], bool], limit: int = 2000) -> None:
    """Run until ``condition``: whenever every task waits on time, jump to the next timer."""
    for _ in range(limit):
        await settle()
        if condition():
            return
        assert clock.advance_to_next(), "every task waits, and not on time: stuck"
    raise AssertionError(f"condition never held (clock at {clock()})")


async def finish(world: World, task: asyncio.Task[Answer]) -> Answer:
    await drive(world.clock, task.done)
    return task.result()


# ----------------------------------------------------------------------------- retries


async def test_a_retryable_failure_is_retried_on_another_endpoint(make: Callable[..., World]) -> None:
    w = make(ModelSettings("m", (endpoint(A, weight=2.0), endpoint(B))))  # A first: twice the weight
    w.backend.script(A, server_error(500, "out of memory"))
    answer = await finish(w, w.answer(request()))
    response = answer.response
    assert response.status == "ok" and response.endpoint == B, response
    assert response.output == "[memory m] prompt 0" and response.retries == 1
    assert (w.backend.calls(A), w.backend.calls(B)) == (1, 1)
    assert w.state("m", A).failed == 1 and w.state("m", A).last_error == "http://a answered 500: 'out of memory'"
    assert w.state("m", A).in_flight == w.state("m", B).in_flight == 0
    assert w.sample("nexus_worker_retries_total", model="m") == 1
    assert w.sample("nexus_worker_backend_requests_total", model="m", endpoint=A, outcome="error") == 1
    assert w.sample("nexus_worker_backend_requests_total", model="m", endpoint=B, outcome="ok") == 1
    assert answer.dead_letter_reason is None


async def test_calls_that_never_connected_do_not_use_up_the_retries(make: Callable[..., World]) -> None:
    w = make(ModelSettings("m", (endpoint(A, weight=2.0), endpoint(B)), retries=1))
    w.backend.script(A, refused())
    w.backend.script(B, refused(), server_error(502))
    response = (await finish(w, w.answer(request()))).response
    # A refused, B refused: nothing spent. B again (the session's last endpoint) fails after
    # connecting: one retry spent of one allowed, so B once more, which answers.
    assert response.status == "ok" and response.endpoint == B, response
    assert (w.backend.calls(A), w.backend.calls(B)) == (1, 3) and response.retries == 3
    assert w.sample("nexus_worker_retries_total", model="m") == 3


async def test_a_non_retryable_error_is_answered_at_once(make: Callable[..., World]) -> None:
    w = make(ModelSettings("m", (endpoint(A, weight=2.0), endpoint(B))))
    w.backend.script(A, server_error(403, "forbidden"))
    answer = await finish(w, w.answer(request()))
    assert answer.response.status == "error" and answer.response.retries == 0
    assert answer.response.error == "http://a answered 403: 'forbidden'" and answer.response.error_kind is None
    assert answer.dead_letter_reason == answer.response.error
    assert (w.backend.calls(A), w.backend.calls(B)) == (1, 0)
    state = w.state("m", A)
    assert state.failed == 0 and state.circuit is Circuit.CLOSED, "the request's fault, not the endpoint's"
    assert w.sample("nexus_worker_requests_total", model="m", status="error") == 1


async def test_a_request_the_backend_refuses_is_a_bad_request_in_its_own_words(make: Callable[..., World]) -> None:
    w = make(
        ModelSettings("m", (endpoint(A, weight=2.0), endpoint(B)), retries=3, fallback="f"),
        ModelSettings("f", (endpoint(F),)),
    )
    refusal = "registry.ollama.ai/library/smollm2:135m does not support tools"
    w.backend.script(A, bad_request(refusal), bad_request(refusal), bad_request(refusal))
    answers = [await finish(w, w.answer(request(n))) for n in range(3)]  # more than the circuit's threshold
    for answer in answers:
        response = answer.response
        assert (response.status, response.error_kind, response.error) == ("error", BAD_REQUEST, refusal)
        assert response.retries == 0
        assert answer.dead_letter_reason == f"http://a answered 400: {refusal!r}", "the operator sees the endpoint"
    assert (w.backend.calls(A), w.backend.calls(B), w.backend.calls(F)) == (3, 0, 0), "no retry, no fallback"
    state = w.state("m", A)
    assert state.failed == 0 and state.consecutive_failures == 0 and state.circuit is Circuit.CLOSED
    assert w.sample("nexus_worker_retries_total", model="m") == 0
    assert w.sample("nexus_worker_backend_requests_total", model="m", endpoint=A, outcome="error") == 3
    answer = await finish(w, w.answer(request(9)))
    assert answer.response.status == "ok" and answer.response.endpoint == A, "the endpoint serves on"


async def test_a_stream_broken_after_its_first_chunk_is_not_retried(make: Callable[..., World]) -> None:
    w = make(ModelSettings("m", (endpoint(A, weight=2.0), endpoint(B))))
    w.backend.script(A, Failure("ended the stream without a final chunk", chunks=("half an",)))
    sink = Sink()
    answer = await finish(w, w.answer(request(stream=True), sink))
    assert answer.response.status == "error" and sink.chunks == ["half an"]
    assert (w.backend.calls(A), w.backend.calls(B)) == (1, 0), "a second answer would not concatenate"


async def test_after_its_retries_a_request_falls_back_to_the_fallback_model(make: Callable[..., World]) -> None:
    w = make(
        ModelSettings("m", (endpoint(A), endpoint(B)), retries=1, fallback="f"),
        ModelSettings("f", (endpoint(F),)),
    )
    w.backend.script(A, then=server_error(500))
    w.backend.script(B, then=server_error(503, "overloaded"))
    response = (await finish(w, w.answer(request()))).response
    assert response.status == "ok" and response.endpoint == F and response.model_id == "m"
    assert response.output == "[memory f] prompt 0", "answered by the fallback model"
    assert (w.backend.calls(A), w.backend.calls(B), w.backend.calls(F)) == (1, 1, 1)
    assert response.retries == 1, "one repeated call of m, none of f"
    assert w.sample("nexus_worker_retries_total", model="m") == 1


async def test_every_endpoint_failing_without_a_fallback_answers_all_the_reasons(make: Callable[..., World]) -> None:
    w = make(ModelSettings("m", (endpoint(A, weight=2.0), endpoint(B)), retries=1))
    w.backend.script(A, then=server_error(500, "a down"))
    w.backend.script(B, then=server_error(500, "b down"))
    answer = await finish(w, w.answer(request()))
    assert answer.response.status == "error" and answer.response.retries == 1
    assert answer.response.error == "http://a answered 500: 'a down'; http://b answered 500: 'b down'"
    assert (w.backend.calls(A), w.backend.calls(B)) == (1, 1), "retries=1: two calls in all"


async def test_a_model_whose_circuits_are_all_open_goes_to_the_fallback_without_waiting(
    make: Callable[..., World],
) -> None:
    w = make(ModelSettings("m", (endpoint(A),), fallback="f"), ModelSettings("f", (endpoint(F),)))
    for _ in range(3):  # three failures in a row open A's circuit
        w.state("m", A).in_flight += 1
        w.inference.routers["m"].failed(A, w.clock(), "refused")
    response = (await finish(w, w.answer(request()))).response
    assert response.status == "ok" and response.endpoint == F
    assert w.backend.calls(A) == 0 and w.clock() == 1000.0, "no call, no wait"


# ----------------------------------------------------------------------------- deadlines


async def test_the_deadline_passing_while_waiting_for_a_slot_expires_the_request(make: Callable[..., World]) -> None:
    w = make(ModelSettings("m", (endpoint(A, max_concurrency=1),)))
    gate = asyncio.Event()
    w.backend.script(A, Hold(gate, Reply("first")))
    first = w.answer(request(1))
    await settle()
    assert w.backend.calls(A) == 1
    second = w.answer(request(2, deadline_s=5))
    answer = await finish(w, second)
    assert answer.response.status == "expired"
    assert answer.response.error == (
        "expired: deadline passed before an endpoint of 'm' answered; endpoints: http://a closed"
    )
    assert 1004.9 < w.clock() < 1005.1 and not first.done()
    assert w.backend.calls(A) == 1 and len(w.inference.lines["m"]) == 0, "it left the line, never called"
    gate.set()
    assert (await finish(w, first)).response.output == "first"


async def test_the_deadline_passing_during_a_call_expires_it_without_blaming_the_endpoint(
    make: Callable[..., World],
) -> None:
    w = make(ModelSettings("m", (endpoint(A), endpoint(B))))
    w.backend.script(A, Hold())  # never answers
    w.backend.script(B, Hold())
    answer = await finish(w, w.answer(request(deadline_s=3)))
    error = answer.response.error or ""
    assert answer.response.status == "expired" and error.startswith("expired: deadline passed before an endpoint of 'm'")
    assert "did not answer within" in error and 1002.9 < w.clock() < 1003.1
    assert w.backend.calls(A) + w.backend.calls(B) == 1, "cut at the deadline: no time for another"
    called = A if w.backend.calls(A) else B
    state = w.state("m", called)
    assert state.failed == 0 and state.circuit is Circuit.CLOSED and state.in_flight == 0
    assert w.backend.endpoint(called).calls[0].timeout_s == pytest.approx(3, abs=0.1), "the call gets the time left"


# ----------------------------------------------------------------------------- busy and circuits


async def test_server_busy_lowers_the_endpoints_concurrency_until_answers_raise_it(make: Callable[..., World]) -> None:
    w = make(ModelSettings("m", (endpoint(A, max_concurrency=4),)))
    gate = asyncio.Event()
    w.backend.script(A, Hold(gate), Hold(gate), server_busy())
    tasks = [w.answer(request(n)) for n in range(4)]
    await settle()
    state = w.state("m", A)
    assert w.backend.calls(A) == 3 and state.capacity() == 2, "it held two when it said busy"
    assert state.circuit is Circuit.CLOSED and state.failed == 0
    w.clock.advance(2.0)  # past any backoff: the busy one tries again, and waits with the fourth
    await settle()
    assert w.backend.calls(A) == 3 and len(w.inference.lines["m"]) == 2, "no more than it holds"
    gate.set()
    answers = [await finish(w, t) for t in tasks]
    assert [a.response.status for a in answers] == ["ok"] * 4
    assert answers[2].response.retries == 1 and w.backend.calls(A) == 5
    assert w.backend.endpoint(A).most_in_flight == 3
    assert w.sample("nexus_worker_backend_requests_total", model="m", endpoint=A, outcome="error") == 1


async def test_an_open_circuit_is_probed_and_closed_again(make: Callable[..., World]) -> None:
    w = make(ModelSettings("m", (endpoint(A),)))
    w.backend.script(A, refused(), refused(), refused())  # then it answers
    w.backend.endpoint(A).healthy = False
    state = w.state("m", A)
    task = w.answer(request(deadline_s=60))
    await drive(w.clock, lambda: state.circuit is Circuit.OPEN)
    opened = w.clock()
    assert w.backend.calls(A) == 3 and w.backend.probes(A) == 0
    assert w.sample("nexus_worker_circuit_state", model="m", endpoint=A) == 2
    await drive(w.clock, lambda: w.backend.probes(A) == 1)
    assert w.clock() >= opened + 5.0, "probed after the cool-down"
    await settle()
    assert state.circuit is Circuit.OPEN and not task.done(), "a failed probe reopens it"
    w.backend.endpoint(A).healthy = True
    response = (await finish(w, task)).response
    assert response.status == "ok" and response.endpoint == A and response.retries == 3
    assert w.backend.probes(A) == 2 and w.backend.calls(A) == 4
    assert state.circuit is Circuit.CLOSED and state.consecutive_failures == 0
    assert w.sample("nexus_worker_circuit_state", model="m", endpoint=A) == 0


async def test_open_circuits_are_probed_in_the_background_with_no_request_waiting(make: Callable[..., World]) -> None:
    w = make(ModelSettings("m", (endpoint(A), endpoint(B))))
    w.backend.script(A, refused(), refused(), refused())
    for n in range(3):  # A fails three requests (B answers them), and its circuit opens
        w.inference.routers["m"]._sessions[f"s{n}"] = A
        await finish(w, w.answer(request(n)))
    state = w.state("m", A)
    assert state.circuit is Circuit.OPEN and w.backend.calls(A) == 3
    await drive(w.clock, lambda: state.circuit is Circuit.CLOSED)
    assert w.backend.probes(A) == 1


# ----------------------------------------------------------------------------- the rest of the path


async def test_a_deterministic_answer_is_served_from_the_cache_the_second_time(make: Callable[..., World]) -> None:
    w = make(ModelSettings("m", (endpoint(A),)))
    deterministic = InferenceOptions(temperature=0.0)
    first = (await finish(w, w.answer(request(options=deterministic)))).response
    sink = Sink()
    second = (await finish(w, w.answer(request(options=deterministic, stream=True), sink))).response
    assert first.cached is False and second.cached is True and second.output == first.output
    assert "".join(sink.chunks) == first.output and w.backend.calls(A) == 1


async def test_a_conversation_reaches_the_backend_whole_and_its_tool_calls_come_back(
    make: Callable[..., World],
) -> None:
    w = make(ModelSettings("m", (endpoint(A),)))
    call = ToolCall("get_weather", '{"city": "Lyon"}', "call_1")
    w.backend.script(A, Reply("", tool_calls=(call,), done_reason="stop"), Reply("Let me see.", tool_calls=(call,)))
    chat = request(messages=(Message("user", "Weather in Lyon?"),), tools=(Tool("get_weather"),), format="json")
    whole = (await finish(w, w.answer(chat))).response
    assert (whole.status, whole.output, whole.tool_calls) == ("ok", "", (call,))
    assert whole.message == Message("assistant", "", tool_calls=(call,))
    assert w.backend.endpoint(A).calls[0].request is chat, "the backend gets the whole request"
    sink = Sink()
    streamed = (await finish(w, w.answer(replace(chat, stream=True), sink))).response
    assert (streamed.output, streamed.tool_calls) == ("Let me see.", (call,))
    assert sink.chunks == ["Let", " me", " see.", ""] and sink.tool_calls == [call]


async def test_a_cached_answer_keeps_its_tool_calls_and_streams_them_again(make: Callable[..., World]) -> None:
    w = make(ModelSettings("m", (endpoint(A),)))
    call = ToolCall("get_weather", '{"city": "Lyon"}')
    w.backend.script(A, Reply("One two three four five", tool_calls=(call,)))
    chat = request(
        options=InferenceOptions(temperature=0.0), messages=(Message("user", "Lyon?"),), tools=(Tool("get_weather"),)
    )
    first = (await finish(w, w.answer(chat))).response
    sink = Sink()
    again = (await finish(w, w.answer(replace(chat, id="r9", stream=True), sink))).response
    assert (again.cached, again.output, again.tool_calls) == (True, first.output, (call,))
    assert sink.chunks == ["One two three four", " five"] and sink.tool_calls == [call], "with the last chunk"
    assert w.backend.calls(A) == 1
    other_tools = replace(chat, id="r10", tools=(Tool("get_time"),))
    assert (await finish(w, w.answer(other_tools))).response.cached is False, "other tools, another answer"


async def test_an_unknown_model_is_answered_with_the_models_served(make: Callable[..., World]) -> None:
    w = make(ModelSettings("m", (endpoint(A),)))
    answer = await finish(w, w.answer(request(model="nope")))
    assert answer.response.error == "unknown model 'nope'; this worker serves ['m']"
    assert w.sample("nexus_worker_requests_total", model="unknown", status="error") == 1


def test_inference_needs_an_http_client_or_a_backend() -> None:
    with pytest.raises(TypeError, match="HTTP client"):
        Inference(Settings(), None, WorkerMetrics(), DictCache())
