"""Conversations at the edges: POST /infer, the bridge's submit frame and ``nexus submit`` accept
messages, tools, tool_choice, format, keep_alive and every option; answers show their tool calls.

One vocabulary (:mod:`schemas.validation`), so the cases here hold for all three; the drop-in
APIs have their own tests (test_dropin_units.py).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
from datetime import datetime, UTC
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from consumers.bridge import BridgeCore, Produce
from consumers.bridge.frames import result_frame, token_frame
from consumers.replay.audit import ReplayRecord
from consumers.replay.render import table_row
from nexus.access import AccessPolicy
from nexus.settings import AccessSettings, EndpointSettings, KafkaSettings, ModelSettings, Settings
from producers import submit as submit_command
from producers.client import RequestTooLarge
from schemas import (
    Codec,
    InferenceOptions,
    InferenceRequest,
    InferenceResponse,
    InferenceToken,
    Message,
    ModelContext,
    Tool,
    ToolCall,
    decode_request,
    encode_request,
)
from schemas.limits import MAX_IMAGE_BYTES, MAX_RECORD_BYTES
from schemas.validation import OPTION_FIELDS, RejectedRequest, request_from_json

CODEC = Codec.from_directory()
MODELS = ("llama3.1", "mistral")
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def conversation(**fields: Any) -> dict[str, Any]:
    """A tool-calling conversation in the documented shapes: a call and the tool's result."""
    body: dict[str, Any] = {
        "model_id": "llama3.1",
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is in this picture, and the weather in Paris?", "images": [b64(PNG)]},
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "22 degrees, sunny", "tool_name": "get_weather"},
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                     "parameters": WEATHER}}],
    }
    body.update(fields)
    return body


def parse(body: dict[str, Any]) -> InferenceRequest:
    request = request_from_json(body, MODELS)
    # Whatever is accepted fits the wire schema and comes back the same.
    assert decode_request(CODEC, encode_request(CODEC, request)) == request
    return request


def refused(body: dict[str, Any]) -> RejectedRequest:
    with pytest.raises(RejectedRequest) as info:
        request_from_json(body, MODELS)
    return info.value


# --- what is accepted ------------------------------------------------------------------------


def test_a_conversation_keeps_its_roles_images_tool_calls_and_results() -> None:
    request = parse(conversation(tool_choice="auto", format="json", keep_alive="10m"))
    assert request.is_chat
    assert [m.role for m in request.messages] == ["system", "user", "assistant", "tool"]
    assert request.messages[1].images == (PNG,)
    assert request.messages[2] == Message("assistant", "", tool_calls=(ToolCall("get_weather", '{"city":"Paris"}'),))
    assert request.messages[3] == Message("tool", "22 degrees, sunny", tool_name="get_weather")
    assert request.tools == (Tool("get_weather", "Weather of a city", json.dumps(WEATHER, separators=(",", ":"))),)
    assert (request.tool_choice, request.format, request.keep_alive) == ("auto", "json", "10m")
    # input: the last user turn's text, for the audit trail
    assert request.input == "What is in this picture, and the weather in Paris?"


def test_input_is_the_last_user_turn_or_empty_without_one() -> None:
    turns = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
             {"role": "user", "content": "second"}, {"role": "assistant", "content": "sure"}]
    assert parse({"model_id": "llama3.1", "messages": turns}).input == "second"
    assert parse({"model_id": "llama3.1", "messages": [{"role": "system", "content": "x"}]}).input == ""


def test_a_prompt_stays_a_prompt_and_an_empty_conversation_is_absent() -> None:
    prompt = parse({"model_id": "llama3.1", "input": "hi", "messages": [], "format": PERSON})
    assert not prompt.is_chat and prompt.input == "hi"
    assert json.loads(prompt.format or "") == PERSON  # a schema, kept as its text
    for no_input in (None, ""):
        assert parse({"model_id": "llama3.1", "input": no_input, "messages": [{"role": "user", "content": "x"}]}).is_chat


def test_tool_calls_and_tools_in_the_flat_and_the_openai_shapes_are_the_same() -> None:
    flat = parse(conversation(
        messages=[{"role": "user", "content": "weather?"},
                  {"role": "assistant", "content": None,
                   "tool_calls": [{"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}}]},
                  {"role": "tool", "content": "22", "tool_call_id": "call_1"}],
        tools=[{"name": "get_weather", "description": "Weather of a city", "parameters": WEATHER}],
        tool_choice="get_weather"))
    openai = parse(conversation(
        messages=[{"role": "user", "content": "weather?"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "call_1", "type": "function",
                       "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                  {"role": "tool", "content": "22", "tool_call_id": "call_1"}],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert flat.messages == openai.messages and flat.tools == openai.tools
    assert flat.tool_choice == openai.tool_choice == "get_weather"
    assert flat.messages[1].tool_calls == (ToolCall("get_weather", '{"city":"Paris"}', "call_1"),)
    assert flat.messages[2].tool_call_id == "call_1"


def test_an_answers_message_is_the_next_requests_turn() -> None:
    """The result's ``message`` (tool call ids null from Ollama) appends to the conversation as it is."""
    answer = InferenceResponse(
        id="r1", model_id="llama3.1", status="ok", context=ModelContext("s"), latency_ms=1,
        completed_at=datetime(2024, 5, 1, tzinfo=UTC), output="",
        tool_calls=(ToolCall("get_weather", '{"city":"Paris"}'),),
    )
    turn = json.loads(json.dumps(answer.to_json()["message"]))
    follow_up = parse({"model_id": "llama3.1", "tools": [{"name": "get_weather", "parameters": WEATHER}],
                       "messages": [{"role": "user", "content": "weather?"}, turn,
                                    {"role": "tool", "content": "22", "tool_name": "get_weather"}]})
    assert follow_up.messages[1] == answer.message


def test_every_option_is_kept_and_others_go_in_extra() -> None:
    options = {"temperature": 0, "max_tokens": 64, "seed": 7, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
               "stop": ["\n\n", "User:"], "num_ctx": 8192, "repeat_penalty": 1.1, "presence_penalty": -0.5,
               "frequency_penalty": 1.5, "extra": {"mirostat": 2, "num_gpu": 1}}
    assert set(options) == set(OPTION_FIELDS)
    request = parse({"model_id": "llama3.1", "input": "x", "options": options})
    assert request.options == InferenceOptions(
        temperature=0.0, max_tokens=64, seed=7, top_p=0.9, top_k=40, min_p=0.05, stop=("\n\n", "User:"),
        num_ctx=8192, repeat_penalty=1.1, presence_penalty=-0.5, frequency_penalty=1.5,
        extra='{"mirostat":2,"num_gpu":1}')
    one_stop = parse({"model_id": "llama3.1", "input": "x", "options": {"stop": "END", "extra": {}}})
    assert one_stop.options.stop == ("END",) and one_stop.options.extra is None


@pytest.mark.parametrize(("given", "kept"), [
    ("5m", "5m"), ("1h30m", "1h30m"), ("0", "0"), ("-1s", "-1s"), ("1.5h", "1.5h"),
    (300, "300s"), ("300", "300s"), (0, "0s"), (-1, "-1s"), (2.7, "2s"), ("", None), (None, None),
])
def test_keep_alive_is_a_duration_as_ollama_takes_it(given: Any, kept: str | None) -> None:
    assert parse({"model_id": "llama3.1", "input": "x", "keep_alive": given}).keep_alive == kept


def test_a_data_url_image_and_images_up_to_the_limit_are_accepted() -> None:
    data_url = f"data:image/png;base64,{b64(PNG)}"
    request = parse({"model_id": "llama3.1", "messages": [{"role": "user", "content": "x", "images": [data_url]}]})
    assert request.messages[0].images == (PNG,)
    half = MAX_IMAGE_BYTES // 2
    at_limit = [{"role": "user", "content": "a", "images": [b64(b"a" * half)]},
                {"role": "user", "content": "b", "images": [b64(b"b" * (MAX_IMAGE_BYTES - half))]}]
    assert sum(len(i) for m in parse({"model_id": "llama3.1", "messages": at_limit}).messages
               for i in m.images) == MAX_IMAGE_BYTES


# --- what is refused, and how -------------------------------------------------------------------


def test_images_over_the_limit_are_413_with_the_size_and_the_limit() -> None:
    over = [{"role": "user", "content": "a", "images": [b64(b"a" * MAX_IMAGE_BYTES)]},
            {"role": "user", "content": "b", "images": [b64(b"b")]}]
    error = refused({"model_id": "llama3.1", "messages": over})
    assert error.status == 413
    assert error.message == (f"images of this request total {MAX_IMAGE_BYTES + 1} bytes; the limit is "
                             f"{MAX_IMAGE_BYTES} (a request must fit one Kafka record)")


@pytest.mark.parametrize(("fields", "needle"), [
    ({"input": "x", "messages": [{"role": "user", "content": "y"}]}, "not both"),
    ({"messages": None}, "missing required field 'input'"),
    ({"messages": "hello"}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "x"}, "hi"]}, "'messages[1]' must be an object"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "'messages[0].role' must be one of"),
    ({"messages": [{"content": "x"}]}, "'messages[0].role' must be one of"),
    ({"messages": [{"role": "user", "content": ["x"]}]}, "'messages[0].content' must be a string"),
    ({"messages": [{"role": "user", "text": "x"}]}, "unknown field 'messages[0].text'"),
    ({"messages": [{"role": "user", "images": "abc"}]}, "'messages[0].images' must be a list"),
    ({"messages": [{"role": "user", "images": [1]}]}, "'messages[0].images[0]' must be a base64 string"),
    ({"messages": [{"role": "user", "images": ["not base64!"]}]}, "'messages[0].images[0]' is not valid base64"),
    ({"messages": [{"role": "user", "images": [""]}]}, "'messages[0].images[0]' must not be empty"),
    ({"messages": [{"role": "user", "images": ["data:image/png,abc"]}]}, "without ';base64,'"),
    ({"messages": [{"role": "user", "tool_calls": [{"name": "f"}]}]}, "only an assistant turn calls tools"),
    ({"messages": [{"role": "assistant", "tool_calls": {"name": "f"}}]}, "'messages[0].tool_calls' must be a list"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"arguments": {}}]}]},
     "'messages[0].tool_calls[0].name' must be a non-empty string"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"name": "f", "arguments": [1]}]}]},
     "'messages[0].tool_calls[0].arguments' must be an object"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]},
     "'messages[0].tool_calls[0].function.arguments' must be an object or a JSON object's text"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}, "name": "f"}]}]},
     "use one shape"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"type": "code", "name": "f"}]}]},
     "'messages[0].tool_calls[0].type' must be \"function\""),
    ({"messages": [{"role": "assistant", "tool_calls": [{"name": "f", "id": ""}]}]},
     "'messages[0].tool_calls[0].id'"),
    ({"messages": [{"role": "user", "content": "x", "tool_name": "f"}]}, "'messages[0].tool_name' belongs to a tool"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": 5}]}, "'messages[0].tool_call_id' must be a string"),
    ({"input": "x", "tools": [{"name": "f"}]}, "'tools' need a conversation"),
    ({"messages": [{"role": "user"}], "tools": {"name": "f"}}, "'tools' must be a list"),
    ({"messages": [{"role": "user"}], "tools": [{"name": ""}]}, "'tools[0].name'"),
    ({"messages": [{"role": "user"}], "tools": [{"name": "f"}, {"name": "f"}]}, "two tools are named 'f'"),
    ({"messages": [{"role": "user"}], "tools": [{"name": "f", "parameters": "{}"}]},
     "'tools[0].parameters' must be an object"),
    ({"messages": [{"role": "user"}], "tools": [{"type": "function", "function": {"name": "f", "strict": True}}]},
     "unknown field 'tools[0].function.strict'"),
    ({"messages": [{"role": "user"}], "tools": [{"type": "retrieval", "name": "f"}]}, "'tools[0].type'"),
    ({"messages": [{"role": "user"}], "tools": [{"name": "f", "description": 3}]},
     "'tools[0].description' must be a string"),
    ({"messages": [{"role": "user"}], "tool_choice": "auto"}, "'tool_choice' needs 'tools'"),
    ({"messages": [{"role": "user"}], "tools": [{"name": "f"}], "tool_choice": "g"}, "a tool's name (['f'])"),
    ({"messages": [{"role": "user"}], "tools": [{"name": "f"}], "tool_choice": 1}, "'tool_choice' must be one of"),
    ({"messages": [{"role": "user"}], "tools": [{"name": "f"}], "tool_choice": {"function": {"name": "auto"}}},
     "is a tool_choice keyword"),
    ({"input": "x", "format": "yaml"}, "'format' must be \"json\" or a JSON schema object"),
    ({"input": "x", "format": ["json"]}, "'format'"),
    ({"input": "x", "keep_alive": "5 minutes"}, "'keep_alive' must be a duration"),
    ({"input": "x", "keep_alive": True}, "'keep_alive'"),
    ({"input": "x", "keep_alive": {"m": 5}}, "'keep_alive'"),
])
def test_a_malformed_field_is_400_and_names_its_path(fields: dict[str, Any], needle: str) -> None:
    error = refused({"model_id": "llama3.1", **fields})
    assert error.status == 400 and needle in error.message, error.message
    assert error.param


def test_an_unknown_option_names_the_accepted_ones_and_extra() -> None:
    error = refused({"model_id": "llama3.1", "input": "x", "options": {"mirostat": 2}})
    assert error.status == 400 and error.param == "options.mirostat"
    assert all(name in error.message for name in OPTION_FIELDS) and "'options.extra'" in error.message


# --- the limits -------------------------------------------------------------------------------


def test_the_limits_fit_kafkas_default_message_size() -> None:
    kafka_default = 1024 * 1024  # message.max.bytes / max.request.size
    assert MAX_IMAGE_BYTES < MAX_RECORD_BYTES < kafka_default
    assert MAX_IMAGE_BYTES * 4 // 3 == kafka_default  # in base64, the images alone fill a 1 MiB body


# --- the bridge --------------------------------------------------------------------------------


def bridge() -> BridgeCore:
    core = BridgeCore(CODEC, responses_topic="inference.responses", tokens_topic="inference.tokens",
                      access=AccessPolicy(AccessSettings()), known_models=MODELS, max_queue=100)
    core.start_at({("inference.responses", 0): 0, ("inference.tokens", 0): 0})
    return core


def frames(peer: Any) -> list[dict[str, Any]]:
    out = [json.loads(f) for f in peer.outbox.queued()]
    peer.outbox._frames.clear()
    return out


def test_a_submit_frame_carries_the_conversation_to_the_producer() -> None:
    core = bridge()
    peer = core.connect()
    (action,) = core.receive(peer, json.dumps({"type": "submit", "id": "c1", **conversation(format=PERSON)}))
    assert isinstance(action, Produce)
    request = action.request
    assert [m.role for m in request.messages] == ["system", "user", "assistant", "tool"]
    assert request.tools[0].name == "get_weather" and json.loads(request.format or "") == PERSON


def test_a_submit_frame_is_refused_as_post_infer_refuses_it() -> None:
    core = bridge()
    peer = core.connect()
    assert core.receive(peer, json.dumps({"type": "submit", "id": "c2", "model_id": "llama3.1",
                                          "messages": [{"role": "wizard", "content": "x"}]})) == []
    (error,) = frames(peer)
    assert error["type"] == "error" and error["status"] == 400 and error["id"] == "c2"
    assert "'messages[0].role' must be one of" in error["reason"]
    big = [{"role": "user", "content": "x", "images": [b64(b"i" * (MAX_IMAGE_BYTES + 1))]}]
    core.receive(peer, json.dumps({"type": "submit", "id": "c3", "model_id": "llama3.1", "messages": big}))
    (error,) = frames(peer)
    assert (error["status"], error["id"]) == (413, "c3") and "the limit is" in error["reason"]


def test_a_request_too_large_to_produce_is_an_error_frame_and_its_subscription_goes() -> None:
    core = bridge()
    peer = core.connect()
    (action,) = core.receive(peer, json.dumps({"type": "submit", "id": "c4", "model_id": "llama3.1", "input": "x"}))
    too_large = RequestTooLarge("c4", MAX_RECORD_BYTES + 1)
    core.submit_failed(peer, action.request, str(too_large), 413, written=False)
    (error,) = frames(peer)
    assert error == {"type": "error", "reason": str(too_large), "status": 413, "id": "c4"}
    assert core.status()["subscribed"] == 0  # it was never written: nothing will answer it


def test_result_and_token_frames_carry_tool_calls_and_the_message() -> None:
    call = ToolCall("get_weather", '{"city":"Paris"}', "call_1")
    response = InferenceResponse(
        id="r1", model_id="llama3.1", status="ok", context=ModelContext("s"), latency_ms=5,
        completed_at=datetime(2024, 5, 1, tzinfo=UTC), output="", tool_calls=(call,), done_reason="stop")
    result = json.loads(result_frame(response))
    shown = {"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}}
    assert result["type"] == "result" and result["tool_calls"] == [shown]
    assert result["message"] == {"role": "assistant", "content": "", "tool_calls": [shown]}

    plain = InferenceToken(id="r1", model_id="llama3.1", session_id="s", seq=0, text="Hel")
    assert json.loads(token_frame(plain)) == {"type": "token", "id": "r1", "seq": 0, "text": "Hel"}
    calling = InferenceToken(id="r1", model_id="llama3.1", session_id="s", seq=1, text="", tool_calls=(call,))
    assert json.loads(token_frame(calling)) == {"type": "token", "id": "r1", "seq": 1, "text": "", "tool_calls": [shown]}


# --- nexus submit ------------------------------------------------------------------------------


def test_nexus_submit_reads_conversations_from_json_lines() -> None:
    lines = [json.dumps(conversation(id="l1")), "", json.dumps({"model_id": "mistral", "input": "x", "format": "json"})]
    first, second = submit_command.requests_from_lines(lines, MODELS, CODEC)
    assert first.id == "l1" and first.is_chat and first.tools[0].name == "get_weather"
    assert second.format == "json" and not second.is_chat


def test_nexus_submit_names_the_line_of_a_bad_or_too_large_request() -> None:
    bad = json.dumps({"model_id": "llama3.1", "messages": [{"role": "user", "content": 1}]})
    with pytest.raises(submit_command.InvalidInputError, match=r"line 2: 'messages\[0\].content' must be a string"):
        submit_command.requests_from_lines(["{\"model_id\":\"llama3.1\",\"input\":\"ok\"}", bad], MODELS, CODEC)
    huge = json.dumps({"id": "h1", "model_id": "llama3.1", "input": "x" * MAX_RECORD_BYTES})
    with pytest.raises(submit_command.InvalidInputError,
                       match=rf"line 1: request h1 is \d+ bytes encoded; the limit is {MAX_RECORD_BYTES}"):
        submit_command.requests_from_lines([huge], MODELS, CODEC)


def test_nexus_submit_refuses_a_too_large_prompt_before_connecting() -> None:
    args = argparse.Namespace(prompt="x" * MAX_RECORD_BYTES, model="llama3.1", session=None, meta=[], id="big",
                              temperature=None, max_tokens=None, seed=None, no_wait=False, timeout=1.0, json=False)
    settings = Settings(kafka=KafkaSettings(bootstrap="127.0.0.1:9"),
                        models=(ModelSettings("llama3.1", (EndpointSettings("http://127.0.0.1:9"),)),))
    err = io.StringIO()
    assert submit_command.run(args, settings, out=io.StringIO(), err=err) == submit_command.EXIT_INVALID
    assert f"the limit is {MAX_RECORD_BYTES}" in err.getvalue()


def test_nexus_submit_prints_tool_calls_with_the_answer() -> None:
    def answer(output: str, *calls: ToolCall) -> InferenceResponse:
        return InferenceResponse(id="r", model_id="llama3.1", status="ok", context=ModelContext("s"), latency_ms=1,
                                 completed_at=datetime(2024, 5, 1, tzinfo=UTC), output=output,
                                 tool_calls=calls)

    weather = ToolCall("get_weather", '{"city":"Paris"}')
    assert submit_command.answer_lines(answer("Hi")) == ["Hi"]
    assert submit_command.answer_lines(answer("")) == [""]
    assert submit_command.answer_lines(answer("", weather, ToolCall("now"))) == [
        '[tool call] get_weather({"city": "Paris"})', "[tool call] now({})"]
    assert submit_command.answer_lines(answer("Let me look.", weather)) == [
        "Let me look.", '[tool call] get_weather({"city": "Paris"})']


# --- nexus replay ------------------------------------------------------------------------------


def test_replay_tables_show_conversations_and_tool_calls() -> None:
    def row(value: Any, kind: str) -> str:
        return table_row(ReplayRecord(topic="t", partition=0, offset=0, timestamp=0, kind=kind, key=None,
                                      value=value, raw=b"", headers={}), text_width=200)

    request = parse(conversation(id="q"))
    assert "[chat, 4 turns, tools get_weather] What is in this picture" in row(request, "request")
    response = InferenceResponse(
        id="q", model_id="llama3.1", status="ok", context=ModelContext("s"), latency_ms=1,
        completed_at=datetime(2024, 5, 1, tzinfo=UTC), output="",
        tool_calls=(ToolCall("get_weather", '{"city":"Paris"}'),))
    assert row(response, "response").endswith('[tool call] get_weather({"city":"Paris"})')
    token = InferenceToken(id="q", model_id="llama3.1", session_id="s", seq=2, text="",
                           tool_calls=(ToolCall("f", "{}"),))
    assert row(token, "token").endswith("#2 [tool call] f({})")  # whitespace is flattened


# --- the gateway: POST /infer and its OpenAPI document ------------------------------------------


def _spec() -> dict[str, Any]:
    from producers.gateway.openapi import build_spec

    return build_spec(Settings(models=(ModelSettings("llama3.1", (EndpointSettings("http://127.0.0.1:9"),)),)))


def _accepts(spec: dict[str, Any], body: Any) -> bool:
    registry = Registry().with_resource("urn:spec", Resource.from_contents(spec, default_specification=DRAFT202012))
    validator = Draft202012Validator({"$ref": "urn:spec#/components/schemas/InferRequest"}, registry=registry)
    return validator.is_valid(body)


def test_the_openapi_request_schema_documents_the_conversation() -> None:
    from schemas.validation import _FIELDS

    spec = _spec()
    validate_openapi(spec)  # still OpenAPI 3.1
    schemas = spec["components"]["schemas"]
    assert set(schemas["InferRequest"]["properties"]) == _FIELDS
    assert set(schemas["InferOptions"]["properties"]) == set(OPTION_FIELDS)
    assert str(MAX_IMAGE_BYTES) in spec["paths"]["/infer"]["post"]["responses"]["413"]["description"]
    for name in ("InferMessage", "InferTool", "InferToolCall", "AnswerToolCall", "AnswerMessage",
                 "InferenceResponse", "InferenceToken"):
        assert name in schemas
    bodies = [
        conversation(),
        conversation(tool_choice={"type": "function", "function": {"name": "get_weather"}}, format=PERSON,
                     keep_alive=300, options={"stop": "x", "top_k": 5, "extra": {"mirostat": 1}}),
        {"model_id": "llama3.1", "input": "x", "format": "json", "keep_alive": "5m", "messages": []},
        {"model_id": "llama3.1", "messages": [{"role": "assistant", "tool_calls": [
            {"id": None, "name": "f", "arguments": {}}]}]},
    ]
    for body in bodies:
        parse(body)
        assert _accepts(spec, body), body
    for body in ({"model_id": "llama3.1"}, {"model_id": "llama3.1", "input": "x", "messages": [{"role": "user"}]},
                 {"model_id": "llama3.1", "messages": [{"role": "robot"}]},
                 {"model_id": "llama3.1", "input": "x", "options": {"mirostat": 1}},
                 {"model_id": "llama3.1", "input": "x", "format": "yaml"},
                 {"model_id": "llama3.1", "messages": [{"role": "user", "text": "x"}]}):
        with pytest.raises(RejectedRequest):
            request_from_json(body, MODELS)
        assert not _accepts(spec, body), body


class FakeProducer:
    """The gateway's producer, without Kafka: keeps what it was given, or refuses it as too large."""

    instances: list[FakeProducer] = []

    def __init__(self, kafka: KafkaSettings, codec: Codec | None = None) -> None:
        self.submitted: list[InferenceRequest] = []
        FakeProducer.instances.append(self)

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def submit(self, request: InferenceRequest) -> str:
        size = len(encode_request(CODEC, request))
        if size > MAX_RECORD_BYTES:
            raise RequestTooLarge(request.id, size)
        self.submitted.append(request)
        return request.id


@pytest.fixture
async def gateway(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    from producers import replies
    from producers.gateway import app as gateway_app
    from producers.gateway.models import EndpointStateReader

    async def nothing(*args: Any, **kwargs: Any) -> None:
        return None

    monkeypatch.setattr(gateway_app, "ensure_topics", nothing)
    monkeypatch.setattr(gateway_app, "RequestProducer", FakeProducer)
    monkeypatch.setattr(EndpointStateReader, "start", nothing)
    monkeypatch.setattr(EndpointStateReader, "stop", nothing)
    monkeypatch.setattr(replies.ReplyReader, "start", nothing)
    monkeypatch.setattr(replies.ReplyReader, "stop", nothing)
    FakeProducer.instances.clear()
    settings = Settings(models=(ModelSettings("llama3.1", (EndpointSettings("http://127.0.0.1:9"),)),))
    async with TestClient(TestServer(gateway_app.create_app(settings))) as client:
        yield client, FakeProducer.instances[-1]


async def test_post_infer_submits_the_whole_conversation(gateway) -> None:  # type: ignore[no-untyped-def]
    client, producer = gateway
    body = conversation(id="g1", tool_choice="required", format=PERSON, keep_alive="1m",
                        options={"top_p": 0.5, "stop": ["x"], "extra": {"mirostat": 1}})
    reply = await client.post("/infer", json=body)
    assert reply.status == 202 and await reply.json() == {"id": "g1", "status": "submitted"}
    (request,) = producer.submitted
    expected = parse(body)
    for field in ("messages", "tools", "tool_choice", "format", "keep_alive", "options", "input"):
        assert getattr(request, field) == getattr(expected, field), field


async def test_post_infer_answers_413_for_a_request_over_one_kafka_record(gateway) -> None:  # type: ignore[no-untyped-def]
    client, producer = gateway
    reply = await client.post("/infer", json={"id": "g2", "model_id": "llama3.1", "input": "x" * 1_040_000})
    assert reply.status == 413
    error = (await reply.json())["error"]
    assert error.startswith("request g2 is ") and f"the limit is {MAX_RECORD_BYTES}" in error
    assert producer.submitted == []
    over = [{"role": "user", "content": "x", "images": [b64(b"i" * (MAX_IMAGE_BYTES // 2))]}] * 2
    over[1] = {"role": "user", "content": "y", "images": [b64(b"j" * 16)]}
    reply = await client.post("/infer", json={"model_id": "llama3.1", "messages": over})
    assert reply.status == 202  # within the image limit
