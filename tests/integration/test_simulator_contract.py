"""The simulator is held to the real Ollama: the same calls, answers of the same shape.

Every call below goes to the real Ollama (0.17.4 with SmolLM2-135M, see localdev/ollama.py)
and to Nexus's simulator; the *shape* of each answer (status, field names, JSON types,
the streaming framing, error bodies) must be the same. Values differ (one is a model, the
other says ``[simulated ...]``), so only shapes are compared, except for refusals: those
are Ollama's own words and the simulator must say them word for word. When Ollama changes
its API, this test names the field, and the simulator follows.

The conversation fields (roles, images, tool turns, ``format``, ``tools``, options,
``keep_alive``) are compared the same way. SmolLM2 has no tool support, so the real Ollama
refuses ``tools`` with a 400; the simulator serves the same model name with ``--no-tools``
and must refuse identically. A tool-call *answer* cannot come from this model: its shape is
pinned to Ollama 0.17.4's ``api.ToolCall`` instead (see TOOL_CALL_SHAPE).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest

from tests.integration.support import start_simulator

REAL_MODEL = "smollm2:135m"
SIM_MODEL = "llama3.1"
FEW = {"num_predict": 4, "temperature": 0, "seed": 7}
# Constrained decoding must be allowed to finish the JSON; the cap only bounds a runaway.
ENOUGH = {"num_predict": 96, "temperature": 0, "seed": 7}
# A 1x1 transparent PNG: SmolLM2 has no vision, and Ollama 0.17.4 takes the image anyway.
PIXEL = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
        "0000000d49444154789c6360000000000500010d0a2db40000000049454e44ae426082"
    )
).decode()
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
            "required": ["city"],
        },
    },
}
CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
]
TOOL_TURNS = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_name": "get_weather", "content": "sunny, 21 C"},
]
# A structured-output schema as pydantic writes one (a $defs reference, required fields).
CITY_SCHEMA = {
    "$defs": {
        "City": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 12}},
            "required": ["name"],
        }
    },
    "type": "object",
    "properties": {"city": {"$ref": "#/$defs/City"}, "big": {"type": "boolean"}},
    "required": ["city", "big"],
}
YES_NO_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
# api.ToolCall of Ollama 0.17.4 (api/types.go), arguments aside (an object, checked against the tool's
# parameters): {"id", "function": {"index", "name", "arguments"}}; the id is "call_" and 8 [a-z0-9]
# (server/routes.go toolCallId).
TOOL_CALL_SHAPE = {"id": "string", "function": {"index": "number", "name": "string"}}


@pytest.fixture(scope="module")
def sim(logs_dir: Any) -> Iterator[str]:
    role = start_simulator(logs_dir, ["--ttft-ms", "0", "--tokens-per-s", "0",
                                      "--models", f"{SIM_MODEL},{REAL_MODEL}", "--no-tools", REAL_MODEL])
    try:
        yield role.url
    finally:
        role.stop()


def shape(value: Any) -> Any:
    """The structure of a JSON value: keys and types, not values."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in sorted(value.items())}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if value is None:
        return "null"
    return "string"


def _call(base: str, method: str, path: str, body: Any, model: str) -> tuple[int, list[Any]]:
    """Status and the JSON objects of the answer (one, or one per NDJSON line)."""
    if isinstance(body, dict) and "model" in body:
        body = {**body, "model": model}
    content = body if isinstance(body, str) else (json.dumps(body) if body is not None else None)
    with httpx.Client(timeout=300) as http:
        response = http.request(method, f"{base}{path}", content=content,
                                headers={"content-type": "application/json"} if content else {})
    lines = [line for line in response.text.splitlines() if line.strip()]
    if response.headers.get("content-type", "").startswith("application/x-ndjson"):
        return response.status_code, [json.loads(line) for line in lines]
    return response.status_code, [response.json()] if lines else []


def _chat(messages: list[dict[str, Any]], *, stream: bool = False, **fields: Any) -> dict[str, Any]:
    return {"model": "m", "stream": stream, "options": FEW, "messages": messages, **fields}


def _assert_same_shapes(name: str, real: list[Any], simulated: list[Any]) -> None:
    """One object each, or streams with chunks of one shape, then the final chunk with statistics."""
    if len(real) > 1 or name.endswith("streamed"):
        assert real[-1]["done"] is True and simulated[-1]["done"] is True
        assert shape(simulated[0]) == shape(real[0]), f"{name}: first chunk"
        assert shape(simulated[-1]) == shape(real[-1]), f"{name}: final chunk"
        assert all(not chunk["done"] for chunk in simulated[:-1])
    else:
        assert len(simulated) == len(real) == 1
        assert shape(simulated[0]) == shape(real[0]), f"{name}: {simulated[0]} vs Ollama's {real[0]}"


CALLS = {
    "version": ("GET", "/api/version", None),
    "tags": ("GET", "/api/tags", None),
    "generate": ("POST", "/api/generate", {"model": "m", "prompt": "Say hi", "stream": False, "options": FEW}),
    "generate streamed": ("POST", "/api/generate", {"model": "m", "prompt": "Say hi", "options": FEW}),
    "chat": ("POST", "/api/chat", {"model": "m", "stream": False, "options": FEW,
                                    "messages": [{"role": "user", "content": "Say hi"}]}),
    "chat streamed": ("POST", "/api/chat", {"model": "m", "options": FEW,
                                            "messages": [{"role": "user", "content": "Say hi"}]}),
    "unknown model": ("POST", "/api/generate", {"model": "m", "prompt": "x", "stream": False}),
    "malformed body": ("POST", "/api/generate", "{not json"),
    "missing model": ("POST", "/api/generate", {"prompt": "x", "stream": False}),
    # The conversation fields.
    "chat multi-turn": ("POST", "/api/chat", _chat(CONVERSATION)),
    "chat multi-turn streamed": ("POST", "/api/chat", _chat(CONVERSATION, stream=True)),
    "chat with tool turns in the history": ("POST", "/api/chat", _chat(TOOL_TURNS)),
    "chat with an image": ("POST", "/api/chat", _chat(
        [{"role": "user", "content": "What is this?", "images": [PIXEL]}])),
    "chat with options and keep_alive": ("POST", "/api/chat", _chat(
        [{"role": "user", "content": "Count to three"}], keep_alive="1m",
        options={**FEW, "stop": ["\n\n"], "top_p": 0.9, "top_k": 20, "num_ctx": 2048, "repeat_penalty": 1.1})),
    "chat format json": ("POST", "/api/chat", _chat(CONVERSATION, format="json")),
    "chat format json streamed": ("POST", "/api/chat", _chat(CONVERSATION, stream=True, format="json")),
    "chat with no tools offered": ("POST", "/api/chat", _chat(CONVERSATION, tools=[])),
    "generate with system and an image": ("POST", "/api/generate", {
        "model": "m", "prompt": "Describe it", "system": "Be brief.", "images": [PIXEL],
        "stream": False, "options": FEW}),
    "generate format json": ("POST", "/api/generate", {
        "model": "m", "prompt": "A JSON object please", "format": "json", "stream": False, "options": FEW}),
    "generate with keep_alive 0 and no prompt": ("POST", "/api/generate", {"model": "m", "keep_alive": 0}),
    "chat with keep_alive 0 and no messages": ("POST", "/api/chat", {"model": "m", "keep_alive": "0s"}),
    "tool call arguments as text": ("POST", "/api/chat", _chat([
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
        {"role": "user", "content": "hi"}])),
}


@pytest.mark.parametrize("name", CALLS)
def test_the_simulator_answers_in_the_shape_of_the_real_ollama(name: str, real_ollama: str, sim: str) -> None:
    method, path, body = CALLS[name]
    unknown = name == "unknown model"
    real_status, real = _call(real_ollama, method, path, body, "no-such-model" if unknown else REAL_MODEL)
    sim_status, simulated = _call(sim, method, path, body, "no-such-model" if unknown else SIM_MODEL)
    assert sim_status == real_status, f"{name}: status {sim_status}, Ollama says {real_status}: {real}"
    _assert_same_shapes(name, real, simulated)


# Refusals: Ollama's status and words, which Nexus passes on to its clients. Both servers get the
# real model's name (the simulator serves it with --no-tools), so even the names in the text match.
REFUSALS = {
    "tools to a model without tool support": _chat(CONVERSATION, tools=[WEATHER_TOOL]),
    "tools to a model without tool support, streamed": _chat(CONVERSATION, stream=True, tools=[WEATHER_TOOL]),
    "tools with no messages (a load call)": {"model": "m", "messages": [], "tools": [WEATHER_TOOL]},
    "format neither json nor a schema": _chat(CONVERSATION, format="xml"),
    "format JSON in capitals": _chat(CONVERSATION, stream=True, format="JSON"),
    "format a number": _chat(CONVERSATION, format=5),
    "format a schema of an unknown type": _chat(CONVERSATION, format={"type": "frob"}),
    "format a schema with an unknown nested type": _chat(
        CONVERSATION, format={"type": "object", "properties": {"a": {"type": "frob"}}}),
    "format a schema the converter cannot read": _chat(CONVERSATION, format={"description": "x"}),
    "format a schema with a dangling $ref": _chat(CONVERSATION, format={"$ref": "#/$defs/Nope"}),
    "an option of the wrong type": _chat(CONVERSATION, options={"num_predict": "four"}),
    "stop as a string": _chat(CONVERSATION, options={"stop": "\n"}),
    "keep_alive without a unit": _chat(CONVERSATION, keep_alive="5"),
    "keep_alive a word": _chat(CONVERSATION, keep_alive="forever"),
    "keep_alive a boolean": _chat(CONVERSATION, keep_alive=True),
    "think on a model that does not think": _chat(CONVERSATION, think=True),
    "an image that is not base64": _chat([{"role": "user", "content": "hi", "images": ["!!!"]}]),
    "images not a list": _chat([{"role": "user", "content": "hi", "images": PIXEL}]),
    "content not a string": _chat([{"role": "user", "content": 5}]),
    "role not a string": _chat([{"role": 5, "content": "hi"}]),
    "tools not a list": _chat(CONVERSATION, tools={"a": 1}),
    "tool parameters as text": _chat(CONVERSATION, tools=[
        {"type": "function", "function": {"name": "x", "parameters": "{}"}}]),
    "options not an object": _chat(CONVERSATION, options="fast"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_the_simulator_refuses_in_the_words_of_the_real_ollama(name: str, real_ollama: str, sim: str) -> None:
    real_status, real = _call(real_ollama, "POST", "/api/chat", REFUSALS[name], REAL_MODEL)
    sim_status, simulated = _call(sim, "POST", "/api/chat", REFUSALS[name], REAL_MODEL)
    assert real_status >= 400, f"{name}: Ollama took it: {real}"
    assert (sim_status, simulated) == (real_status, real), name


def test_tools_are_refused_with_a_400_naming_the_model(real_ollama: str, sim: str) -> None:
    """What Nexus maps to error_kind bad_request: the status and text a client will see."""
    for base in (real_ollama, sim):
        status, answer = _call(base, "POST", "/api/chat", _chat(CONVERSATION, tools=[WEATHER_TOOL]), REAL_MODEL)
        assert (status, answer) == (400, [{"error": f"registry.ollama.ai/library/{REAL_MODEL} does not support tools"}])


@pytest.mark.parametrize(
    ("schema", "streamed"),
    [(CITY_SCHEMA, False), (YES_NO_SCHEMA, True)],  # each generation takes seconds on the real model
    ids=["with $defs", "a boolean, streamed"],
)
def test_a_schema_format_gives_json_that_validates_on_both(
    schema: dict[str, Any], streamed: bool, real_ollama: str, sim: str
) -> None:
    """Ollama enforces a schema by constrained decoding, for any model; the simulator answers an instance."""
    body = {"model": "m", "stream": streamed, "options": ENOUGH, "format": schema,
            "messages": [{"role": "user", "content": "Answer in JSON."}]}
    answers = {}
    for name, base, model in (("Ollama", real_ollama, REAL_MODEL), ("simulator", sim, SIM_MODEL)):
        status, chunks = _call(base, "POST", "/api/chat", body, model)
        assert status == 200, f"{name}: {chunks}"
        assert chunks[-1]["done_reason"] == "stop", f"{name} was cut short: {chunks}"
        content = "".join(chunk["message"]["content"] for chunk in chunks)
        jsonschema.validate(json.loads(content), schema)
        answers[name] = chunks
    _assert_same_shapes("schema" + (" streamed" if streamed else ""), answers["Ollama"], answers["simulator"])


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_a_tool_call_answer_is_shaped_like_ollamas(streamed: bool, real_ollama: str, sim: str) -> None:
    """Ollama's chat answer, with message.tool_calls as api.ToolCall and content "".

    The real model cannot call tools, so its plain chat answer gives every other field, and the
    tool calls are held to TOOL_CALL_SHAPE. Streamed, each call comes whole in a chunk of its own
    before the final chunk, as Ollama's tool parser sends them.
    """
    _, real = _call(real_ollama, "POST", "/api/chat", _chat(CONVERSATION, stream=streamed), REAL_MODEL)
    status, simulated = _call(sim, "POST", "/api/chat", _chat(CONVERSATION, stream=streamed, tools=[WEATHER_TOOL]),
                              SIM_MODEL)
    assert status == 200
    with_calls = [chunk for chunk in simulated if "tool_calls" in chunk["message"]]
    assert len(with_calls) == 1 and with_calls[0]["done"] is (not streamed)
    message = with_calls[0]["message"]
    [call] = message["tool_calls"]
    arguments = call["function"].pop("arguments")
    assert shape(call) == TOOL_CALL_SHAPE and call["function"]["name"] == "get_weather"
    jsonschema.validate(arguments, WEATHER_TOOL["function"]["parameters"])
    assert message["content"] == "" and call["id"].startswith("call_") and len(call["id"]) == len("call_") + 8
    assert simulated[-1]["done_reason"] == "stop"
    without_calls = [{**chunk, "message": {k: v for k, v in chunk["message"].items() if k != "tool_calls"}}
                     for chunk in simulated]
    _assert_same_shapes("tool call" + (" streamed" if streamed else ""), real, without_calls)
