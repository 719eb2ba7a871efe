"""The simulator's conversation fields: schemas, formats, tools, options, keep_alive, recorded bodies.

Pure parts first (each rule in microseconds), then the HTTP answers of a live in-process server.
The texts of refusals are Ollama 0.17.4's own; tests/integration/test_simulator_contract.py holds
them to the real server.
"""

from __future__ import annotations

import argparse
import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from localdev.simulator.cli import add_arguments, config_from_args
from localdev.simulator.conversation import (
    Answer,
    AnswerFormat,
    Options,
    chat_answer,
    conversation_reply,
    decode_image,
    generate_answer,
    go_duration_seconds,
    keep_alive_seconds,
    messages,
    parse_format,
    parse_options,
    text_answer,
    tool_call,
    tools,
)
from localdev.simulator.model import (
    ApiError,
    SimulatorConfig,
    SimulatorConfigError,
    SimulatorStats,
    qualified_model_name,
    tools_unsupported_error,
)
from localdev.simulator.schema import minimal_instance, schema_problem
from localdev.simulator.server import RunningSimulator, start_server

WEATHER = {
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
PIXEL = base64.b64encode(b"\x89PNG\r\n\x1a\n tiny").decode()


def refusal(call: Any, *args: Any) -> tuple[int, str]:
    with pytest.raises(ApiError) as caught:
        call(*args)
    return caught.value.status, caught.value.message


# =========================================================================== schema.py


@pytest.mark.parametrize(
    ("schema", "instance"),
    [
        ({}, {}),
        ({"type": "object"}, {}),
        ({"type": "string"}, "simulated"),
        ({"type": "string", "maxLength": 3}, "sim"),
        ({"type": "string", "minLength": 12}, "simulatedxxx"),
        ({"type": "string", "format": "date-time"}, "2000-01-01T00:00:00Z"),
        ({"type": "string", "format": "uuid"}, "00000000-0000-0000-0000-000000000000"),
        ({"type": "integer"}, 0),
        ({"type": "integer", "minimum": 3}, 3),
        ({"type": "integer", "exclusiveMinimum": 3}, 4),
        ({"type": "integer", "maximum": -2.5}, -3),
        ({"type": "integer", "minimum": 5, "multipleOf": 4}, 8),
        ({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}, 0.5),
        ({"type": "number", "minimum": -1, "maximum": 1}, 0),
        ({"type": "boolean"}, False),
        ({"type": "null"}, None),
        ({"type": ["null", "string"]}, "simulated"),
        ({"enum": ["b", "a"]}, "b"),
        ({"const": 7}, 7),
        ({"anyOf": [{"type": "integer"}, {"type": "null"}]}, 0),
        ({"type": "array", "items": {"type": "boolean"}}, [False]),
        ({"type": "array", "items": {"type": "integer"}, "minItems": 2}, [0, 0]),
        ({"type": "array", "items": {"type": "integer"}, "maxItems": 0}, []),
        ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]}, [0, "simulated"]),
        (
            {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}, "required": ["a"]},
            {"a": "simulated", "b": 0},  # every property, required first (the grammar's order)
        ),
        (
            {"$defs": {"P": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}},
             "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "required": ["p"]},
            {"p": {"x": 0}},
        ),
        (
            {"allOf": [{"properties": {"a": {"type": "string"}}}, {"properties": {"b": {"type": "null"}}}]},
            {"a": "simulated", "b": None},
        ),
    ],
)
def test_minimal_instance_is_small_and_valid(schema: dict[str, Any], instance: Any) -> None:
    assert schema_problem(schema) is None
    assert minimal_instance(schema) == instance
    jsonschema.validate(instance, schema)


def test_minimal_instance_of_a_recursive_schema_ends() -> None:
    """A tree node refers to itself: optional children are left out deep down, so it ends."""
    tree = {
        "$defs": {"Node": {"type": "object", "properties": {
            "name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}},
            "required": ["name"]}},
        "$ref": "#/$defs/Node",
    }
    assert schema_problem(tree) is None
    instance = minimal_instance(tree)
    jsonschema.validate(instance, tree)
    assert instance["children"][0]["name"] == "simulated"


def test_pydantic_schemas_are_answered() -> None:
    """What LangChain's with_structured_output and the ollama client send: pydantic's own schemas."""
    pydantic = pytest.importorskip("pydantic")

    class Address(pydantic.BaseModel):
        street: str
        number: int | None = None

    class Person(pydantic.BaseModel):
        name: str
        age: int = pydantic.Field(ge=18)
        tags: list[str]
        address: Address
        kind: str = pydantic.Field(json_schema_extra={"enum": ["a", "b"]})

    schema = Person.model_json_schema()
    assert schema_problem(schema) is None
    person = Person.model_validate(minimal_instance(schema))
    assert person.age == 18 and person.address.street == "simulated" and person.kind == "a"


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "frob"},
        {"type": "object", "properties": {"a": {"type": "frob"}}},
        {"description": "no type, nothing the converter recognises"},
        {"$ref": "#/$defs/Nope"},
        {"type": "object", "properties": 5},
        {"type": "object", "properties": {"a": True}},
        {"anyOf": "x"},
        {"type": "string", "format": 5},
    ],
)
def test_schemas_ollama_cannot_turn_into_a_grammar_are_refused(schema: dict[str, Any]) -> None:
    assert schema_problem(schema) is not None


# Random schemas of the kinds clients send; every instance must validate against its schema.
_leaves = st.one_of(
    st.just({"type": "string"}),
    st.integers(0, 5).flatmap(lambda n: st.just({"type": "string", "minLength": n, "maxLength": n + 4})),
    st.integers(-5, 5).map(lambda n: {"type": "integer", "minimum": n}),
    st.integers(-5, 5).map(lambda n: {"type": "integer", "exclusiveMaximum": n}),
    st.floats(-5, 5, allow_nan=False).map(lambda x: {"type": "number", "exclusiveMinimum": x}),
    st.integers(1, 4).map(lambda n: {"type": "integer", "multipleOf": n, "minimum": 1}),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(st.text(max_size=3), min_size=1, max_size=3).map(lambda v: {"enum": v}),
    st.integers().map(lambda v: {"const": v}),
    st.just({"type": ["integer", "null"]}),
)


def _extend(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    objects = st.dictionaries(st.text("abcxyz", min_size=1, max_size=4), children, max_size=4).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)) if props else st.nothing(), unique=True).map(
            lambda required: {"type": "object", "properties": props, "required": required,
                              "additionalProperties": False}
        )
    )
    arrays = st.tuples(children, st.integers(0, 3)).map(
        lambda pair: {"type": "array", "items": pair[0], "minItems": pair[1]}
    )
    unions = st.lists(children, min_size=1, max_size=3).map(lambda alts: {"anyOf": alts})
    return st.one_of(objects, arrays, unions)


@settings(max_examples=300, deadline=None)
@given(st.recursive(_leaves, _extend, max_leaves=12))
def test_every_accepted_schema_gets_a_valid_instance(schema: dict[str, Any]) -> None:
    assert schema_problem(schema) is None
    jsonschema.validate(minimal_instance(schema), schema)


# =========================================================================== conversation.py


def test_format_is_read_like_ollama() -> None:
    assert parse_format(None) is None and parse_format("") is None
    assert parse_format("json") == AnswerFormat()
    assert parse_format({"type": "string"}) == AnswerFormat(schema={"type": "string"})
    assert refusal(parse_format, "xml") == (
        500, 'invalid format: "\\"xml\\""; expected "json" or a valid JSON Schema object')
    assert refusal(parse_format, 5) == (500, 'invalid format: "5"; expected "json" or a valid JSON Schema object')
    assert refusal(parse_format, {"type": "frob"}) == (500, "invalid JSON schema in format")


def test_options_are_checked_like_api_options_from_map() -> None:
    assert parse_options({}) == Options()
    assert parse_options({"num_predict": 3.7, "stop": ["\n"], "seed": 1, "temperature": 0, "bogus": [1]}) == (
        Options(num_predict=3, stop=("\n",)))
    assert parse_options({"num_predict": None}) == Options()
    assert refusal(parse_options, {"num_predict": "four"}) == (500, 'option "num_predict" must be of type integer')
    assert refusal(parse_options, {"top_p": True}) == (500, 'option "top_p" must be of type float32')
    assert refusal(parse_options, {"stop": "\n"}) == (500, 'option "stop" must be of type array')
    assert refusal(parse_options, {"stop": [1]}) == (500, 'option "stop" must be of an array of strings')
    assert refusal(parse_options, {"use_mmap": 1}) == (500, 'option "use_mmap" must be of type boolean')


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, None), (0, 0.0), ("0", 0.0), ("0s", 0.0), ("5m", 300.0), ("1h30m", 5400.0), ("250ms", 0.25),
     (".5s", 0.5), (30, 30.0), (1.5, 1.5), (-1, float("inf")), ("-1m", float("inf"))],
)
def test_keep_alive_reads_go_durations(value: Any, seconds: float | None) -> None:
    assert keep_alive_seconds(value) == seconds


def test_keep_alive_refusals_are_gos_words() -> None:
    assert refusal(keep_alive_seconds, "5") == (400, 'time: missing unit in duration "5"')
    assert refusal(keep_alive_seconds, "forever") == (400, 'time: invalid duration "forever"')
    assert refusal(keep_alive_seconds, "5y") == (400, 'time: unknown unit "y" in duration "5y"')
    assert refusal(keep_alive_seconds, True) == (400, "Unsupported type: 'bool'")
    assert refusal(keep_alive_seconds, [1]) == (400, "Unsupported type: '[]interface {}'")
    assert refusal(go_duration_seconds, "") == (400, 'time: invalid duration ""')


def test_images_are_base64() -> None:
    assert decode_image(PIXEL, "f").startswith(b"\x89PNG")
    assert refusal(decode_image, "!!!", "f") == (400, "illegal base64 data at input byte 0")
    assert refusal(decode_image, "QUJD!", "f") == (400, "illegal base64 data at input byte 4")
    assert refusal(decode_image, 5, "ChatRequest.messages.images") == (
        400, "json: cannot unmarshal number into Go struct field ChatRequest.messages.images of type api.ImageData")


def test_messages_and_tools_bind_like_go() -> None:
    turns = messages({"messages": [{"role": "USER", "content": "hi", "images": [PIXEL]}, {"content": "x"}]})
    assert [t["role"] for t in turns] == ["user", ""]  # lower-cased; a missing role is Go's ""
    assert refusal(messages, {"messages": [{"role": "user", "content": 5}]}) == (
        400, "json: cannot unmarshal number into Go struct field ChatRequest.messages.content of type string")
    status, text = refusal(messages, {"messages": [{"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": '{"a": 1}'}}]}]})
    assert status == 400 and "object" in text  # arguments as JSON text: the worker's usual mistake
    assert tools({"tools": [WEATHER]}) == [WEATHER]
    assert refusal(tools, {"tools": {"a": 1}}) == (
        400, "json: cannot unmarshal object into Go struct field ChatRequest.tools of type api.Tools")


def test_tool_call_is_shaped_like_api_tool_call_and_repeats() -> None:
    call = tool_call("get_weather", {"city": "simulated"}, 0, "salt")
    assert call == {"id": call["id"], "function": {"index": 0, "name": "get_weather", "arguments": {"city": "simulated"}}}
    assert call["id"].startswith("call_sim") and len(call["id"]) == len("call_") + 8
    assert tool_call("get_weather", {}, 0, "salt")["id"] == call["id"]
    assert tool_call("get_weather", {}, 0, "other")["id"] != call["id"]


def test_a_user_turn_with_tools_offered_gets_a_call_to_the_first_tool() -> None:
    turns = [{"role": "system", "content": "S"}, {"role": "user", "content": "Weather?"}]
    other = {"type": "function", "function": {"name": "other"}}
    answer = chat_answer("m", turns, [WEATHER, other], None, Options(num_predict=1))
    assert answer.tokens == () and answer.done_reason == "stop"  # a call is never cut by num_predict
    [call] = answer.tool_calls
    assert call["function"]["name"] == "get_weather"
    assert call["function"]["arguments"] == {"city": "simulated", "days": 1}
    jsonschema.validate(call["function"]["arguments"], WEATHER["function"]["parameters"])
    assert answer.eval_count > 0
    bare = chat_answer("m", turns, [other], None, Options())
    assert bare.tool_calls[0]["function"] == {"index": 0, "name": "other", "arguments": {}}


def test_the_turn_after_a_tool_repeats_its_result() -> None:
    turns = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "sunny"},
    ]
    answer = chat_answer("m", turns, [WEATHER], None, Options())
    assert answer.text == "[simulated m] The tool said: sunny" and answer.tool_calls == ()
    as_json = chat_answer("m", turns, [WEATHER], AnswerFormat(), Options())
    assert json.loads(as_json.text) == {"answer": "[simulated m] The tool said: sunny"}


def test_text_answers_echo_the_last_user_turn_formatted_stopped_and_cut() -> None:
    turns = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "a"}]
    assert conversation_reply("m", turns) == "[simulated m] You said: first"
    assert json.loads(generate_answer("m", "hi", AnswerFormat(), Options()).text) == {
        "answer": "[simulated m] You said: hi"}
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert json.loads(generate_answer("m", "hi", AnswerFormat(schema), Options()).text) == {"n": 0}
    assert text_answer("one two three", None, Options(stop=(" two",))) == Answer(("one",), (), "stop")
    assert text_answer("one two three", None, Options(num_predict=2)) == Answer(("one", " two"), (), "length")


# =========================================================================== model.py and cli.py


@pytest.mark.parametrize(
    ("model", "qualified"),
    [
        ("smollm2:135m", "registry.ollama.ai/library/smollm2:135m"),
        ("llama3.1", "registry.ollama.ai/library/llama3.1:latest"),
        ("me/m", "registry.ollama.ai/me/m:latest"),
        ("host:5000/ns/m:7b", "host:5000/ns/m:7b"),
    ],
)
def test_qualified_names_fill_ollamas_defaults(model: str, qualified: str) -> None:
    assert qualified_model_name(model) == qualified
    assert tools_unsupported_error(model) == f"{qualified} does not support tools"


def test_no_tools_config() -> None:
    config = SimulatorConfig(models=("llama3.1", "smollm2:135m"), no_tools=("smollm2:135m",))
    assert config.supports_tools("llama3.1") and config.supports_tools("LLAMA3.1:latest")
    assert not config.supports_tools("smollm2:135m")
    with pytest.raises(SimulatorConfigError, match="not served: gpt"):
        SimulatorConfig(models=("m",), no_tools=("gpt",))
    with pytest.raises(SimulatorConfigError):
        SimulatorConfig(record_bodies=-1)


def test_cli_takes_no_tools_and_record_bodies() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--models", "a,b", "--no-tools", "b", "--record-bodies", "3"])
    config = config_from_args(args)
    assert (config.no_tools, config.record_bodies) == (("b",), 3)
    assert config_from_args(parser.parse_args([])).no_tools == ()


def test_recorded_bodies_are_bounded_per_path() -> None:
    stats = SimulatorStats(body_limit=2)
    for i in range(3):
        stats.record_body("/api/chat", {"i": i})
    stats.record_body("/api/generate", {"g": 1})
    assert stats.bodies("/api/chat") == [{"i": 1}, {"i": 2}]
    assert stats.snapshot()["received_bodies"] == {"/api/chat": [{"i": 1}, {"i": 2}], "/api/generate": [{"g": 1}]}
    off = SimulatorStats(body_limit=0)
    off.record_body("/api/chat", {})
    assert off.snapshot()["received_bodies"] == {}


# =========================================================================== HTTP


@asynccontextmanager
async def running(**overrides: Any) -> AsyncIterator[tuple[httpx.AsyncClient, RunningSimulator]]:
    """A live instant simulator serving llama3.1 and smollm2:135m (the latter without tools)."""
    config = SimulatorConfig(**{
        "ttft_ms": 0.0, "tokens_per_s": 0.0, "models": ("llama3.1", "smollm2:135m"),
        "no_tools": ("smollm2:135m",), **overrides})
    async with await start_server(config, port=0) as sim:
        async with httpx.AsyncClient(base_url=sim.url, timeout=5.0) as client:
            yield client, sim


def ndjson(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.splitlines() if line]


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?", "images": [PIXEL]},
    {"role": "assistant", "content": "",
     "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_name": "get_weather", "content": "sunny"},
    {"role": "user", "content": "And tomorrow?"},
]


async def test_a_tool_call_answer_whole_and_streamed() -> None:
    body = {"model": "llama3.1", "messages": CONVERSATION, "tools": [WEATHER]}
    async with running() as (client, sim):
        whole = (await client.post("/api/chat", json={**body, "stream": False})).json()
        chunks = ndjson(await client.post("/api/chat", json=body))
    call = {"id": whole["message"]["tool_calls"][0]["id"],
            "function": {"index": 0, "name": "get_weather", "arguments": {"city": "simulated", "days": 1}}}
    assert whole["message"] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert whole["done"] is True and whole["done_reason"] == "stop" and whole["eval_count"] > 0
    assert [c["message"] for c in chunks] == [
        {"role": "assistant", "content": "", "tool_calls": [call]},  # whole, in a chunk of its own
        {"role": "assistant", "content": ""},
    ]
    assert [c["done"] for c in chunks] == [False, True] and chunks[-1]["done_reason"] == "stop"
    assert sim.stats.tokens_generated == whole["eval_count"] + 1


async def test_the_roles_reach_the_simulator_intact_and_are_shown_in_stats() -> None:
    body = {"model": "llama3.1", "messages": CONVERSATION, "stream": False, "format": "json",
            "options": {"temperature": 0, "stop": ["\n\n"]}, "keep_alive": "10m"}
    async with running(record_bodies=2) as (client, sim):
        for _ in range(3):
            await client.post("/api/chat", json=body)
        await client.post("/api/generate", json={"model": "llama3.1", "prompt": "p", "stream": False})
        stats = (await client.get("/simulator/stats")).json()
    assert stats["received_bodies"]["/api/chat"] == [body, body]  # the newest 2, as sent
    assert [m["role"] for m in stats["received_bodies"]["/api/chat"][-1]["messages"]] == [
        "system", "user", "assistant", "tool", "user"]
    assert stats["received_bodies"]["/api/generate"][0]["prompt"] == "p"
    assert sim.stats.bodies("/api/chat")[-1]["messages"][1]["images"] == [PIXEL]


async def test_formats_over_http() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "n": {"type": "integer"}},
              "required": ["city"]}
    user = [{"role": "user", "content": "hi"}]
    async with running() as (client, _):
        as_json = (await client.post("/api/chat", json={
            "model": "llama3.1", "messages": user, "format": "json", "stream": False})).json()
        chunks = ndjson(await client.post("/api/chat", json={"model": "llama3.1", "messages": user, "format": schema}))
        generated = (await client.post("/api/generate", json={
            "model": "llama3.1", "prompt": "hi", "format": schema, "stream": False})).json()
        bad = await client.post("/api/chat", json={"model": "llama3.1", "messages": user, "format": "xml"})
        bad_schema = await client.post("/api/generate", json={"model": "llama3.1", "prompt": "x", "format": {"type": "x"}})
    assert json.loads(as_json["message"]["content"]) == {"answer": "[simulated llama3.1] You said: hi"}
    streamed = json.loads("".join(c["message"]["content"] for c in chunks))
    assert streamed == {"city": "simulated", "n": 0}
    jsonschema.validate(streamed, schema)
    assert json.loads(generated["response"]) == streamed
    assert bad.status_code == 500 and bad.headers["content-type"].startswith("application/json")
    assert bad.json() == {"error": 'invalid format: "\\"xml\\""; expected "json" or a valid JSON Schema object'}
    assert (bad_schema.status_code, bad_schema.json()) == (500, {"error": "invalid JSON schema in format"})


async def test_a_model_without_tools_refuses_them_like_ollama() -> None:
    error = {"error": "registry.ollama.ai/library/smollm2:135m does not support tools"}
    async with running() as (client, sim):
        chat = await client.post("/api/chat", json={
            "model": "smollm2:135m", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER]})
        load = await client.post("/api/chat", json={"model": "smollm2:135m", "messages": [], "tools": [WEATHER]})
        no_tools = await client.post("/api/chat", json={
            "model": "smollm2:135m", "stream": False, "messages": [{"role": "user", "content": "hi"}], "tools": []})
        unload = await client.post("/api/chat", json={"model": "smollm2:135m", "keep_alive": 0, "tools": [WEATHER]})
    assert (chat.status_code, chat.json()) == (400, error)
    assert (load.status_code, load.json()) == (400, error)  # checked before the load call, as Ollama does
    assert no_tools.status_code == 200 and no_tools.json()["message"]["content"].endswith("You said: hi")
    assert unload.json()["done_reason"] == "unload"  # unloading comes first in Ollama
    assert sim.stats.client_errors == 2


async def test_ollamas_order_of_checks_and_load_calls() -> None:
    async with running() as (client, _):
        with_image = await client.post("/api/generate", json={"model": "llama3.1", "images": [PIXEL]})
        unload = await client.post("/api/generate", json={"model": "llama3.1", "keep_alive": "0s"})
        bad_option_on_load = await client.post("/api/chat", json={"model": "llama3.1", "options": {"stop": "x"}})
        think = await client.post("/api/chat", json={
            "model": "llama3.1", "think": True, "messages": [{"role": "user", "content": "hi"}]})
        bad_stream = await client.post("/api/chat", json={"model": "llama3.1", "stream": "yes"})
        stopped = await client.post("/api/generate", json={
            "model": "llama3.1", "prompt": "a b", "stream": False, "options": {"stop": ["said"]}})
    assert with_image.json()["done_reason"] == "load"  # an empty prompt loads, images or not
    assert unload.json()["done_reason"] == "unload"
    assert (bad_option_on_load.status_code, bad_option_on_load.json()) == (
        500, {"error": 'option "stop" must be of type array'})
    assert (think.status_code, think.json()) == (400, {"error": '"llama3.1" does not support thinking'})
    assert bad_stream.json() == {
        "error": "json: cannot unmarshal string into Go struct field ChatRequest.stream of type bool"}
    assert stopped.json()["response"] == "[simulated llama3.1] You " and stopped.json()["done_reason"] == "stop"
