"""POST /infer bodies: what becomes a request, and the 400/404 answers for the rest."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from schemas.validation import MAX_ID_LENGTH, RejectedRequest, parse_infer_body
from schemas import InferenceOptions, InferenceRequest, ModelContext

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
    before = datetime.now(timezone.utc)
    request = parse_infer_body(SEED_BODY, MODELS)
    after = datetime.now(timezone.utc)
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
    [b"", b"{", b"not json", b'{"model_id": "llama3.1", "input": "x",}', b"[" * 100_000],
    ids=["empty", "unclosed", "text", "trailing-comma", "deeply-nested"],
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
        ({"options": {"top_k": 5}}, "'top_k'"),
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
