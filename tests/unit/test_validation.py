"""POST /infer bodies: what becomes a request, and the 400/404 answers for the rest.

And the one validation vocabulary: the field checks and limits that POST /infer, the
drop-in APIs and the bridge's frames share, each edge answering in its own shape.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, UTC

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from consumers.bridge import BridgeCore, Produce
from consumers.bridge.frames import FrameError
from nexus.access import AccessPolicy
from nexus.errors import NexusError
from nexus.settings import AccessSettings, EndpointSettings, ModelSettings, Settings
from producers.gateway import access as access_http
from producers.gateway.dropin import DropIn, DropInMetrics
from producers.gateway.dropin.ollama import add_ollama_routes
from producers.gateway.dropin.openai import add_openai_routes
from producers.replies import ReplyIndex, ReplyReader
from schemas import validation
from schemas.limits import MAX_SESSION_ID_LENGTH, MAX_TIMEOUT_MS
from schemas.validation import MAX_ID_LENGTH, RejectedRequest, parse_infer_body
from schemas import Codec, InferenceOptions, InferenceRequest, ModelContext

MODELS = ("llama3.1", "mistral")
SEED_BODY = (
    b'{"id":"test1","model_id":"llama3.1","input":"Hello, world!",'
    b'"context":{"session_id":"session123","metadata":{"user":"alice","lang":"en"}}}'
)


_DROP = object()


def _body(**fields) -> bytes:
    base = {"model_id": "llama3.1", "input": "Hello"}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not _DROP}).encode()


def _rejected(body: bytes, models=MODELS) -> RejectedRequest:
    with pytest.raises(RejectedRequest) as info:
        parse_infer_body(body, models)
    assert str(info.value) == info.value.message
    return info.value


def test_readme_seed_body() -> None:
    before = datetime.now(UTC)
    request = parse_infer_body(SEED_BODY, MODELS)
    after = datetime.now(UTC)
    assert isinstance(request, InferenceRequest)
    assert request.id == "test1"
    assert request.model_id == "llama3.1"
    assert request.input == "Hello, world!"
    assert request.context == ModelContext(
        session_id="session123", metadata={"user": "alice", "lang": "en"}
    )
    assert request.options == InferenceOptions(None, None, None)
    assert request.stream is False
    # created_at is now, in UTC, at millisecond precision (what Avro keeps).
    assert request.created_at.utcoffset() == timedelta(0)
    assert before - timedelta(milliseconds=1) <= request.created_at <= after
    assert request.created_at.microsecond % 1000 == 0


def test_options_and_stream_are_kept() -> None:
    request = parse_infer_body(
        _body(options={"temperature": 1, "max_tokens": 128, "seed": -5}, stream=True), MODELS
    )
    assert request.options == InferenceOptions(temperature=1.0, max_tokens=128, seed=-5)
    assert isinstance(request.options.temperature, float)
    assert request.stream is True
    zero = parse_infer_body(_body(options={"temperature": 0, "seed": 0}), MODELS)
    assert zero.options == InferenceOptions(temperature=0.0, max_tokens=None, seed=0)


def test_extreme_valid_options() -> None:
    request = parse_infer_body(
        _body(options={"max_tokens": 2**31 - 1, "seed": 2**63 - 1}), MODELS
    )
    assert request.options.max_tokens == 2**31 - 1
    assert request.options.seed == 2**63 - 1
    assert parse_infer_body(_body(options={"seed": -(2**63)}), MODELS).options.seed == -(2**63)


def test_id_generated_when_absent_and_unique() -> None:
    ids = {parse_infer_body(_body(), MODELS).id for _ in range(50)}
    assert len(ids) == 50
    assert all(isinstance(i, str) and i for i in ids)
    assert parse_infer_body(_body(id=None), MODELS).id not in ("", None)


def test_context_generated_when_absent() -> None:
    first = parse_infer_body(_body(), MODELS)
    second = parse_infer_body(_body(), MODELS)
    assert first.context.session_id and second.context.session_id
    assert first.context.session_id != second.context.session_id
    assert first.context.metadata == {}


def test_session_id_generated_when_context_has_only_metadata() -> None:
    request = parse_infer_body(_body(context={"metadata": {"user": "bob"}}), MODELS)
    assert request.context.session_id
    assert request.context.metadata == {"user": "bob"}


def test_empty_input_is_allowed_and_unicode_kept() -> None:
    assert parse_infer_body(_body(input=""), MODELS).input == ""
    text = "Grüße 👋\n\"quoted\" {braces}"
    assert parse_infer_body(_body(input=text), MODELS).input == text


# --- 400s ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"not json", b'{"model_id": "llama3.1", "input": "x",}', b"[" * 100_000,
     b'{"model_id": "llama3.1", "input": "x", "options": {"seed": ' + b"9" * 5000 + b"}}"],
    ids=["empty", "unclosed", "text", "trailing-comma", "deeply-nested", "integer-too-long-to-convert"],
)
def test_malformed_json(body: bytes) -> None:
    error = _rejected(body)
    assert error.status == 400
    assert "JSON" in error.message


def test_invalid_utf8() -> None:
    error = _rejected(b'{"model_id": "llama3.1", "input": "\xff\xfe caf\xe9"}')
    assert error.status == 400
    assert "JSON" in error.message


@pytest.mark.parametrize("body", [b"[]", b'"hello"', b"42", b"null", b"true"])
def test_non_object(body: bytes) -> None:
    error = _rejected(body)
    assert error.status == 400
    assert "object" in error.message


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (_body(model_id=_DROP), "model_id"),
        (_body(model_id=None), "model_id"),
        (_body(input=_DROP), "input"),
        (_body(input=None), "input"),
    ],
)
def test_missing_required_field(body: bytes, field: str) -> None:
    error = _rejected(body)
    assert error.status == 400
    assert f"'{field}'" in error.message
    assert "missing" in error.message


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"model_id": 3}, "'model_id'"),
        ({"model_id": ""}, "'model_id'"),
        ({"model_id": ["llama3.1"]}, "'model_id'"),
        ({"input": {"text": "hi"}}, "'input'"),
        ({"input": 12}, "'input'"),
        ({"id": 7}, "'id'"),
        ({"id": ""}, "'id'"),
        ({"id": "x" * (MAX_ID_LENGTH + 1)}, "'id'"),
        ({"stream": "yes"}, "'stream'"),
        ({"stream": 1}, "'stream'"),
        ({"context": "session123"}, "'context'"),
        ({"context": {"session_id": 5}}, "context.session_id"),
        ({"context": {"session_id": ""}}, "context.session_id"),
        ({"context": {"session_id": "s", "metadata": {"age": 30}}}, "context.metadata"),
        ({"context": {"session_id": "s", "metadata": {"x": None}}}, "context.metadata"),
        ({"context": {"session_id": "s", "metadata": {"x": {"y": "z"}}}}, "context.metadata"),
        ({"context": {"session_id": "s", "metadata": ["a"]}}, "context.metadata"),
        ({"context": {"session_id": "s", "user": "alice"}}, "context.user"),
        ({"prompt": "hi"}, "'prompt'"),
        ({"options": [0.5]}, "'options'"),
        ({"options": {"mirostat": 1}}, "'mirostat'"),
        ({"options": {"top_k": -1}}, "options.top_k"),
        ({"options": {"top_p": 1.5}}, "options.top_p"),
        ({"options": {"min_p": -0.1}}, "options.min_p"),
        ({"options": {"num_ctx": 0}}, "options.num_ctx"),
        ({"options": {"repeat_penalty": "1.1"}}, "options.repeat_penalty"),
        ({"options": {"presence_penalty": True}}, "options.presence_penalty"),
        ({"options": {"frequency_penalty": [1]}}, "options.frequency_penalty"),
        ({"options": {"stop": 5}}, "options.stop"),
        ({"options": {"stop": ["a", ""]}}, "options.stop[1]"),
        ({"options": {"stop": ""}}, "options.stop"),
        ({"options": {"extra": "mirostat=1"}}, "options.extra"),
        ({"options": {"extra": {"temperature": 1}}}, "options.extra.temperature"),
        ({"options": {"temperature": -0.1}}, "options.temperature"),
        ({"options": {"temperature": True}}, "options.temperature"),
        ({"options": {"temperature": "0.5"}}, "options.temperature"),
        ({"options": {"max_tokens": 0}}, "options.max_tokens"),
        ({"options": {"max_tokens": -1}}, "options.max_tokens"),
        ({"options": {"max_tokens": 2**31}}, "options.max_tokens"),
        ({"options": {"max_tokens": 1.5}}, "options.max_tokens"),
        ({"options": {"max_tokens": True}}, "options.max_tokens"),
        ({"options": {"seed": 2**63}}, "options.seed"),
        ({"options": {"seed": -(2**63) - 1}}, "options.seed"),
        ({"options": {"seed": 10**30}}, "options.seed"),
        ({"options": {"seed": "42"}}, "options.seed"),
    ],
)
def test_bad_field_is_400_and_named(fields: dict, needle: str) -> None:
    error = _rejected(_body(**fields))
    assert error.status == 400
    assert needle in error.message


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_temperature(literal: bytes) -> None:
    # Python's json module accepts these non-standard literals; the options must not.
    body = b'{"model_id": "llama3.1", "input": "x", "options": {"temperature": ' + literal + b"}}"
    error = _rejected(body)
    assert error.status == 400
    assert "options.temperature" in error.message


# --- 404 ---------------------------------------------------------------------------------


def test_unknown_model_is_404_and_named() -> None:
    error = _rejected(_body(model_id="gpt-4o"))
    assert error.status == 404
    assert "'gpt-4o'" in error.message
    # The known ones are listed to help the caller.
    assert "llama3.1" in error.message and "mistral" in error.message


def test_known_models_come_from_the_caller() -> None:
    assert parse_infer_body(_body(model_id="phi3"), ["phi3"]).model_id == "phi3"
    assert _rejected(_body(model_id="llama3.1"), ["phi3"]).status == 404


def test_bad_body_for_unknown_model_is_still_400() -> None:
    # A malformed request is the caller's fault whatever the model.
    error = _rejected(_body(model_id="gpt-4o", options={"max_tokens": 0}))
    assert error.status == 400


def test_cache_policy_and_timeout_become_request_fields() -> None:
    body = {"model_id": "llama3.1", "input": "x", "cache": "no-store", "timeout_ms": 1500}
    request = parse_infer_body(json.dumps(body).encode(), MODELS)
    assert request.cache == "no-store"
    assert request.deadline is not None
    assert (request.deadline - request.created_at).total_seconds() == 1.5


@pytest.mark.parametrize(
    "extra, field",
    [({"cache": "sometimes"}, "cache"), ({"timeout_ms": 0}, "timeout_ms"), ({"timeout_ms": "5"}, "timeout_ms"),
     ({"timeout_ms": True}, "timeout_ms")],
)
def test_bad_cache_policy_or_timeout_is_400(extra: dict, field: str) -> None:
    body = {"model_id": "llama3.1", "input": "x", **extra}
    with pytest.raises(RejectedRequest) as info:
        parse_infer_body(json.dumps(body).encode(), MODELS)
    assert info.value.status == 400 and field in info.value.message


# --- one vocabulary: the same limits at every edge ------------------------------------------

TOO_LONG_SESSION = "s" * (MAX_SESSION_ID_LENGTH + 1)


def test_rejected_request_is_a_nexus_error_and_still_a_value_error() -> None:
    error = RejectedRequest(404, "no such model", param="model", code="model_not_found")
    assert isinstance(error, NexusError) and isinstance(error, ValueError)
    assert (error.status, error.message, error.param, error.code, str(error)) == (
        404, "no such model", "model", "model_not_found", "no such model")
    assert issubclass(FrameError, RejectedRequest) and FrameError("bad").status == 400


@pytest.mark.parametrize(
    ("check", "value", "needle"),
    [
        (validation.session_id, "", "non-empty string"),
        (validation.session_id, 7, "non-empty string"),
        (validation.session_id, TOO_LONG_SESSION, f"longer than {MAX_SESSION_ID_LENGTH}"),
        (validation.request_id, "r" * (MAX_ID_LENGTH + 1), f"longer than {MAX_ID_LENGTH}"),
        (validation.timeout_ms, 0, str(MAX_TIMEOUT_MS)),
        (validation.timeout_ms, MAX_TIMEOUT_MS + 1, str(MAX_TIMEOUT_MS)),
        (validation.timeout_ms, True, str(MAX_TIMEOUT_MS)),
        (validation.cache_policy, "sometimes", "no-store"),
        (validation.metadata, {"a": 1}, "string values"),
    ],
)
def test_field_checks_name_the_field_and_the_limit(check, value, needle: str) -> None:
    with pytest.raises(RejectedRequest) as info:
        check(value, "the_field")
    assert info.value.status == 400 and info.value.param == "the_field"
    assert "'the_field'" in info.value.message and needle in info.value.message


def test_field_checks_pass_what_is_within_the_limits() -> None:
    assert validation.session_id("s" * MAX_SESSION_ID_LENGTH) == "s" * MAX_SESSION_ID_LENGTH
    assert validation.request_id("r" * MAX_ID_LENGTH) == "r" * MAX_ID_LENGTH
    assert validation.timeout_ms(MAX_TIMEOUT_MS) == MAX_TIMEOUT_MS
    assert validation.metadata({"user": "alice"}) == {"user": "alice"}
    assert validation.number(2, "t", 0, math.inf) == 2.0 and validation.number(None, "t", 0, 1) is None
    assert validation.integer(-(2**63), "seed") == -(2**63)
    with pytest.raises(RejectedRequest, match="'seed' must be an integer"):
        validation.integer(5.0, "seed")  # strict here; the drop-in APIs accept whole floats themselves
    assert validation.flag(None, "stream", True) is True
    assert validation.text(None, "prompt") == ""
    with pytest.raises(RejectedRequest, match="not valid JSON"):
        validation.parse_json(b"[" * 100_000)


async def _dropin_refusals(headers: dict[str, str]) -> tuple[tuple[int, object], tuple[int, object]]:
    """Ollama's and OpenAI's answers to one generate call with ``headers``; nothing reaches Kafka."""
    settings = Settings(models=(ModelSettings("llama3.1", (EndpointSettings("http://127.0.0.1:9"),)),))
    index = ReplyIndex()
    reader = ReplyReader(settings.kafka, "gateway-test", index, Codec.from_directory())
    dropin = DropIn(settings, None, DropInMetrics(CollectorRegistry(), index, reader), "0", lambda: 0.0)  # type: ignore[arg-type]
    app = web.Application()
    access_http.install(app, AccessPolicy(AccessSettings()))
    add_ollama_routes(app, dropin)
    add_openai_routes(app, dropin)
    async with TestClient(TestServer(app)) as client:
        ollama = await client.post("/api/generate", json={"model": "llama3.1", "prompt": "Hi"}, headers=headers)
        openai = await client.post("/v1/completions", json={"model": "llama3.1", "prompt": "Hi"}, headers=headers)
        return (ollama.status, await ollama.json()), (openai.status, await openai.json())


async def test_an_over_long_session_id_is_refused_at_every_edge_in_its_own_shape() -> None:
    """256 characters is the documented session id limit (docs/producing.md); every edge holds it."""
    # POST /infer and `nexus submit`: {"error": "..."} with 400.
    error = _rejected(_body(context={"session_id": TOO_LONG_SESSION}))
    assert error.status == 400
    assert error.message == f"'context.session_id' is longer than {MAX_SESSION_ID_LENGTH} characters"
    longest = "s" * MAX_SESSION_ID_LENGTH
    assert parse_infer_body(_body(context={"session_id": longest}), MODELS).context.session_id == longest

    # The drop-in APIs, from the X-Nexus-Session header: Ollama's and OpenAI's error shapes.
    (ollama_status, ollama), (openai_status, openai) = await _dropin_refusals({"X-Nexus-Session": TOO_LONG_SESSION})
    reason = f"'X-Nexus-Session' is longer than {MAX_SESSION_ID_LENGTH} characters"
    assert (ollama_status, ollama) == (400, {"error": reason})
    assert (openai_status, openai) == (400, {"error": {"message": reason, "type": "invalid_request_error",
                                                       "param": None, "code": None}})

    # The bridge: a submit frame gets an error frame with the status; a subscribe frame one without.
    core = BridgeCore(Codec.from_directory(), responses_topic="inference.responses", tokens_topic="inference.tokens",
                      access=AccessPolicy(AccessSettings()), known_models=MODELS, max_queue=16)
    peer = core.connect()
    submit = {"type": "submit", "id": "r1", "model_id": "llama3.1", "input": "Hi"}
    assert core.receive(peer, json.dumps({**submit, "context": {"session_id": TOO_LONG_SESSION}})) == []
    assert core.receive(peer, json.dumps({"type": "subscribe", "session_id": TOO_LONG_SESSION})) == []
    submitted, subscribed = (json.loads(frame) for frame in peer.outbox.queued())
    assert submitted == {"type": "error", "reason": error.message, "status": 400, "id": "r1"}
    assert subscribed == {"type": "error", "reason": f"'session_id' is longer than {MAX_SESSION_ID_LENGTH} characters"}
    (produce,) = core.receive(peer, json.dumps({**submit, "context": {"session_id": longest}}))
    assert isinstance(produce, Produce) and produce.request.context.session_id == longest
