"""The whole conversation through Kafka, with the official clients, on the simulator.

What a real 135M model cannot do (call tools: its template has none) is checked here against
the simulator, which answers like Ollama 0.17.4 (held to it by test_simulator_contract.py):
with tools offered and a user turn last, it calls the first tool; with a tool's result last,
it answers "The tool said: ...". What reached the backend is read from the simulator's
record of the bodies it received, so roles, tool calls and images are checked as sent.
Structured output and a backend refusing tools are checked on the real model
(test_real_model.py).
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import httpx
import ollama
import openai
import pytest

from schemas.limits import MAX_IMAGE_BYTES
from tests.integration.support import TopicReader, wait_for_responses

MODEL = "llama3.1"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex[:8]}"


def received(simulator: str, path: str, marker: str) -> dict[str, Any]:
    """The last body the simulator received on ``path`` with ``marker`` in it."""
    bodies = httpx.get(f"{simulator}/simulator/stats").json()["received_bodies"].get(path, [])
    matching = [b for b in bodies if marker in json.dumps(b)]
    assert matching, f"no body with {marker!r} reached {path}"
    return matching[-1]


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_a_multi_turn_chat_reaches_the_backend_with_its_roles_intact(gateway_url: str, simulator: str) -> None:
    last = unique("And now?")
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hello."},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": last},
    ]
    reply = ollama.Client(host=gateway_url).chat(model=MODEL, messages=messages, options={"temperature": 0})
    assert reply.message.content == f"[simulated {MODEL}] You said: {last}"
    body = received(simulator, "/api/chat", last)
    turns = [(m["role"], m["content"]) for m in body["messages"]]
    # Nexus's own system prompt (the request's metadata) comes first; then the conversation as sent.
    assert turns[-4:] == [(m["role"], m["content"]) for m in messages]
    assert all(role == "system" for role, _ in turns[:-4])


def test_ollama_client_tool_call_and_the_follow_up_turn_with_its_result(gateway_url: str, simulator: str) -> None:
    client = ollama.Client(host=gateway_url)
    ask = {"role": "user", "content": unique("Weather in Oslo?")}
    first = client.chat(model=MODEL, messages=[ask], tools=[WEATHER], options={"temperature": 0})
    [call] = first.message.tool_calls or []
    assert call.function.name == "get_weather" and isinstance(call.function.arguments["city"], str)
    sent = received(simulator, "/api/chat", ask["content"])
    assert sent["tools"] == [WEATHER]

    follow_up = [ask, first.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_name": "get_weather", "content": '{"celsius": 3}'}]
    second = client.chat(model=MODEL, messages=follow_up, tools=[WEATHER], options={"temperature": 0})
    assert second.message.content == f'[simulated {MODEL}] The tool said: {{"celsius": 3}}'
    assert not second.message.tool_calls
    back = received(simulator, "/api/chat", '{\\"celsius\\": 3}')["messages"]
    assert [m["role"] for m in back][-3:] == ["user", "assistant", "tool"]
    assert back[-2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": call.function.arguments}
    assert back[-1]["tool_name"] == "get_weather"


def test_ollama_client_streams_a_tool_call(gateway_url: str) -> None:
    ask = {"role": "user", "content": unique("Weather in Lima?")}
    parts = list(ollama.Client(host=gateway_url, headers={"X-Nexus-Cache": "no-cache"}).chat(
        model=MODEL, messages=[ask], tools=[WEATHER], stream=True))
    calls = [c for p in parts for c in (p.message.tool_calls or [])]
    assert [c.function.name for c in calls] == ["get_weather"] and parts[-1].done


def test_openai_client_tool_call_and_the_follow_up_turn_whole_and_streamed(gateway_url: str, simulator: str) -> None:
    client = openai_client(gateway_url)
    ask = {"role": "user", "content": unique("Weather in Rome?")}
    first = client.chat.completions.create(model=MODEL, messages=[ask], tools=[WEATHER], tool_choice="auto")  # type: ignore[list-item]
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert "city" in json.loads(call.function.arguments)

    follow_up = [ask, choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    second = client.chat.completions.create(model=MODEL, messages=follow_up, tools=[WEATHER])  # type: ignore[arg-type]
    assert second.choices[0].message.content == f"[simulated {MODEL}] The tool said: sunny"
    assert second.choices[0].finish_reason == "stop"
    back = received(simulator, "/api/chat", "sunny")["messages"]
    assert [m["role"] for m in back][-3:] == ["user", "assistant", "tool"]
    assert back[-1]["tool_name"] == "get_weather", "the tool's name is found from the call it answers"

    streamed = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": unique("Weather in Quito?")}], tools=[WEATHER],  # type: ignore[list-item]
        stream=True, extra_headers={"X-Nexus-Cache": "no-cache"})
    chunks = list(streamed)
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].function and deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments or "" for d in deltas if d.function))["city"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_images_within_the_limit_reach_the_backend_and_over_it_are_413(gateway_url: str, simulator: str) -> None:
    prompt = unique("What is in this picture?")
    reply = ollama.Client(host=gateway_url).chat(
        model=MODEL, messages=[{"role": "user", "content": prompt, "images": [PNG]}])
    assert reply.message.content == f"[simulated {MODEL}] You said: {prompt}"
    [turn] = [m for m in received(simulator, "/api/chat", prompt)["messages"] if m["role"] == "user"]
    assert base64.b64decode(turn["images"][0]) == PNG

    data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    answer = openai_client(gateway_url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
        {"type": "text", "text": prompt + " again"}, {"type": "image_url", "image_url": {"url": data_url}}]}])
    assert answer.choices[0].message.content == f"[simulated {MODEL}] You said: {prompt} again"

    too_big = base64.b64encode(b"\x00" * (MAX_IMAGE_BYTES + 1)).decode()
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=gateway_url).chat(model=MODEL, messages=[{"role": "user", "content": "x", "images": [too_big]}])
    assert refused.value.status_code == 413, refused.value


def test_json_mode_and_a_schema_format_pass_through_to_the_backend(gateway_url: str, simulator: str) -> None:
    schema = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}
    prompt = unique("Name a colour.")
    reply = ollama.Client(host=gateway_url).chat(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                format=schema)
    assert set(json.loads(reply.message.content)) == {"colour"}
    assert received(simulator, "/api/chat", prompt)["format"] == schema

    prompt = unique("JSON please.")
    answer = openai_client(gateway_url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], response_format={"type": "json_object"})
    assert isinstance(json.loads(answer.choices[0].message.content or ""), dict)
    assert received(simulator, "/api/chat", prompt)["format"] == "json"


async def test_infer_takes_a_conversation_with_tools_and_answers_with_the_tool_call(
    stack: dict[str, str], simulator: str
) -> None:
    request_id = f"conv-{uuid.uuid4().hex[:8]}"
    body = {
        "id": request_id, "model_id": MODEL, "options": {"temperature": 0},
        "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": f"Weather? {request_id}"}],
        "tools": [WEATHER],
    }
    async with TopicReader(stack["NEXUS_KAFKA_BOOTSTRAP"], "inference.responses") as responses, \
            httpx.AsyncClient(base_url=stack["GATEWAY_URL"], timeout=10) as http:
        reply = await http.post("/infer", json=body)
        assert reply.status_code == 202, reply.text
        [answer] = (await wait_for_responses(responses, {request_id}, timeout=30)).by_id[request_id]
    assert answer.status == "ok", answer.error
    [call] = answer.tool_calls
    assert call.name == "get_weather" and "city" in json.loads(call.arguments)
    assert answer.to_json()["message"]["tool_calls"][0]["name"] == "get_weather"
    sent = received(simulator, "/api/chat", request_id)
    assert [m["role"] for m in sent["messages"]][-2:] == ["system", "user"]
