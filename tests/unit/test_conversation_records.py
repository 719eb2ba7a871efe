"""The conversation on the wire (InferenceRequest v4, InferenceResponse v5, InferenceToken v3).

What an application sends through Nexus (turns with roles, images, tool calls and results,
tools, a format, options) reaches the worker whole, and records of the older versions are
still read, as records of the new ones are by code pinned to the old.
"""

from __future__ import annotations

from schemas import (
    Codec, InferenceOptions, InferenceRequest, InferenceResponse, InferenceToken, Message, ModelContext, Tool,
    ToolCall, decode_request, decode_response, decode_token, encode_request, encode_response, encode_token, utcnow,
)

CODEC = Codec.from_directory()
WEATHER = Tool("get_weather", "The weather in a city", '{"type":"object","properties":{"city":{"type":"string"}}}')


def _chat() -> InferenceRequest:
    return InferenceRequest(
        "chat-1", "m", "And in Paris?", ModelContext("s", {"user": "alice"}),
        InferenceOptions(temperature=0, top_p=0.9, top_k=20, stop=("\n\n",), num_ctx=4096, extra='{"num_thread":1}'),
        messages=(
            Message("system", "Be brief."),
            Message("user", "Weather in Oslo?", images=(b"\x89PNG\r\n",)),
            Message("assistant", "", tool_calls=(ToolCall("get_weather", '{"city":"Oslo"}', "call-1"),)),
            Message("tool", '{"celsius": 3}', tool_name="get_weather", tool_call_id="call-1"),
            Message("user", "And in Paris?"),
        ),
        tools=(WEATHER,), tool_choice="auto", format='{"type":"object"}', keep_alive="5m",
    )


def test_a_conversation_reaches_the_worker_whole() -> None:
    request = _chat()
    assert decode_request(CODEC, encode_request(CODEC, request)) == request
    assert request.is_chat and not InferenceRequest("p", "m", "x", ModelContext("s")).is_chat


def test_the_json_form_shows_images_as_base64_and_arguments_as_objects() -> None:
    body = _chat().to_json()
    assert body["messages"][1]["images"] == ["iVBORw0K"]
    assert body["messages"][2]["tool_calls"] == [{"id": "call-1", "name": "get_weather", "arguments": {"city": "Oslo"}}]
    assert body["tools"][0]["parameters"]["properties"] == {"city": {"type": "string"}}
    assert body["options"]["stop"] == ["\n\n"]


def test_code_pinned_to_v3_reads_a_conversation_as_its_last_prompt_and_v3_records_still_read() -> None:
    v3 = Codec.from_directory(pin={"InferenceRequest": 3})
    seen = decode_request(v3, encode_request(CODEC, _chat()))
    assert (seen.input, seen.messages, seen.options.temperature) == ("And in Paris?", (), 0)
    old = InferenceRequest("old", "m", "Hello", ModelContext("s"), InferenceOptions(seed=7))
    assert decode_request(CODEC, encode_request(v3, old)) == old


def test_responses_and_tokens_carry_tool_calls_and_old_versions_still_read() -> None:
    call = ToolCall("get_weather", '{"city":"Paris"}')
    response = InferenceResponse("chat-1", "m", "ok", ModelContext("s"), 12, utcnow(), tool_calls=(call,))
    assert decode_response(CODEC, encode_response(CODEC, response)) == response
    assert response.to_json()["message"] == {
        "role": "assistant", "content": "", "tool_calls": [{"id": None, "name": "get_weather", "arguments": {"city": "Paris"}}]}
    token = InferenceToken("chat-1", "m", "s", 0, "", tool_calls=(call,))
    assert decode_token(CODEC, encode_token(CODEC, token)) == token
    v4 = Codec.from_directory(pin={"InferenceResponse": 4, "InferenceToken": 2})
    assert decode_response(v4, encode_response(CODEC, response)).output == ""
    plain = InferenceResponse("p", "m", "ok", ModelContext("s"), 1, utcnow(), output="hi")
    assert decode_response(CODEC, encode_response(v4, plain)) == plain
