"""Unit tests of the drop-in APIs' decisions: headers, conversations, bodies, answers, the reply index."""

from __future__ import annotations

import base64
import hashlib
import json
from collections import deque
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta, UTC

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from nexus.access import AccessPolicy
from nexus.errors import NexusError
from nexus.settings import AccessSettings, ApiKey, EndpointSettings, ModelSettings, Settings
from producers.client import RequestTooLarge, SubmitError
from producers.gateway import access as access_http
from producers.gateway.dropin import DropIn, DropInMetrics
from producers.gateway.dropin.conversation import CallContext, DropInError, call_context, keep_alive, resolve_model
from producers.gateway.dropin.ollama import chunk_object as ollama_chunk
from producers.gateway.dropin.ollama import final_object, ollama_stats, parse_chat, parse_generate, tags_object
from producers.gateway.dropin.openai import (
    chunk_object,
    completion_object,
    error_object,
    parse_chat_completion,
    parse_completion,
    tool_call_id,
    usage_chunk,
)
from producers.gateway.dropin.ollama import OllamaApi, add_ollama_routes
from producers.gateway.dropin.openai import add_openai_routes
from producers.replies import (
    REPLY_HEADER,
    ChunkSequencer,
    ReplyIndex,
    ReplyReader,
    ReplyReaderError,
    ReplyTimeoutError,
    instance_name,
)
from nexus.settings import KafkaSettings
from schemas import (
    BAD_REQUEST, Codec, InferenceRequest, InferenceResponse, InferenceToken, Message, ModelContext, Tool, ToolCall,
    decode_request, encode_request, encode_response, encode_token,
)
from schemas.limits import MAX_IMAGE_BYTES, MAX_SESSION_ID_LENGTH
from schemas.validation import RejectedRequest

KNOWN = ("llama3.1", "mistral")
CALL = CallContext(ModelContext("s1", {"user": "alice"}), 30.0, "default")
CODEC = Codec.from_directory()
PNG = b"\x89PNG\r\n\x1a\n fake image"
PNG_B64 = base64.b64encode(PNG).decode()
WEATHER = {"type": "function", "function": {"name": "weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CALL_PARIS = ToolCall("weather", '{"city":"Paris"}')


def on_the_wire(request: InferenceRequest | None) -> InferenceRequest:
    """The request as the worker reads it: it must fit the Avro schema."""
    assert request is not None
    decoded = decode_request(CODEC, encode_request(CODEC, request))
    assert decoded == request
    return decoded


def response(request_id: str = "r1", output: str = "hello world", **fields: object) -> InferenceResponse:
    values: dict[str, object] = dict(
        id=request_id, model_id="llama3.1", status="ok", context=ModelContext("s1"), latency_ms=120,
        completed_at=datetime(2024, 5, 1, 12, 0, tzinfo=UTC), output=output, backend_latency_ms=100,
        prompt_tokens=7, completion_tokens=3, done_reason="stop", time_to_first_token_ms=30,
    )
    values.update(fields)
    return InferenceResponse(**values)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- headers


def test_headers_give_session_metadata_timeout_and_cache() -> None:
    call = call_context(
        [("X-Nexus-Session", "abc"), ("x-nexus-meta-User", "alice"), ("X-Nexus-Meta-Lang", "en"),
         ("X-Nexus-Timeout-Ms", "1500"), ("X-Nexus-Cache", "no-cache"), ("Accept", "*/*")],
        default_timeout_s=300,
    )
    assert call.context == ModelContext("abc", {"user": "alice", "lang": "en"})
    assert call.timeout_s == 1.5
    assert call.cache == "no-cache"


def test_without_headers_each_call_has_a_fresh_session_and_the_default_timeout() -> None:
    a, b = call_context([], 300), call_context([], 300)
    assert a.context.session_id != b.context.session_id
    assert a.context.metadata == {} and a.timeout_s == 300 and a.cache == "default"


@pytest.mark.parametrize(
    "headers",
    [
        [("X-Nexus-Timeout-Ms", "0")],
        [("X-Nexus-Timeout-Ms", "soon")],
        [("X-Nexus-Cache", "sometimes")],
        [("X-Nexus-Meta-", "x")],
        [("X-Nexus-Meta-A", "1"), ("x-nexus-meta-a", "2")],
        [("X-Nexus-Session", "")],
    ],
)
def test_bad_headers_are_400(headers: list[tuple[str, str]]) -> None:
    with pytest.raises(DropInError) as err:
        call_context(headers, 300)
    assert err.value.status == 400


def test_header_limits_are_the_shared_ones() -> None:
    """The session header is capped like context.session_id of POST /infer; one error type for both."""
    longest = "s" * MAX_SESSION_ID_LENGTH
    assert call_context([("X-Nexus-Session", longest)], 300).context.session_id == longest
    with pytest.raises(RejectedRequest) as err:
        call_context([("X-Nexus-Session", longest + "s")], 300)
    assert err.value.status == 400 and "X-Nexus-Session" in err.value.message and "256" in err.value.message
    assert err.value.param is None  # a header, not a body field: OpenAI's param stays null
    assert DropInError is RejectedRequest and isinstance(err.value, NexusError) and isinstance(err.value, ValueError)
    assert call_context([("X-Nexus-Timeout-Ms", "86400000")], 300).timeout_s == 86400
    with pytest.raises(RejectedRequest, match="86400000"):
        call_context([("X-Nexus-Timeout-Ms", "86400001")], 300)


def test_model_names_resolve_like_ollama() -> None:
    assert resolve_model("llama3.1", KNOWN) == "llama3.1"
    assert resolve_model("llama3.1:latest", KNOWN) == "llama3.1"
    assert resolve_model("Mistral", KNOWN) == "mistral"
    assert resolve_model("llama3.1:8b", KNOWN) is None
    assert resolve_model("gpt-4", KNOWN) is None


# --------------------------------------------------------------------------- Ollama bodies


def test_generate_maps_prompt_and_options() -> None:
    """Every option reaches the model: the common ones in their own fields, the rest as given in extra."""
    call = parse_generate(
        {"model": "llama3.1:latest", "prompt": "Hi", "stream": False, "suffix": "",
         "options": {"temperature": 0, "num_predict": 5, "seed": 7, "top_k": 3, "num_ctx": 4096, "top_p": 0.9,
                     "min_p": 0.05, "stop": ["\n\n"], "repeat_penalty": 1.1, "presence_penalty": 0.5,
                     "frequency_penalty": -0.5, "mirostat": 2, "repeat_last_n": 64, "num_gpu": None},
         "keep_alive": "5m", "format": "json"},
        KNOWN, CALL,
    )
    assert call.model == "llama3.1:latest" and not call.stream and not call.chat and call.ignored == ()
    request = on_the_wire(call.request)
    assert (request.model_id, request.input, request.stream, request.is_chat) == ("llama3.1", "Hi", False, False)
    assert request.context == CALL.context
    assert (request.format, request.keep_alive) == ("json", "5m")
    opts = request.options
    assert (opts.temperature, opts.max_tokens, opts.seed, opts.top_k, opts.num_ctx) == (0.0, 5, 7, 3, 4096)
    assert (opts.top_p, opts.min_p, opts.stop, opts.repeat_penalty) == (0.9, 0.05, ("\n\n",), 1.1)
    assert (opts.presence_penalty, opts.frequency_penalty) == (0.5, -0.5)
    assert opts.extra is not None and json.loads(opts.extra) == {"mirostat": 2, "repeat_last_n": 64}


def test_generate_with_system_or_images_is_a_conversation() -> None:
    """Ollama's generate `system` replaces the model's system prompt: sent as [system, user] to the chat API."""
    call = parse_generate({"model": "mistral", "prompt": "Hi", "system": "Be terse.",
                           "options": {"num_predict": -1}}, KNOWN, CALL)
    request = on_the_wire(call.request)
    assert call.stream and request.stream and not call.chat  # the answer keeps generate's shape
    assert request.input == "Hi" and request.is_chat
    assert request.messages == (Message("system", "Be terse."), Message("user", "Hi"))
    assert request.options.max_tokens is None  # -1: no limit, as in Ollama
    seen = parse_generate({"model": "mistral", "prompt": "What is this?", "images": [PNG_B64]}, KNOWN, CALL)
    assert on_the_wire(seen.request).messages == (Message("user", "What is this?", (PNG,)),)
    plain = parse_generate({"model": "mistral", "prompt": "Hi", "system": ""}, KNOWN, CALL)
    assert on_the_wire(plain.request).messages == ()


def test_generate_without_prompt_is_the_load_call() -> None:
    call = parse_generate({"model": "mistral"}, KNOWN, CALL)
    assert call.request is None
    assert final_object(call, None, "")["done_reason"] == "load"


def test_formats_and_keep_alive() -> None:
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    call = parse_chat({"model": "llama3.1", "messages": [{"role": "user", "content": "x"}], "format": schema,
                       "keep_alive": 0}, KNOWN, CALL)
    request = on_the_wire(call.request)
    assert request.format == '{"type":"object","properties":{"b":{"type":"integer"},"a":{"type":"string"}}}'
    assert json.loads(request.format) == schema  # the client's property order is kept: it is the answer's
    assert request.keep_alive == "0s"
    assert [keep_alive(v) for v in (None, "", "10m", "-1", "300", 300, 2.7, -1, -0.5)] == [
        None, None, "10m", "-1s", "300s", "300s", "2s", "-1s", "-1s"]  # numbers are seconds, as Ollama reads them


@pytest.mark.parametrize(
    "body, status",
    [
        ({"prompt": "x"}, 400),
        ({"model": "nope", "prompt": "x"}, 404),
        ({"model": "mistral", "prompt": "x", "images": ["not base64!"]}, 400),
        ({"model": "mistral", "prompt": "x", "images": "aGk="}, 400),
        ({"model": "mistral", "prompt": "x", "format": "xml"}, 400),
        ({"model": "mistral", "prompt": "x", "format": ["json"]}, 400),
        ({"model": "mistral", "prompt": "x", "format": {"type": "number", "maximum": float("nan")}}, 400),
        ({"model": "mistral", "prompt": "x", "raw": True}, 400),
        ({"model": "mistral", "prompt": "x", "suffix": "end"}, 400),
        ({"model": "mistral", "prompt": "x", "template": "{{ .Prompt }}"}, 400),
        ({"model": "mistral", "prompt": "x", "context": [1, 2]}, 400),
        ({"model": "mistral", "prompt": "x", "think": True}, 400),
        ({"model": "mistral", "prompt": "x", "stream": "yes"}, 400),
        ({"model": "mistral", "prompt": "x", "options": {"temperature": -1}}, 400),
        ({"model": "mistral", "prompt": "x", "options": {"top_p": 2}}, 400),
        ({"model": "mistral", "prompt": "x", "options": {"stop": [1]}}, 400),
        ({"model": "mistral", "prompt": "x", "options": {"num_ctx": 0}}, 400),
        ({"model": "mistral", "prompt": "x", "keep_alive": True}, 400),
        ({"model": "mistral", "prompt": 3}, 400),
        (["not", "an", "object"], 400),
    ],
)
def test_generate_refusals(body: object, status: int) -> None:
    with pytest.raises(DropInError) as err:
        parse_generate(body, KNOWN, CALL)
    assert err.value.status == status


def test_unknown_model_message_is_ollamas() -> None:
    with pytest.raises(DropInError, match="^model 'x' not found$"):
        parse_generate({"model": "x", "prompt": "y"}, KNOWN, CALL)


def test_chat_passes_the_conversation_through() -> None:
    """Roles, images, the assistant's tool calls and the tool's result reach the request as they were."""
    call = parse_chat({"model": "llama3.1", "tools": [WEATHER], "messages": [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Weather in Paris? And this?", "images": [PNG_B64]},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 degrees", "tool_name": "weather"},
        {"role": "assistant", "content": "18 degrees.", "thinking": "easy"},
        {"role": "user", "content": "Thanks"}]}, KNOWN, CALL)
    request = on_the_wire(call.request)
    assert call.chat and call.stream and request.is_chat
    assert request.input == "Thanks"  # the last user turn, for the audit trail
    assert request.messages == (
        Message("system", "Be terse."),
        Message("user", "Weather in Paris? And this?", (PNG,)),
        Message("assistant", "", tool_calls=(CALL_PARIS,)),
        Message("tool", "18 degrees", tool_name="weather"),
        Message("assistant", "18 degrees."),
        Message("user", "Thanks"),
    )
    assert request.tools == (Tool("weather", "Weather of a city", json.dumps(WEATHER["function"]["parameters"],
                                                                           separators=(",", ":"))),)
    assert call.ignored == ("messages.thinking",)  # the one thing not carried
    single = parse_chat({"model": "llama3.1", "tools": [], "messages": [{"role": "user", "content": "Hi"}]},
                        KNOWN, CALL)
    assert on_the_wire(single.request).messages == (Message("user", "Hi"),) and single.request.tools == ()
    assert parse_chat({"model": "llama3.1", "messages": []}, KNOWN, CALL).request is None  # the load call


@pytest.mark.parametrize(
    "messages",
    [[{"role": "robot", "content": "x"}], [{"role": "user", "content": "x", "images": ["%%%"]}],
     [{"role": "user", "content": 5}], "hello", [{"role": "assistant", "tool_calls": [{"name": "f"}]}],
     [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}],
     [{"role": "tool", "content": "x", "tool_name": 3}]],
)
def test_chat_refusals(messages: object) -> None:
    with pytest.raises(DropInError) as err:
        parse_chat({"model": "llama3.1", "messages": messages}, KNOWN, CALL)
    assert err.value.status == 400


@pytest.mark.parametrize("tools", ["weather", [{"type": "retrieval"}], [{"function": {"description": "no name"}}],
                                   [{"function": {"name": "f", "parameters": "[]"}}]])
def test_bad_tools_are_400(tools: object) -> None:
    for parse, body in ((parse_chat, {"messages": [{"role": "user", "content": "x"}]}),
                        (parse_chat_completion, {"messages": [{"role": "user", "content": "x"}]})):
        with pytest.raises(DropInError) as err:
            parse({"model": "llama3.1", "tools": tools, **body}, KNOWN, CALL)
        assert err.value.status == 400 and (err.value.param or "").startswith("tools")


def test_images_over_the_limit_are_413_naming_size_and_limit() -> None:
    half = base64.b64encode(b"x" * (MAX_IMAGE_BYTES // 2 + 1)).decode()
    body = {"model": "llama3.1", "messages": [{"role": "user", "content": "x", "images": [half]},
                                             {"role": "user", "content": "y", "images": [half]}]}
    with pytest.raises(DropInError) as err:
        parse_chat(body, KNOWN, CALL)
    total = 2 * (MAX_IMAGE_BYTES // 2 + 1)
    assert err.value.status == 413
    assert err.value.message == (f"images of this request total {total} bytes; the limit is {MAX_IMAGE_BYTES} "
                                 "(a request must fit one Kafka record)")
    with pytest.raises(DropInError) as err:
        parse_generate({"model": "llama3.1", "prompt": "x", "images": [half, half]}, KNOWN, CALL)
    assert err.value.status == 413
    url = "data:image/png;base64," + half
    with pytest.raises(DropInError) as err:
        parse_chat_completion({"model": "llama3.1", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "image_url", "image_url": {"url": url}}]}]},
            KNOWN, CALL)
    assert err.value.status == 413 and str(MAX_IMAGE_BYTES) in err.value.message
    at_limit = base64.b64encode(b"x" * MAX_IMAGE_BYTES).decode()
    assert parse_generate({"model": "llama3.1", "prompt": "x", "images": [at_limit]}, KNOWN, CALL).request


def test_ollama_statistics_come_from_the_response() -> None:
    stats = ollama_stats(response())
    assert stats == {
        "total_duration": 120_000_000, "load_duration": 20_000_000, "prompt_eval_count": 7,
        "prompt_eval_duration": 30_000_000, "eval_count": 3, "eval_duration": 70_000_000,
    }
    cached = ollama_stats(response(backend_latency_ms=0, time_to_first_token_ms=None, latency_ms=5))
    assert cached["load_duration"] == cached["total_duration"] == 5_000_000 and cached["eval_duration"] == 0


def test_final_objects_have_ollamas_shape() -> None:
    gen = parse_generate({"model": "llama3.1", "prompt": "Hi"}, KNOWN, CALL)
    final = final_object(gen, response(done_reason="length"), "hello world")
    assert final["response"] == "hello world" and final["done"] is True and final["done_reason"] == "length"
    assert final["created_at"] == "2024-05-01T12:00:00.000000Z" and final["model"] == "llama3.1"
    chat = parse_chat({"model": "llama3.1", "messages": [{"role": "user", "content": "Hi"}]}, KNOWN, CALL)
    assert final_object(chat, response(), "")["message"] == {"role": "assistant", "content": ""}
    tags = tags_object(KNOWN, datetime(2024, 1, 1, tzinfo=UTC))
    assert [m["name"] for m in tags["models"]] == list(KNOWN)


def test_ollama_answers_carry_tool_calls_with_object_arguments() -> None:
    chat = parse_chat({"model": "llama3.1", "messages": [{"role": "user", "content": "Weather?"}]}, KNOWN, CALL)
    calls = (CALL_PARIS, ToolCall("weather", '{"city":"Rome"}', id="call_7"))
    whole = OllamaApi().whole(chat, response(output="", tool_calls=calls))
    assert whole["message"] == {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"index": 0, "name": "weather", "arguments": {"city": "Paris"}}},
        {"id": "call_7", "function": {"index": 1, "name": "weather", "arguments": {"city": "Rome"}}}]}
    assert whole["done_reason"] == "stop"
    chunk = ollama_chunk(chat, "", datetime(2024, 5, 1, tzinfo=UTC), calls[1:], start=1)
    assert chunk["done"] is False and chunk["message"]["tool_calls"][0]["function"]["index"] == 1
    assert "tool_calls" not in OllamaApi().whole(chat, response())["message"]  # none: no key, as Ollama


# --------------------------------------------------------------------------- OpenAI bodies


def test_chat_completion_maps_fields() -> None:
    call = parse_chat_completion(
        {"model": "llama3.1", "messages": [{"role": "developer", "content": "Be terse."},
                                           {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                                        {"type": "text", "text": "there"}]}],
         "max_completion_tokens": 9, "temperature": 0.5, "seed": 3, "top_p": 0.9, "user": "bob",
         "stop": ["END", "STOP"], "presence_penalty": 1.5, "frequency_penalty": -1, "logit_bias": {"1": 2},
         "stream": True, "stream_options": {"include_usage": True}},
        KNOWN, CALL,
    )
    assert call.chat and call.stream and call.include_usage and call.ignored == ("logit_bias",)
    request = on_the_wire(call.request)
    assert request.messages == (Message("system", "Be terse."), Message("user", "Hi\nthere"))
    assert request.input == "Hi\nthere"
    opts = request.options
    assert (opts.temperature, opts.max_tokens, opts.seed, opts.top_p) == (0.5, 9, 3, 0.9)
    assert (opts.stop, opts.presence_penalty, opts.frequency_penalty) == (("END", "STOP"), 1.5, -1.0)
    assert request.context.metadata == {"user": "alice"}  # the header's user wins over the body's
    one_stop = parse_chat_completion({"model": "llama3.1", "messages": [{"role": "user", "content": "x"}],
                                      "stop": "END", "max_tokens": 4}, KNOWN, CALL)
    assert (one_stop.request.options.stop, one_stop.request.options.max_tokens) == (("END",), 4)


def test_chat_completion_passes_images_tools_and_tool_results() -> None:
    call = parse_chat_completion({"model": "llama3.1", "tools": [WEATHER], "tool_choice": "auto", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Weather here?"},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG_B64,
                                                                         "detail": "low"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
        {"role": "tool", "tool_call_id": "call_unknown", "content": "?"}]}, KNOWN, CALL)
    request = on_the_wire(call.request)
    assert request.messages == (
        Message("user", "Weather here?", (PNG,)),
        Message("assistant", "", tool_calls=(ToolCall("weather", '{"city": "Paris"}', "call_1"),)),  # text as given
        Message("tool", "18 degrees", tool_name="weather", tool_call_id="call_1"),  # named after its call
        Message("tool", "?", tool_call_id="call_unknown"),
    )
    assert request.tools[0].name == "weather" and request.tool_choice == "auto"
    assert request.input == "Weather here?"
    named = parse_chat_completion({"model": "llama3.1", "tools": [WEATHER], "messages": [
        {"role": "user", "content": "x"}], "tool_choice": {"type": "function", "function": {"name": "weather"}}},
        KNOWN, CALL)
    assert named.request.tool_choice == "weather"


@pytest.mark.parametrize(
    "response_format, expected",
    [(None, None), ({"type": "text"}, None), ({"type": "json_object"}, "json"),
     ({"type": "json_schema", "json_schema": {
         "name": "city", "strict": True, "schema": {"type": "object", "properties": {"name": {"type": "string"}}}}},
      '{"type":"object","properties":{"name":{"type":"string"}}}')],
)
def test_response_format_becomes_the_requests_format(response_format: object, expected: str | None) -> None:
    call = parse_chat_completion({"model": "llama3.1", "messages": [{"role": "user", "content": "x"}],
                                  "response_format": response_format}, KNOWN, CALL)
    assert on_the_wire(call.request).format == expected


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
        ({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
        ({"model": "llama3.1", "messages": []}, 400, "messages"),
        ({"model": "llama3.1", "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
        ({"model": "llama3.1", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
         400, "tools[0].function"),
        ({"model": "llama3.1", "messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]},
         400, "functions"),
        ({"model": "llama3.1", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, 400, "temperature"),
        ({"model": "llama3.1", "messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, 400, "top_p"),
        ({"model": "llama3.1", "messages": [{"role": "user", "content": "x"}], "presence_penalty": 3},
         400, "presence_penalty"),
        ({"model": "llama3.1", "messages": [{"role": "user", "content": "x"}], "stop": 5}, 400, "stop"),
        ({"model": "llama3.1", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
         "messages[0].content[0].image_url.url"),
        ({"model": "llama3.1", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400,
         "messages[0].content"),
        ({"model": "llama3.1", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}, 400,
         "messages[0].content[0].image_url.url"),
        ({"model": "llama3.1", "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].tool_call_id"),
        ({"model": "llama3.1", "messages": [{"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "not json"}}]}]}, 400,
         "messages[0].tool_calls[0].function.arguments"),
        ({"model": "llama3.1", "messages": [{"role": "user", "content": "x"}],
          "response_format": {"type": "xml"}}, 400, "response_format"),
        ({"model": "llama3.1", "messages": [{"role": "user", "content": "x"}],
          "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400, "response_format"),
        ({"model": "llama3.1", "messages": [{"role": "user", "content": "x"}], "tool_choice": "sometimes"},
         400, "tool_choice"),
        ({"model": "llama3.1", "messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "function"}},
         400, "tool_choice"),
    ],
)
def test_chat_completion_refusals(body: dict[str, object], status: int, param: str) -> None:
    with pytest.raises(DropInError) as err:
        parse_chat_completion(body, KNOWN, CALL)
    assert (err.value.status, err.value.param) == (status, param)


def test_http_image_urls_are_refused_with_a_clear_message() -> None:
    with pytest.raises(DropInError, match="only data: URLs") as err:
        parse_chat_completion({"model": "llama3.1", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}, KNOWN, CALL)
    assert err.value.status == 400


def test_completion_takes_one_prompt() -> None:
    call = parse_completion({"model": "mistral", "prompt": ["Hi"], "max_tokens": 4, "stop": ".", "top_p": 0.5,
                             "seed": 1}, KNOWN, CALL)
    request = on_the_wire(call.request)
    assert not call.chat and request.input == "Hi" and not request.is_chat
    assert (request.options.max_tokens, request.options.stop, request.options.top_p) == (4, (".",), 0.5)
    with pytest.raises(DropInError):
        parse_completion({"model": "mistral", "prompt": ["a", "b"]}, KNOWN, CALL)


def test_openai_answer_shapes() -> None:
    call = parse_chat_completion({"model": "llama3.1", "messages": [{"role": "user", "content": "Hi"}],
                                  "stream_options": {"include_usage": True}, "stream": True}, KNOWN, CALL)
    whole = completion_object(call, response(done_reason="length"))
    assert whole["object"] == "chat.completion" and whole["id"] == "chatcmpl-" + call.request.id
    assert whole["choices"][0]["message"]["content"] == "hello world"
    assert whole["choices"][0]["finish_reason"] == "length"
    assert whole["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    first = chunk_object(call, "", first=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""} and first["usage"] is None
    assert chunk_object(call, None, "stop")["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                                             "finish_reason": "stop"}
    assert usage_chunk(call, response())["choices"] == []
    text = parse_completion({"model": "llama3.1", "prompt": "Hi"}, KNOWN, CALL)
    assert completion_object(text, response())["choices"][0]["text"] == "hello world"
    assert error_object(504, "late", code="timeout") == {
        "error": {"message": "late", "type": "timeout_error", "param": None, "code": "timeout"}}


def test_openai_answers_carry_tool_calls_with_text_arguments_and_ids() -> None:
    call = parse_chat_completion({"model": "llama3.1", "messages": [{"role": "user", "content": "Weather?"}],
                                  "tools": [WEATHER]}, KNOWN, CALL)
    calls = (CALL_PARIS, ToolCall("weather", '{"city":"Rome"}', id="call_backend"))
    whole = completion_object(call, response(output="", tool_calls=calls, done_reason="stop"))
    choice = whole["choices"][0]
    generated = tool_call_id(call, 0)
    assert generated.startswith("call_") and len(generated) == 29 and generated == tool_call_id(call, 0)
    assert generated != tool_call_id(call, 1)
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
        {"id": generated, "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
        {"id": "call_backend", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Rome"}'}}]}
    with_text = completion_object(call, response(output="Let me look.", tool_calls=calls[:1]))
    assert with_text["choices"][0]["message"]["content"] == "Let me look."
    delta = chunk_object(call, None, calls=calls[1:], start=1)["choices"][0]["delta"]
    assert delta == {"tool_calls": [{"index": 1, "id": "call_backend", "type": "function",
                                     "function": {"name": "weather", "arguments": '{"city":"Rome"}'}}]}


def test_whole_float_integers_count_in_drop_in_bodies() -> None:
    """JSON clients may send 5.0 for 5: the drop-in APIs take it, as they always did."""
    call = parse_completion({"model": "mistral", "prompt": "Hi", "max_tokens": 4.0, "seed": 2.0}, KNOWN, CALL)
    assert (call.request.options.max_tokens, call.request.options.seed) == (4, 2)
    with pytest.raises(DropInError) as err:
        parse_completion({"model": "mistral", "prompt": "Hi", "max_tokens": 4.5}, KNOWN, CALL)
    assert err.value.param == "max_tokens"


# --------------------------------------------------------------------------- one call's flow (call.py)

MODELS = tuple(ModelSettings(m, (EndpointSettings("http://127.0.0.1:9"),)) for m in KNOWN)
TOKEN = "secret-token"
MISTRAL_ONLY = ApiKey("team", hashlib.sha256(TOKEN.encode()).digest(), ("mistral",))

Script = Callable[[InferenceRequest], list[object]]


class FakeExchange:
    """Plays Kafka and the worker: ``script`` says what comes back for a request (chunks, then the
    response), or an exception to raise; ``refuse`` makes ``submit`` fail as Kafka would."""

    def __init__(self, script: Script, refuse: BaseException | None = None) -> None:
        self.script = script
        self.refuse = refuse
        self.submitted: list[InferenceRequest] = []
        self.released: list[str] = []
        self._events: dict[str, deque[object]] = {}

    async def submit(self, request: InferenceRequest) -> InferenceRequest:
        if self.refuse is not None:
            raise self.refuse
        self.submitted.append(request)
        self._events[request.id] = deque(self.script(request))
        return request

    def _next(self, waiter: InferenceRequest) -> object:
        event = self._events[waiter.id].popleft()
        if isinstance(event, BaseException):
            raise event
        return event

    async def response(self, waiter: InferenceRequest, deadline: float, timeout_s: float) -> object:
        while True:
            event = self._next(waiter)
            if not isinstance(event, (str, tuple)):  # chunks' texts and tool calls: a stream's only
                return event

    async def next_event(self, waiter: InferenceRequest, deadline: float, timeout_s: float) -> object:
        return self._next(waiter)

    def release(self, waiter: InferenceRequest) -> None:
        self.released.append(waiter.id)


def answer(*chunks: str | tuple[ToolCall, ...], status: str = "ok", error: str | None = None,
           error_kind: str | None = None, tool_calls: tuple[ToolCall, ...] = ()) -> Script:
    """Chunks (texts, or tool calls as the reply index hands them over), then the response."""
    def script(request: InferenceRequest) -> list[object]:
        output = "".join(c for c in chunks if isinstance(c, str))
        return [*chunks, response(request.id, output=output, status=status, error=error, error_kind=error_kind,
                                  context=request.context, tool_calls=tool_calls)]
    return script


class Gateway:
    """Both drop-in APIs on a test server, with a fake exchange and their own metrics."""

    def __init__(self, client: TestClient, exchange: FakeExchange, registry: CollectorRegistry) -> None:
        self.client, self.exchange, self.registry = client, exchange, registry

    def count(self, api: str, route: str, model: str, code: int) -> float:
        labels = {"api": api, "route": route, "model": model, "code": str(code)}
        return self.registry.get_sample_value("nexus_gateway_dropin_requests_total", labels) or 0.0

    def timeouts(self, api: str) -> float:
        return self.registry.get_sample_value("nexus_gateway_reply_timeouts_total", {"api": api}) or 0.0


@pytest.fixture
async def gateway_for() -> AsyncIterator[Callable[..., object]]:
    clients: list[TestClient] = []

    async def start(exchange: FakeExchange, access: AccessSettings = AccessSettings()) -> Gateway:
        settings = Settings(models=MODELS, access=access)
        registry = CollectorRegistry()
        index = ReplyIndex()
        reader = ReplyReader(settings.kafka, "gateway-test", index, Codec.from_directory())
        dropin = DropIn(settings, exchange, DropInMetrics(registry, index, reader), "1.2.3",  # type: ignore[arg-type]
                        clock=lambda: 0.0)
        # Above the gateway's 1 MiB body limit, which base64 images over MAX_IMAGE_BYTES always pass first
        # (the gateway app's own test checks it): here the image limit behind it is tested.
        app = web.Application(client_max_size=4 * 1024 * 1024)
        access_http.install(app, AccessPolicy(access))
        add_ollama_routes(app, dropin)
        add_openai_routes(app, dropin)
        client = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return Gateway(client, exchange, registry)

    yield start
    for client in clients:
        await client.close()


async def test_an_unstreamed_call_is_submitted_answered_counted_and_released(gateway_for) -> None:
    gw = await gateway_for(FakeExchange(answer("hello")))
    reply = await gw.client.post("/api/generate", json={"model": "llama3.1", "prompt": "Hi", "stream": False,
                                                        "options": {"top_k": 1}},
                                 headers={"X-Nexus-Session": "s9"})
    body = await reply.json()
    (request,) = gw.exchange.submitted
    assert reply.status == 200 and body["response"] == "hello" and body["done"] is True
    assert reply.headers["X-Nexus-Request-Id"] == request.id and "X-Nexus-Ignored" not in reply.headers
    assert request.context.session_id == "s9" and request.key_name is None and request.options.top_k == 1
    assert gw.exchange.released == [request.id]
    assert gw.count("ollama", "generate", "llama3.1", 200) == 1
    reply = await gw.client.post("/v1/completions", json={"model": "mistral", "prompt": "Hi", "logit_bias": {}})
    body = await reply.json()
    assert reply.status == 200 and body["object"] == "text_completion" and body["choices"][0]["text"] == "hello"
    assert reply.headers["X-Nexus-Ignored"] == "logit_bias"
    assert reply.headers["x-request-id"] == gw.exchange.submitted[1].id
    assert gw.count("openai", "completions", "mistral", 200) == 1


async def test_streams_are_ndjson_for_ollama_and_sse_for_openai(gateway_for) -> None:
    gw = await gateway_for(FakeExchange(answer("hel", "lo")))
    reply = await gw.client.post("/api/chat", json={"model": "llama3.1", "messages": [{"role": "user", "content": "x"}]})
    lines = [json.loads(line) for line in (await reply.text()).splitlines()]
    assert reply.status == 200 and reply.content_type == "application/x-ndjson"
    assert [line["message"]["content"] for line in lines] == ["hel", "lo", ""]
    assert [line["done"] for line in lines] == [False, False, True] and lines[-1]["eval_count"] == 3
    reply = await gw.client.post("/v1/chat/completions", json={
        "model": "llama3.1", "messages": [{"role": "user", "content": "x"}], "stream": True,
        "stream_options": {"include_usage": True}})
    events = (await reply.text()).split("\n\n")
    assert reply.status == 200 and reply.content_type == "text/event-stream"
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert [c["choices"][0]["delta"] for c in chunks[:-1]] == [
        {"role": "assistant", "content": ""}, {"content": "hel"}, {"content": "lo"}, {}]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"]["total_tokens"] == 10
    assert gw.count("ollama", "chat", "llama3.1", 200) == gw.count("openai", "chat.completions", "llama3.1", 200) == 1


async def test_timeouts_are_504_before_the_stream_and_an_error_chunk_after(gateway_for) -> None:
    def late(request: InferenceRequest) -> list[object]:
        timeout = ReplyTimeoutError(request.id, 0.5)
        return ["first", timeout] if request.stream else [timeout]

    gw = await gateway_for(FakeExchange(late))
    reply = await gw.client.post("/api/generate", json={"model": "llama3.1", "prompt": "x", "stream": False})
    assert reply.status == 504 and "within 0.5s" in (await reply.json())["error"]
    reply = await gw.client.post("/v1/completions", json={"model": "llama3.1", "prompt": "x"})
    error = (await reply.json())["error"]
    assert reply.status == 504 and reply.headers["x-should-retry"] == "false"
    assert (error["type"], error["code"]) == ("timeout_error", "timeout")
    reply = await gw.client.post("/api/generate", json={"model": "llama3.1", "prompt": "x"})
    lines = [json.loads(line) for line in (await reply.text()).splitlines()]
    assert reply.status == 200 and lines[0]["response"] == "first" and "within 0.5s" in lines[1]["error"]
    reply = await gw.client.post("/v1/completions", json={"model": "llama3.1", "prompt": "x", "stream": True})
    last = json.loads((await reply.text()).split("\n\n")[-2].removeprefix("data: "))
    assert last["error"]["code"] == "timeout" and last["error"]["type"] == "timeout_error"
    assert gw.timeouts("ollama") == gw.timeouts("openai") == 2
    assert gw.count("ollama", "generate", "llama3.1", 504) == 1 and gw.count("openai", "completions", "llama3.1", 200) == 1
    assert len(gw.exchange.released) == 4


PARIS, ROME = ToolCall("weather", '{"city":"Paris"}'), ToolCall("weather", '{"city":"Rome"}', id="call_r")


async def test_tool_calls_stream_as_each_api_streams_them(gateway_for) -> None:
    """The calls a chunk brought go out with it; those the chunks missed (the response came first) before the end."""
    gw = await gateway_for(FakeExchange(answer("Checking.", (PARIS,), tool_calls=(PARIS, ROME))))
    messages = [{"role": "user", "content": "Weather in Paris and Rome?"}]
    reply = await gw.client.post("/api/chat", json={"model": "llama3.1", "messages": messages, "tools": [WEATHER]})
    lines = [json.loads(line) for line in (await reply.text()).splitlines()]
    assert reply.status == 200 and [line["done"] for line in lines] == [False, False, False, True]
    assert [line["message"]["content"] for line in lines] == ["Checking.", "", "", ""]
    assert lines[1]["message"]["tool_calls"] == [
        {"function": {"index": 0, "name": "weather", "arguments": {"city": "Paris"}}}]
    assert lines[2]["message"]["tool_calls"] == [
        {"id": "call_r", "function": {"index": 1, "name": "weather", "arguments": {"city": "Rome"}}}]
    assert "tool_calls" not in lines[3]["message"] and lines[3]["done_reason"] == "stop"
    assert gw.exchange.submitted[0].tools[0].name == "weather"

    reply = await gw.client.post("/v1/chat/completions", json={"model": "llama3.1", "messages": messages,
                                                                "tools": [WEATHER], "stream": True})
    events = (await reply.text()).split("\n\n")
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    request = gw.exchange.submitted[1]
    paris_id = "call_" + hashlib.sha256(f"{request.id}/0".encode()).hexdigest()[:24]
    assert deltas == [
        {"role": "assistant", "content": ""}, {"content": "Checking."},
        {"tool_calls": [{"index": 0, "id": paris_id, "type": "function",
                         "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}]},
        {"tool_calls": [{"index": 1, "id": "call_r", "type": "function",
                         "function": {"name": "weather", "arguments": '{"city":"Rome"}'}}]},
        {}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls" and events[-2] == "data: [DONE]"

    reply = await gw.client.post("/v1/chat/completions", json={"model": "llama3.1", "messages": messages})
    message = (await reply.json())["choices"][0]["message"]
    assert [c["function"]["arguments"] for c in message["tool_calls"]] == ['{"city":"Paris"}', '{"city":"Rome"}']


async def test_a_backends_refusal_is_400_with_its_own_message(gateway_for) -> None:
    refused = '"llama3.1:latest" does not support tools'
    gw = await gateway_for(FakeExchange(answer(status="error", error=refused, error_kind=BAD_REQUEST)))
    messages = [{"role": "user", "content": "x"}]
    reply = await gw.client.post("/api/chat", json={"model": "llama3.1", "messages": messages, "tools": [WEATHER]})
    assert reply.status == 400 and await reply.json() == {"error": refused}  # streamed: the status still says it
    reply = await gw.client.post("/v1/chat/completions", json={"model": "llama3.1", "messages": messages,
                                                                "tools": [WEATHER]})
    assert reply.status == 400 and (await reply.json())["error"] == {
        "message": refused, "type": "invalid_request_error", "param": None, "code": None}
    assert gw.count("ollama", "chat", "llama3.1", 400) == gw.count("openai", "chat.completions", "llama3.1", 400) == 1

    def midstream(request: InferenceRequest) -> list[object]:
        return ["partial", response(request.id, status="error", error=refused, error_kind=BAD_REQUEST)]

    gw = await gateway_for(FakeExchange(midstream))
    reply = await gw.client.post("/v1/chat/completions", json={"model": "llama3.1", "messages": messages,
                                                                "stream": True})
    last = json.loads((await reply.text()).split("\n\n")[-2].removeprefix("data: "))
    assert last["error"]["type"] == "invalid_request_error" and last["error"]["message"] == refused


async def test_too_large_requests_are_413(gateway_for) -> None:
    too_large = RequestTooLarge("r1", 1_200_000)
    gw = await gateway_for(FakeExchange(answer("x"), refuse=too_large))
    messages = [{"role": "user", "content": "x"}]
    reply = await gw.client.post("/api/chat", json={"model": "llama3.1", "messages": messages})
    assert reply.status == 413 and await reply.json() == {"error": str(too_large)}
    reply = await gw.client.post("/v1/chat/completions", json={"model": "llama3.1", "messages": messages})
    error = (await reply.json())["error"]
    assert reply.status == 413 and error["type"] == "invalid_request_error" and "1200000" in error["message"]
    gw = await gateway_for(FakeExchange(answer("x")))
    half = base64.b64encode(b"x" * (MAX_IMAGE_BYTES // 2 + 1)).decode()
    reply = await gw.client.post("/api/generate", json={"model": "llama3.1", "prompt": "x", "images": [half, half]})
    assert reply.status == 413 and "the limit is 786432" in (await reply.json())["error"]
    assert not gw.exchange.submitted and gw.count("ollama", "generate", "", 413) == 1


async def test_failed_answers_are_500_and_kafka_refusals_503(gateway_for) -> None:
    gw = await gateway_for(FakeExchange(answer(status="error", error="endpoint down")))
    reply = await gw.client.post("/api/generate", json={"model": "llama3.1", "prompt": "x"})  # streamed: still 500
    assert reply.status == 500 and await reply.json() == {"error": "endpoint down"}
    reply = await gw.client.post("/v1/completions", json={"model": "llama3.1", "prompt": "x"})
    assert reply.status == 500 and (await reply.json())["error"]["type"] == "server_error"
    for refusal in (SubmitError("no ack"), ReplyReaderError("reader down")):
        gw = await gateway_for(FakeExchange(answer("x"), refuse=refusal))
        reply = await gw.client.post("/api/generate", json={"model": "llama3.1", "prompt": "x"})
        assert reply.status == 503 and await reply.json() == {"error": str(refusal)}
        reply = await gw.client.post("/v1/completions", json={"model": "llama3.1", "prompt": "x"})
        assert reply.status == 503 and (await reply.json())["error"]["type"] == "service_unavailable"
        assert gw.count("openai", "completions", "llama3.1", 503) == 1 and not gw.exchange.released


async def test_refusals_before_kafka_in_each_apis_shape(gateway_for) -> None:
    gw = await gateway_for(FakeExchange(answer("x")), AccessSettings((MISTRAL_ONLY,)))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    reply = await gw.client.post("/api/generate", data=b"{nope", headers=auth)
    assert reply.status == 400 and (await reply.json())["error"].startswith("invalid JSON body: ")
    reply = await gw.client.post("/v1/chat/completions", data=b"[" * 100_000, headers=auth)  # too deep to parse
    assert reply.status == 400 and (await reply.json())["error"]["message"].startswith("the body is not valid JSON: ")
    reply = await gw.client.post("/v1/completions", json={"model": "llama3.1", "prompt": "x"}, headers=auth)
    assert reply.status == 403
    reply = await gw.client.post("/api/generate", json={"model": "llama3.1"}, headers=auth)  # the load call too
    assert reply.status == 403
    reply = await gw.client.post("/api/generate", json={"model": "mistral"}, headers=auth)
    assert reply.status == 200 and (await reply.json())["done_reason"] == "load"
    assert not gw.exchange.submitted
    assert gw.count("ollama", "generate", "", 400) == gw.count("openai", "chat.completions", "", 400) == 1
    assert gw.count("openai", "completions", "llama3.1", 403) == gw.count("ollama", "generate", "llama3.1", 403) == 1
    assert gw.count("ollama", "generate", "", 200) == 1
    reply = await gw.client.post("/api/generate", json={"model": "mistral", "prompt": "x", "stream": False},
                                 headers=auth)
    assert reply.status == 200 and gw.exchange.submitted[0].key_name == "team"


# --------------------------------------------------------------------------- the reply index


def test_instance_names_are_unique() -> None:
    assert instance_name("h", 12, "ab") == "gateway-h-12-ab"
    assert instance_name() != instance_name()


def test_sequencer_orders_dedupes_and_completes() -> None:
    seq = ChunkSequencer()
    assert seq.add(1, "b") == []  # waits for 0
    assert seq.add(0, "a") == ["a", "b"]
    assert seq.add(0, "a") == [] and seq.add(1, "b") == []  # repeats
    assert seq.finish("abcd") == "cd"  # the response came before chunk 2
    assert seq.add(2, "c") == []  # too late: already completed from the output


def test_sequencer_hands_over_tool_calls_after_their_chunks_text() -> None:
    seq = ChunkSequencer()
    assert seq.add(1, "", (PARIS,)) == []  # a chunk of tool calls only: no empty text
    assert seq.add(0, "Checking.") == ["Checking.", (PARIS,)]
    assert seq.add(2, "Also", (ROME,)) == ["Also", (ROME,)]
    assert seq.add(1, "", (PARIS,)) == []  # a repeat
    assert seq.finish("Checking.Also!") == "!"


async def test_tokens_with_tool_calls_reach_the_streaming_waiter() -> None:
    codec = Codec.from_directory()
    kafka = KafkaSettings()
    index = ReplyIndex()
    reader = ReplyReader(kafka, "gateway-me", index, codec)
    waiter = index.expect("r1", stream=True)
    mine = [(REPLY_HEADER, b"gateway-me")]
    token = InferenceToken("r1", "llama3.1", "s1", 0, "", tool_calls=(PARIS,))
    reader.route(kafka.tokens_topic, mine, encode_token(codec, token))
    reader.route(kafka.responses_topic, mine, encode_response(codec, response("r1", output="", tool_calls=(PARIS,))))
    assert waiter.events.get_nowait() == (PARIS,)
    assert waiter.events.get_nowait().tool_calls == (PARIS,)  # type: ignore[union-attr]


def test_sequencer_sends_nothing_more_when_the_output_differs() -> None:
    seq = ChunkSequencer()
    seq.add(0, "xy")
    assert seq.finish("abc") == ""


async def test_index_routes_tokens_and_responses_to_their_waiters() -> None:
    index = ReplyIndex()
    streamed = index.expect("s", stream=True)
    plain = index.expect("p", stream=False)
    with pytest.raises(ValueError):
        index.expect("s", stream=True)
    assert index.on_token(InferenceToken("s", "llama3.1", "s1", 0, "hel"))
    assert not index.on_token(InferenceToken("p", "llama3.1", "s1", 0, "x"))  # not a streaming waiter
    assert not index.on_token(InferenceToken("other", "llama3.1", "s1", 0, "x"))
    assert index.on_response(response("s", output="hello"))
    assert [streamed.events.get_nowait() for _ in range(2)] == ["hel", "lo"]
    assert streamed.events.get_nowait().id == "s"  # type: ignore[union-attr]
    assert index.on_response(response("p"))
    assert plain.done.result().id == "p"
    assert not index.on_response(response("p"))  # a duplicate answer finds nobody
    assert len(index) == 0 and index.delivered == 3 and index.unclaimed == 2


async def test_index_fails_every_waiter_when_the_reader_stops() -> None:
    index = ReplyIndex()
    plain, streamed = index.expect("p", False), index.expect("s", True)
    index.fail_all(RuntimeError("gone"))
    with pytest.raises(RuntimeError):
        plain.done.result()
    assert isinstance(streamed.events.get_nowait(), RuntimeError)
    assert len(index) == 0


async def test_forgotten_waiters_get_nothing() -> None:
    index = ReplyIndex()
    waiter = index.expect("late", False)
    index.forget("late")
    assert not index.on_response(response("late"))
    assert not waiter.done.done()


async def test_reader_decodes_only_records_addressed_to_it() -> None:
    codec = Codec.from_directory()
    kafka = KafkaSettings()
    index = ReplyIndex()
    reader = ReplyReader(kafka, "gateway-me", index, codec)
    waiter = index.expect("r1", stream=True)
    mine = [(REPLY_HEADER, b"gateway-me")]
    reader.route(kafka.responses_topic, [(REPLY_HEADER, b"gateway-other")], b"not even avro")
    reader.route(kafka.responses_topic, [], b"not even avro")
    reader.route(kafka.tokens_topic, mine, encode_token(codec, InferenceToken("r1", "llama3.1", "s1", 0, "hi")))
    reader.route(kafka.responses_topic, mine, b"broken")  # addressed to us but undecodable: logged, skipped
    reader.route(kafka.responses_topic, mine, encode_response(codec, response("r1", output="hi!")))
    assert (reader.skipped, reader.mine) == (2, 3)
    assert [waiter.events.get_nowait() for _ in range(2)] == ["hi", "!"]
    assert waiter.done.result().output == "hi!"


def test_unit_tests_stay_fast() -> None:
    """The decisions are cheap: a thousand sequencer steps take well under a second."""
    started = datetime.now()
    seq = ChunkSequencer()
    for i in range(1000):
        seq.add(i, "x")
    assert seq.finish("x" * 1000) == ""
    assert datetime.now() - started < timedelta(seconds=1)
