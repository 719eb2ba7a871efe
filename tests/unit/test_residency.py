"""Model residency: which endpoint has which model, and which has it loaded.

The router (pure) is given inventories and never sends a model where it is missing, and
prefers a warm endpoint over a cold load; the answering path learns inventories through
the backend (memory, manual clock), treats "model not found" as no failure of the
endpoint, tries the model's other endpoints and its fallback, and answers
``model_not_found`` when no endpoint has it. The Ollama backend reads ``/api/tags`` and
``/api/ps`` of the simulator and classifies its 404; the edges map the error kind to 404s.
"""

from __future__ import annotations

import json
import random
from datetime import datetime, UTC

import pytest

from localdev.simulator.model import SimulatorConfig
from localdev.simulator.server import start_server
from nexus.settings import EndpointSettings, ModelSettings, Settings
from producers.gateway.dropin.ollama import OllamaApi
from producers.gateway.dropin.openai import OpenAIApi
from producers.gateway.models import merge_states
from schemas import MODEL_NOT_FOUND, Codec, InferenceResponse, ModelContext, WorkerReport, decode_response, encode_response
from streams.answering.routing import MISSING_RECHECK_S, Circuit, ModelRouter
from streams.backends.base import Inventory
from streams.backends.memory import MemoryBackend, Reply, server_error
from streams.backends.ollama import OllamaBackend, new_session
from tests.unit.test_inference import A, B, F, World, drive, endpoint, finish, make, request, settle  # noqa: F401 (make: a fixture)

NOW = 100.0


def router(*urls: str, model: str = "m", max_concurrency: int = 4) -> ModelRouter:
    settings = ModelSettings(model, tuple(EndpointSettings(u, max_concurrency=max_concurrency) for u in urls))
    return ModelRouter(settings, random.Random(1))


def inventory(*models: str, loaded: tuple[str, ...] | None = None) -> Inventory:
    return Inventory(frozenset(models), frozenset(models if loaded is None else loaded))


# ----------------------------------------------------------------------------- the router (pure)


def test_an_endpoint_whose_inventory_lacks_the_model_is_never_chosen() -> None:
    r = router(A, B)
    r.set_inventory(A, inventory("other"))
    assert all(r.choose(NOW).url == B for _ in range(4))
    assert r.choose(NOW) is None  # B is full: waiting, not A
    assert not r.nowhere(NOW)
    assert r.missing_where() == {A: ["other"]}


def test_an_unknown_inventory_allows_the_endpoint() -> None:
    r = router(A)
    assert r.choose(NOW).url == A
    assert r.endpoints[A].snapshot()["has_model"] is None


def test_a_tagless_name_matches_its_latest_tag() -> None:
    r = router(A, model="llama3.1")
    r.set_inventory(A, inventory("llama3.1:latest"))
    assert r.choose(NOW).url == A


def test_a_loaded_model_is_preferred_over_a_cold_load_while_it_has_room() -> None:
    r = router(A, B, max_concurrency=2)
    r.set_inventory(A, inventory("m", loaded=()))  # has it, not loaded
    r.set_inventory(B, inventory("m"))  # loaded
    assert [r.choose(NOW).url for _ in range(2)] == [B, B]
    assert r.choose(NOW).url == A  # B is full: a cold load beats waiting
    snapshot = r.endpoints[A].snapshot()
    assert (snapshot["has_model"], snapshot["loaded"], snapshot["models"]) == (True, False, ["m"])


def test_an_answer_marks_the_model_loaded_there() -> None:
    r = router(A, B)
    r.set_inventory(A, inventory("m", loaded=()))
    r.set_inventory(B, inventory("m", loaded=()))
    chosen = r.choose(NOW).url
    r.succeeded(chosen, 0.1)
    assert r.endpoints[chosen].loaded is True
    assert all(r.choose(NOW).url == chosen for _ in range(4))  # warm now: preferred while it has room


def test_model_not_found_neither_counts_against_the_endpoint_nor_opens_its_circuit() -> None:
    r = router(A, B)
    for i in range(5):  # each time after the recheck lets it back
        now = NOW + i * MISSING_RECHECK_S
        assert r.choose(now, exclude=frozenset({B})).url == A
        r.lacks(A, now, "http://a answered 404: model 'm' not found")
    e = r.endpoints[A]
    assert (e.failed, e.consecutive_failures, e.circuit, e.in_flight) == (0, 0, Circuit.CLOSED, 0)
    assert e.missing and r.choose(now).url == B
    assert r.missing_where() == {A: None}  # no inventory: what it has is unknown
    assert not r.all_down()


def test_a_not_found_without_an_inventory_is_tried_again_after_a_while() -> None:
    r = router(A)
    r.choose(NOW)
    r.lacks(A, NOW, "404")
    assert r.nowhere(NOW) and r.choose(NOW) is None
    assert not r.nowhere(NOW + MISSING_RECHECK_S)
    assert r.choose(NOW + MISSING_RECHECK_S).url == A


def test_an_inventory_that_has_the_model_again_lets_it_back() -> None:
    r = router(A)
    r.set_inventory(A, inventory("other"))
    assert r.nowhere(NOW)
    r.set_inventory(A, inventory("other", "m"))
    assert r.choose(NOW).url == A


# ----------------------------------------------------------------------------- the answering path


async def test_the_worker_learns_inventories_and_sends_nothing_where_the_model_is_missing(make) -> None:  # type: ignore[no-untyped-def]
    w: World = make(ModelSettings("m", (endpoint(A), endpoint(B))))
    w.backend.has(A, "other")
    w.backend.has(B, "m")
    w.inference.watch()
    await settle()
    answers = [await finish(w, w.answer(request(i))) for i in range(6)]
    assert all(a.response.status == "ok" and a.response.endpoint == B for a in answers)
    assert w.backend.calls(A) == 0
    assert w.inference.missing() == {"m": {A: ["other"]}}


async def test_inventories_are_refreshed_on_a_timer(make) -> None:  # type: ignore[no-untyped-def]
    w: World = make(ModelSettings("m", (endpoint(A),)))
    w.backend.has(A, "m")
    w.inference.watch()
    await settle()
    assert w.backend.endpoint(A).inventories == 1
    w.backend.has(A, "other")  # the model was removed
    await drive(w.clock, lambda: w.backend.endpoint(A).inventories == 2)
    assert w.inference.missing() == {"m": {A: ["other"]}}


async def test_a_404_sends_the_request_to_another_endpoint_and_asks_the_first_what_it_has(make) -> None:  # type: ignore[no-untyped-def]
    w: World = make(ModelSettings("m", (endpoint(A, weight=100.0), endpoint(B))))
    w.backend.has(A, "other")  # not asked yet: the router does not know
    answer = await finish(w, w.answer(request()))
    assert answer.response.status == "ok" and answer.response.endpoint == B
    assert w.backend.calls(A) == 1 and w.backend.endpoint(A).inventories == 1
    a = w.state("m", A)
    assert (a.failed, a.circuit, a.missing) == (0, Circuit.CLOSED, True)
    assert w.sample("nexus_worker_retries_total", model="m") == 0
    await finish(w, w.answer(request(1)))
    assert w.backend.calls(A) == 1  # known now: not sent there again


async def test_a_model_on_no_endpoint_goes_to_its_fallback(make) -> None:  # type: ignore[no-untyped-def]
    w: World = make(
        ModelSettings("m", (endpoint(A), endpoint(B)), fallback="f"), ModelSettings("f", (endpoint(F),))
    )
    w.backend.has(A, "x")
    w.backend.has(B, "y")
    answer = await finish(w, w.answer(request()))
    assert answer.response.status == "ok" and answer.response.endpoint == F
    assert answer.dead_letter_reason is None


async def test_a_model_on_no_endpoint_is_answered_model_not_found_with_what_each_has(make) -> None:  # type: ignore[no-untyped-def]
    w: World = make(ModelSettings("m", (endpoint(A), endpoint(B)), retries=0))
    w.backend.has(A, "x:7b", "y")
    w.backend.has(B)
    answer = await finish(w, w.answer(request()))
    response = answer.response
    assert response.status == "error" and response.error_kind == MODEL_NOT_FOUND
    assert response.error == f"model 'm' is not on any endpoint of 'm': {A} has ['x:7b', 'y']; {B} has []"
    assert answer.dead_letter_reason == response.error
    # Known now: the next one fails at once, without a call.
    calls = w.backend.calls(A) + w.backend.calls(B)
    again = await finish(w, w.answer(request(1)))
    assert again.response.error_kind == MODEL_NOT_FOUND
    assert w.backend.calls(A) + w.backend.calls(B) == calls


async def test_model_not_found_also_when_the_fallback_is_missing_too_but_not_when_it_failed(make) -> None:  # type: ignore[no-untyped-def]
    w: World = make(
        ModelSettings("m", (endpoint(A),), fallback="f", retries=0), ModelSettings("f", (endpoint(F),), retries=0)
    )
    w.backend.has(A, "x")
    w.backend.has(F, "x")
    missing = await finish(w, w.answer(request()))
    assert missing.response.error_kind == MODEL_NOT_FOUND
    assert "model 'm' is not on any endpoint" in missing.response.error
    assert "model 'f' is not on any endpoint" in missing.response.error

    w.backend.has(F, "f")  # pulled there since
    await w.inference.residency.refresh(F)
    w.backend.script(F, server_error(500))
    failed = await finish(w, w.answer(request(1)))
    assert failed.response.status == "error" and failed.response.error_kind is None
    assert "answered 500" in failed.response.error


async def test_a_streamed_request_for_a_missing_model_sends_no_chunk(make) -> None:  # type: ignore[no-untyped-def]
    from tests.unit.test_inference import Sink

    w: World = make(ModelSettings("m", (endpoint(A),)))
    w.backend.has(A, "x")
    sink = Sink()
    answer = await finish(w, w.answer(request(stream=True), sink))
    assert answer.response.error_kind == MODEL_NOT_FOUND and sink.chunks == []


async def test_a_warm_endpoint_is_chosen_over_a_cold_one(make) -> None:  # type: ignore[no-untyped-def]
    w: World = make(ModelSettings("m", (endpoint(A, weight=100.0), endpoint(B))))
    w.backend.has(A, "m", loaded=())
    w.backend.has(B, "m")
    w.inference.watch()
    await settle()
    answer = await finish(w, w.answer(request()))
    assert answer.response.endpoint == B


async def test_an_unknown_model_is_model_not_found_too(make) -> None:  # type: ignore[no-untyped-def]
    w: World = make(ModelSettings("m", (endpoint(A),)))
    answer = await w.inference.answer(request(model="nope"))
    assert answer.response.error_kind == MODEL_NOT_FOUND


async def test_the_memory_backend_answers_a_model_it_lacks_with_ollamas_404_and_keeps_its_script() -> None:
    backend = MemoryBackend()
    backend.has(A, "m")
    backend.script(A, Reply("scripted"))
    from streams.backends import BackendError
    from tests.unit.test_backends import prompt

    with pytest.raises(BackendError) as info:
        await backend.generate(A, "other", prompt("p"), "", 1.0)
    assert info.value.missing_model and not info.value.retryable
    assert "model 'other' not found" in str(info.value)
    assert (await backend.generate(A, "m", prompt("p"), "", 1.0)).text == "scripted"
    assert await backend.inventory(A, 1.0) == Inventory(frozenset({"m"}), frozenset({"m"}))
    with pytest.raises(BackendError):
        await backend.inventory(B, 1.0)  # no inventory scripted: it cannot say


# ----------------------------------------------------------------------------- the Ollama backend


async def test_the_ollama_backend_reads_the_simulators_tags_and_ps_and_its_404() -> None:
    from schemas import InferenceOptions
    from streams.backends import BackendError
    from tests.unit.test_backends import prompt

    async with await start_server(SimulatorConfig(models=("smollm2:135m", "qwen"), ttft_ms=0)) as sim:
        async with new_session() as http:
            backend = OllamaBackend(http)
            inv = await backend.inventory(sim.url, 2.0)
            assert inv.has("smollm2:135m") and inv.has("qwen") and not inv.has("llama3.1")
            assert inv.is_loaded("qwen") is True
            with pytest.raises(BackendError) as info:
                await backend.generate(sim.url, "llama3.1", prompt("hi", InferenceOptions(max_tokens=1)), "", 5.0)
            assert info.value.missing_model and not info.value.retryable and not info.value.busy
            assert "model 'llama3.1' not found" in str(info.value)


async def test_the_ollama_backend_cannot_ask_a_closed_port() -> None:
    from streams.backends import BackendError
    from tests.unit.test_backends import closed_port

    async with new_session() as http:
        with pytest.raises(BackendError) as info:
            await OllamaBackend(http).inventory(closed_port(), 1.0)
        assert not info.value.reached


# ----------------------------------------------------------------------------- the edges


def _response(**changes: object) -> InferenceResponse:
    fields: dict[str, object] = dict(
        id="r", model_id="m", status="error", context=ModelContext("s"), latency_ms=1,
        completed_at=datetime(2024, 1, 1, tzinfo=UTC), error="model 'm' is not on any endpoint of 'm': x",
        error_kind=MODEL_NOT_FOUND,
    )
    fields.update(changes)
    return InferenceResponse(**fields)  # type: ignore[arg-type]


class _Call:
    model = "m:latest"
    model_id = "m"


def test_the_ollama_api_answers_a_missing_model_with_ollamas_404() -> None:
    answer = OllamaApi().failure(_Call(), _response())  # type: ignore[arg-type]
    assert answer.status == 404
    assert json.loads(answer.body) == {"error": "model 'm:latest' not found"}
    other = OllamaApi().failure(_Call(), _response(error="boom", error_kind=None))  # type: ignore[arg-type]
    assert other.status == 500 and json.loads(other.body) == {"error": "boom"}


def test_the_openai_api_answers_a_missing_model_with_model_not_found() -> None:
    answer = OpenAIApi().failure(_Call(), _response())  # type: ignore[arg-type]
    assert answer.status == 404
    error = json.loads(answer.body)["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "model", "model_not_found")
    assert "m:latest" in error["message"] and "is not on any endpoint" in error["message"]
    other = OpenAIApi().failure(_Call(), _response(error="boom", error_kind=None))  # type: ignore[arg-type]
    assert other.status == 500 and json.loads(other.body)["error"]["type"] == "server_error"


def test_models_page_says_which_model_is_missing_where() -> None:
    settings = Settings(models=(ModelSettings("m", (EndpointSettings(A), EndpointSettings(B))),))
    seen = {"in_flight": 0, "served": 0, "failed": 0, "circuit": "closed"}
    report = WorkerReport("w1", NOW, {"m": [
        {**seen, "url": A, "has_model": False, "loaded": False, "models": ["x"]},
        {**seen, "url": B, "has_model": True, "loaded": True, "models": ["m:latest"]},
    ]})
    other = WorkerReport("w2", NOW, {"m": [{**seen, "url": A}, {**seen, "url": B, "has_model": None}]})
    (model,) = merge_states(settings, {"w1": report, "w2": other}, NOW)
    assert model["missing_on"] == [A] and model["available"] is True
    a, b = (e["live"] for e in model["endpoints"])
    assert (a["has_model"], a["loaded"], a["models"]) == (False, False, ["x"])
    assert (b["has_model"], b["loaded"], b["models"]) == (True, True, ["m:latest"])
    old = WorkerReport("w3", NOW, {"m": [{**seen, "url": A}]})  # a worker from before residency
    (model,) = merge_states(settings, {"w3": old}, NOW)
    assert model["missing_on"] == [] and model["endpoints"][0]["live"]["has_model"] is None


# ----------------------------------------------------------------------------- the record


def test_v4_responses_carry_error_kind_and_v3_readers_and_writers_still_work() -> None:
    v4 = Codec.from_directory(pin={"InferenceResponse": 4})
    v3 = Codec.from_directory(pin={"InferenceResponse": 3})
    assert v4.current("InferenceResponse").version == 4
    response = _response()
    # v4 written, v3 read: error_kind is dropped, everything else kept.
    old = decode_response(v3, encode_response(v4, response))
    assert old.error_kind is None and old.error == response.error
    _, value = v3.decode(encode_response(v4, response))
    assert "error_kind" not in value
    # v3 written, v4 read: error_kind takes its default.
    assert v3.writer_of(encode_response(v3, response)).version == 3
    new = decode_response(v4, encode_response(v3, response))
    assert new == _response(error_kind=None)
    assert response.to_json()["error_kind"] == MODEL_NOT_FOUND
