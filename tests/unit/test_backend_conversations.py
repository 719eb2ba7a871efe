"""Conversations through both backends: the bodies built for Ollama's ``/api/chat`` and OpenAI's
``/v1/chat/completions`` (roles, images, tool calls and results, tools, format, every option), tool
calls read back whole and streamed, and a backend's 400 as a bad request.

Against an in-process aiohttp server that records each body and answers as the test scripts it,
as tests/unit/test_backends.py and test_openai_backend.py do.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from schemas import InferenceOptions, InferenceRequest, Message, ModelContext, Tool, ToolCall
from streams.backends import BackendError, OllamaBackend, OpenAIBackend
from streams.backends.ollama import new_session, ollama_options
from streams.backends.ollama import request_body as ollama_body
from streams.backends.openai import ToolCallJoiner, chat_messages, image_type, openai_options
from streams.backends.openai import request_body as openai_body
from streams.backends.wire import keep_alive_value

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 8
JPEG = b"\xff\xd8\xff\xe0" + b"\x01" * 8
WEATHER = Tool(
    "get_weather", "The weather in a city",
    '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}',
)
SCHEMA = '{"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}'
EVERY_OPTION = InferenceOptions(
    temperature=0.0, max_tokens=64, seed=7, top_p=0.9, top_k=40, min_p=0.05, stop=("\n\n", "END"), num_ctx=4096,
    repeat_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.25, extra='{"mirostat": 2, "temperature": 9}',
)


def conversation(**changes: Any) -> InferenceRequest:
    """A tool-using conversation in Ollama's words: the tool result names its function, no ids."""
    messages = (
        Message("system", "You answer about weather."),
        Message("user", "What is in this picture, and the weather in Paris?", images=(PNG, JPEG)),
        Message("assistant", "", tool_calls=(ToolCall("get_weather", '{"city": "Paris"}'),)),
        Message("tool", '{"celsius": 21}', tool_name="get_weather"),
        Message("user", "And in Lyon?"),
    )
    fields: dict[str, Any] = dict(
        messages=messages, tools=(WEATHER,), format=SCHEMA, keep_alive="10m", options=EVERY_OPTION,
    )
    fields.update(changes)
    return InferenceRequest("r1", "m", "And in Lyon?", ModelContext("s1"), **fields)


# ----------------------------------------------------------------------------- a scripted server


@dataclass
class Scripted:
    """What the server saw (path, body) and what it answers next: ``whole`` (a JSON body, with
    ``status``) for a call that does not stream, ``lines`` (raw bytes) for one that does."""

    url: str = ""
    seen: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    status: int = 200
    whole: dict[str, Any] = field(default_factory=dict)
    lines: list[bytes] = field(default_factory=list)

    @property
    def body(self) -> dict[str, Any]:
        return self.seen[-1][1]

    @property
    def path(self) -> str:
        return self.seen[-1][0]


@pytest.fixture()
async def server() -> AsyncIterator[Scripted]:
    scripted = Scripted()

    async def answer(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        scripted.seen.append((request.path, body))
        if scripted.status != 200 or not body.get("stream"):
            return web.json_response(scripted.whole, status=scripted.status)
        response = web.StreamResponse()
        await response.prepare(request)
        for line in scripted.lines:
            await response.write(line)
        return response

    app = web.Application()
    for path in ("/api/chat", "/api/generate", "/v1/chat/completions"):
        app.router.add_post(path, answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    scripted.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    yield scripted
    await runner.cleanup()


class Chunks:
    """An ``on_chunk`` that keeps what it was told."""

    def __init__(self) -> None:
        self.told: list[tuple[str, tuple[ToolCall, ...]]] = []

    async def __call__(self, text: str, tool_calls: tuple[ToolCall, ...]) -> None:
        self.told.append((text, tool_calls))


def ndjson(*objects: dict[str, Any]) -> list[bytes]:
    return [json.dumps(o).encode() + b"\n" for o in objects]


def sse(*events: dict[str, Any] | str) -> list[bytes]:
    return [b"data: " + (e.encode() if isinstance(e, str) else json.dumps(e).encode()) + b"\n\n" for e in events]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ----------------------------------------------------------------------------- Ollama: the bodies


def test_a_conversation_goes_to_api_chat_with_its_roles_images_tools_format_and_options() -> None:
    path, body = ollama_body("llama3.1", conversation(), "Session s1.", stream=True)
    assert path == "/api/chat"
    assert body["model"] == "llama3.1" and body["stream"] is True and "prompt" not in body and "system" not in body
    assert body["messages"] == [
        {"role": "system", "content": "Session s1."},  # Nexus's system prompt first
        {"role": "system", "content": "You answer about weather."},
        {"role": "user", "content": "What is in this picture, and the weather in Paris?",
         "images": [b64(PNG), b64(JPEG)]},
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": '{"celsius": 21}', "tool_name": "get_weather"},
        {"role": "user", "content": "And in Lyon?"},
    ]
    assert body["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city", "parameters": json.loads(WEATHER.parameters),
    }}]
    assert body["format"] == json.loads(SCHEMA) and body["keep_alive"] == "10m"
    assert body["options"] == {
        "mirostat": 2, "temperature": 0.0, "num_predict": 64, "seed": 7, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
        "stop": ["\n\n", "END"], "num_ctx": 4096, "repeat_penalty": 1.1, "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
    }, "extra passes through; the named fields win over it"


def test_no_system_message_without_a_system_prompt_and_tool_choice_none_offers_no_tools() -> None:
    _, body = ollama_body("m", conversation(tool_choice="none", format="json", keep_alive=None), "", stream=False)
    assert body["messages"][0] == {"role": "system", "content": "You answer about weather."}
    assert "tools" not in body and body["format"] == "json" and "keep_alive" not in body
    _, body = ollama_body("m", conversation(tool_choice="required"), "", stream=False)
    assert len(body["tools"]) == 1, "Ollama cannot force a call: the tools are offered"
    ids = conversation(messages=(
        Message("assistant", "", tool_calls=(ToolCall("f", "{}", id="call_9"),)),
        Message("tool", "ok", tool_name="f", tool_call_id="call_9"),
    ))
    _, body = ollama_body("m", ids, "", stream=False)
    assert body["messages"][0]["tool_calls"] == [{"id": "call_9", "function": {"name": "f", "arguments": {}}}]
    assert body["messages"][1] == {"role": "tool", "content": "ok", "tool_name": "f", "tool_call_id": "call_9"}


def test_a_prompt_goes_to_api_generate_with_format_options_and_keep_alive() -> None:
    request = InferenceRequest("r", "m", "Name a colour.", ModelContext("s"), EVERY_OPTION, format="json",
                               keep_alive="-1")
    path, body = ollama_body("m", request, "sys", stream=False)
    assert path == "/api/generate"
    assert (body["prompt"], body["system"], body["format"], body["keep_alive"]) == ("Name a colour.", "sys", "json", -1)
    assert body["options"]["stop"] == ["\n\n", "END"] and body["options"]["num_ctx"] == 4096
    plain = InferenceRequest("r", "m", "hi", ModelContext("s"), InferenceOptions(temperature=0.5))
    assert ollama_body("m", plain, "", stream=True) == ("/api/generate", {
        "model": "m", "prompt": "hi", "system": "", "stream": True, "options": {"temperature": 0.5},
    }), "a plain prompt's body is what it always was"
    assert ollama_options(InferenceOptions()) == {}


@pytest.mark.parametrize(
    "text, value", [("5m", "5m"), ("0", 0), ("-1", -1), ("300", 300), ("1.5", 1.5), ("1h30m", "1h30m")]
)
def test_keep_alive_numbers_go_as_numbers_and_durations_as_text(text: str, value: str | int | float) -> None:
    assert keep_alive_value(text) == value and type(keep_alive_value(text)) is type(value)


# ----------------------------------------------------------------------------- Ollama: the answers


async def test_ollama_tool_calls_are_read_whole(server: Scripted) -> None:
    server.whole = {
        "model": "m", "done": True, "done_reason": "stop", "prompt_eval_count": 30, "eval_count": 12,
        "message": {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"index": 0, "name": "get_weather", "arguments": {"city": "Lyon"}}},
            {"id": "call_b", "function": {"name": "get_weather", "arguments": {"city": "Nice"}}},
            {"function": {"arguments": {}}},  # names no function: left out
        ]},
    }
    async with new_session() as http:
        answer = await OllamaBackend(http).generate(server.url, "m", conversation(), "", 5.0)
    assert server.path == "/api/chat" and server.body["stream"] is False
    assert (answer.text, answer.prompt_tokens, answer.completion_tokens, answer.done_reason) == ("", 30, 12, "stop")
    assert answer.tool_calls == (
        ToolCall("get_weather", '{"city": "Lyon"}'), ToolCall("get_weather", '{"city": "Nice"}', "call_b"),
    )


async def test_ollama_text_and_tool_calls_are_read_streamed(server: Scripted) -> None:
    call = {"function": {"name": "get_weather", "arguments": {"city": "Lyon"}}}
    server.lines = ndjson(
        {"message": {"role": "assistant", "content": "Let me"}, "done": False},
        {"message": {"role": "assistant", "content": " check."}, "done": False},
        {"message": {"role": "assistant", "content": "", "tool_calls": [call]}, "done": False},
        {"message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop", "eval_count": 9},
    )
    chunks = Chunks()
    async with new_session() as http:
        answer = await OllamaBackend(http).generate(server.url, "m", conversation(), "", 5.0, chunks)
    lyon = ToolCall("get_weather", '{"city": "Lyon"}')
    assert chunks.told == [("Let me", ()), (" check.", ()), ("", (lyon,))]
    assert (answer.text, answer.tool_calls, answer.completion_tokens) == ("Let me check.", (lyon,), 9)
    assert answer.ttft_s is not None and server.body["stream"] is True


async def test_a_prompt_with_format_is_answered_from_api_generate(server: Scripted) -> None:
    server.whole = {"response": '{"colour": "blue"}', "done": True, "done_reason": "stop"}
    request = InferenceRequest("r", "m", "A colour?", ModelContext("s"), format=SCHEMA)
    async with new_session() as http:
        answer = await OllamaBackend(http).generate(server.url, "m", request, "", 5.0)
    assert server.path == "/api/generate" and server.body["format"] == json.loads(SCHEMA)
    assert (answer.text, answer.tool_calls) == ('{"colour": "blue"}', ())


async def test_ollamas_400_is_a_bad_request_in_its_own_words(server: Scripted) -> None:
    server.status, server.whole = 400, {"error": "registry.ollama.ai/library/smollm2:135m does not support tools"}
    async with new_session() as http:
        with pytest.raises(BackendError) as caught:
            await OllamaBackend(http).generate(server.url, "m", conversation(), "", 5.0)
    error = caught.value
    assert error.bad_request and not error.retryable and not error.busy and not error.missing_model
    assert error.reason == error.client_message == "registry.ollama.ai/library/smollm2:135m does not support tools"
    assert str(error).startswith(f"{server.url} answered 400: ")


@pytest.mark.parametrize("said", [
    'invalid format: "\\"xml\\""; expected "json" or a valid JSON Schema object',
    "invalid JSON schema in format",
    'option "num_predict" must be of type integer',
])
async def test_ollamas_500_refusing_the_request_itself_is_a_bad_request_not_a_server_fault(
    server: Scripted, said: str
) -> None:
    server.status, server.whole = 500, {"error": said}  # what Ollama 0.17.4 answers to these
    async with new_session() as http:
        with pytest.raises(BackendError) as caught:
            await OllamaBackend(http).generate(server.url, "m", conversation(), "", 5.0)
    assert caught.value.bad_request and not caught.value.retryable and caught.value.client_message == said


async def test_ollamas_other_500s_stay_server_faults(server: Scripted) -> None:
    server.status, server.whole = 500, {"error": "llama runner process has terminated"}
    async with new_session() as http:
        with pytest.raises(BackendError) as caught:
            await OllamaBackend(http).generate(server.url, "m", conversation(), "", 5.0)
    assert caught.value.retryable and not caught.value.bad_request


@pytest.mark.parametrize("backend", [OllamaBackend, OpenAIBackend])
@pytest.mark.parametrize(
    "changes, says",
    [
        ({"format": "{not json"}, "format"),
        ({"tools": (Tool("f", parameters="[1]"),)}, "the parameters of tool 'f'"),
        ({"options": InferenceOptions(extra="[]")}, "options.extra"),
    ],
)
async def test_a_request_that_cannot_be_sent_is_a_bad_request_without_a_call(
    server: Scripted, backend: type, changes: dict[str, Any], says: str
) -> None:
    async with new_session() as http:
        with pytest.raises(BackendError) as caught:
            await backend(http).generate(server.url, "m", conversation(**changes), "", 5.0)
    error = caught.value
    assert error.bad_request and not error.retryable and not error.reached
    assert error.client_message.startswith(says) and server.seen == []


# ----------------------------------------------------------------------------- OpenAI: the bodies


def test_a_conversation_goes_to_chat_completions_with_images_tool_ids_tools_and_options() -> None:
    body = openai_body("m", conversation(tool_choice="get_weather"), "Session s1.", stream=True)
    assert body["model"] == "m" and body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [
        {"role": "system", "content": "Session s1."},
        {"role": "system", "content": "You answer about weather."},
        {"role": "user", "content": [
            {"type": "text", "text": "What is in this picture, and the weather in Paris?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(PNG)}"}},
            {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{b64(JPEG)}"}},
        ]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_2_0", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        ]},
        {"role": "tool", "content": '{"celsius": 21}', "tool_call_id": "call_2_0"},  # tied to its call by function
        {"role": "user", "content": "And in Lyon?"},
    ]
    assert body["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city", "parameters": json.loads(WEATHER.parameters),
    }}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "response", "schema": json.loads(SCHEMA)},
    }
    assert (body["temperature"], body["max_tokens"], body["seed"], body["top_p"], body["stop"]) == (
        0.0, 64, 7, 0.9, ["\n\n", "END"])
    assert (body["presence_penalty"], body["frequency_penalty"], body["mirostat"]) == (0.5, 0.25, 2)
    for ollama_only in ("top_k", "min_p", "repeat_penalty", "num_ctx", "keep_alive", "options", "format"):
        assert ollama_only not in body


def test_json_mode_tool_choice_words_and_no_tool_choice_without_tools() -> None:
    body = openai_body("m", conversation(format="json", tool_choice="required"), "", stream=False)
    assert body["response_format"] == {"type": "json_object"} and body["tool_choice"] == "required"
    assert "stream_options" not in body and body["messages"][0]["role"] == "system"
    body = openai_body("m", conversation(tools=(), tool_choice="auto", format=None), "", stream=False)
    assert "tools" not in body and "tool_choice" not in body and "response_format" not in body
    prompt = InferenceRequest("r", "m", "hi", ModelContext("s"), InferenceOptions(temperature=0.5))
    assert openai_body("m", prompt, "", stream=False) == {
        "temperature": 0.5, "model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False,
    }, "a plain prompt's body is what it always was"
    assert openai_options(InferenceOptions()) == {}


def test_tool_results_are_tied_to_their_calls_by_id_or_by_function_in_order() -> None:
    messages = chat_messages((
        Message("user", "Weather in Paris and Lyon, and the time?"),
        Message("assistant", "Checking.", tool_calls=(
            ToolCall("get_weather", '{"city": "Paris"}'), ToolCall("get_time", "{}", id="t1"),
            ToolCall("get_weather", '{"city": "Lyon"}'),
        )),
        Message("tool", "12:00", tool_call_id="t1"),
        Message("tool", "21", tool_name="get_weather"),
        Message("tool", "19", tool_name="get_weather"),
        Message("tool", "orphan", tool_name="nothing"),
    ))
    assert messages[1]["content"] == "Checking."
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["call_1_0", "t1", "call_1_2"]
    assert [m.get("tool_call_id") for m in messages[2:]] == ["t1", "call_1_0", "call_1_2", None]


def test_an_images_media_type_is_read_from_its_first_bytes() -> None:
    assert image_type(PNG) == "image/png" and image_type(JPEG) == "image/jpeg"
    assert image_type(b"GIF89a...") == "image/gif" and image_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert image_type(b"??") == "image/jpeg"


# ----------------------------------------------------------------------------- OpenAI: the answers


async def test_openai_tool_calls_are_read_whole(server: Scripted) -> None:
    server.whole = {
        "id": "c1", "object": "chat.completion",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": None,
                     "tool_calls": [{"id": "call_x", "type": "function",
                                     "function": {"name": "get_weather", "arguments": '{"city":"Lyon"}'}}]}}],
        "usage": {"prompt_tokens": 40, "completion_tokens": 8},
    }
    async with new_session() as http:
        answer = await OpenAIBackend(http).generate(server.url, "m", conversation(), "", 5.0)
    assert server.path == "/v1/chat/completions"
    assert (answer.text, answer.done_reason, answer.prompt_tokens) == ("", "tool_calls", 40)
    assert answer.tool_calls == (ToolCall("get_weather", '{"city":"Lyon"}', "call_x"),)


def _delta(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {"id": "c1", "object": "chat.completion.chunk", "choices": [choice]}


async def test_openai_tool_calls_streamed_in_fragments_are_joined_by_index(server: Scripted) -> None:
    def fragment(index: int, arguments: str, **head: str) -> dict[str, Any]:
        call: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
        if head:
            call.update(id=head["id"], type="function")
            call["function"]["name"] = head["name"]
        return _delta({"tool_calls": [call]})

    server.lines = sse(
        _delta({"role": "assistant", "content": "On it."}),
        fragment(0, "", id="call_a", name="get_weather"),
        fragment(0, '{"city": '),
        fragment(0, '"Lyon"}'),
        fragment(1, '{"city": "Nice"}', id="call_b", name="get_weather"),
        _delta({}, "tool_calls"),
        {"id": "c1", "object": "chat.completion.chunk", "choices": [],
         "usage": {"prompt_tokens": 5, "completion_tokens": 7}},
        "[DONE]",
    )
    chunks = Chunks()
    async with new_session() as http:
        answer = await OpenAIBackend(http).generate(server.url, "m", conversation(), "", 5.0, chunks)
    lyon = ToolCall("get_weather", '{"city": "Lyon"}', "call_a")
    nice = ToolCall("get_weather", '{"city": "Nice"}', "call_b")
    assert chunks.told == [("On it.", ()), ("", (lyon,)), ("", (nice,))], "each call once whole, in order"
    assert (answer.text, answer.tool_calls, answer.done_reason) == ("On it.", (lyon, nice), "tool_calls")
    assert (answer.prompt_tokens, answer.completion_tokens) == (5, 7)


async def test_openai_calls_a_server_leaves_open_at_done_are_given_at_the_end(server: Scripted) -> None:
    server.lines = sse(
        _delta({"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f", "arguments": '{"a": 1}'}}]}),
        "[DONE]",
    )
    chunks = Chunks()
    async with new_session() as http:
        answer = await OpenAIBackend(http).generate(server.url, "m", conversation(), "", 5.0, chunks)
    call = ToolCall("f", '{"a": 1}', "c")
    assert chunks.told == [("", (call,))] and answer.tool_calls == (call,)


def test_the_joiner_without_indexes_starts_a_call_at_each_id_and_leaves_out_nameless_ones() -> None:
    joiner = ToolCallJoiner()
    assert joiner.add([{"id": "a", "function": {"name": "f", "arguments": "{"}}]) == ()
    assert joiner.add([{"function": {"arguments": "}"}}]) == ()
    assert joiner.add([{"id": "b", "function": {"name": "g"}}]) == (ToolCall("f", "{}", "a"),)
    assert joiner.add([{"index": 7, "function": {"arguments": "{}"}}]) == (ToolCall("g", "{}", "b"),)
    assert joiner.finish() == () and joiner.add(None) == ()


async def test_openais_400_is_a_bad_request_in_its_own_words(server: Scripted) -> None:
    server.status = 400
    server.whole = {
        "error": {"message": "\"auto\" tool choice requires --enable-auto-tool-choice", "type": "BadRequestError"},
    }
    async with new_session() as http:
        with pytest.raises(BackendError) as caught:
            await OpenAIBackend(http).generate(server.url, "m", conversation(), "", 5.0)
    error = caught.value
    assert error.bad_request and not error.retryable and not error.missing_model
    assert error.client_message == "\"auto\" tool choice requires --enable-auto-tool-choice"
