"""The OpenAI-compatible backend: ``POST /v1/chat/completions``, streaming or not, and ``GET /v1/models``.

For any server that speaks OpenAI's chat completions: vLLM, llama.cpp's server, TGI, LM
Studio, Ollama's own ``/v1``. The endpoint is the server's base URL (``http://gpu1:8000``,
without ``/v1``: the settings strip it). The model context is the system message; then a
prompt is one user message, untouched, and a conversation its turns (images as ``data:``
URLs, tool calls and results tied by id), with its tools, ``tool_choice`` and format
(``response_format``). A streamed answer is read as server-sent events (``data: {...}``
lines, ending with ``data: [DONE]``) and asks for the usage in its last chunk
(``stream_options.include_usage``), so token counts are known as they are for Ollama; tool
calls streamed in fragments are joined and passed on whole. ``finish_reason`` (``stop``,
``length``, ``tool_calls``) is the response's ``done_reason`` as the server said it.

Failures are classified as for Ollama: 429 and 503 mean busy (back off, don't open the
circuit), 408 and 5xx may pass on another endpoint, other 4xx would fail anywhere (400: a
bad request, answered with the server's own message), except a 404 about the model
(``model_not_found``, vLLM's "does not exist", Ollama's "not found"), which is
``missing_model``: another endpoint may have it.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from schemas import InferenceOptions, InferenceRequest, Message, ToolCall
from streams.backends.base import BackendError, Generation, Inventory, OnChunk, OnSent, is_bad_request
from streams.backends.http import HttpClient, HttpError, Response
from streams.backends.lines import MAX_LINE_BYTES, LineSplitter, lines_of
from streams.backends.wire import (
    Unsendable, arguments_text, extra_options, function_tool, schema_of, tool_call, unreachable, unsendable,
)

__all__ = ["OpenAIBackend", "ToolCallJoiner", "chat_messages", "openai_options", "request_body", "status_error"]


class OpenAIBackend:
    """:class:`streams.backends.base.Backend` for OpenAI-compatible servers, over one shared HTTP client."""

    def __init__(self, http: HttpClient, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._http = http
        self._max_line_bytes = max_line_bytes  # one streamed SSE line at most

    async def generate(
        self,
        endpoint: str,
        model: str,
        request: InferenceRequest,
        system: str,
        timeout_s: float,
        on_chunk: OnChunk | None = None,
        on_sent: OnSent | None = None,
    ) -> Generation:
        try:
            body = request_body(model, request, system, stream=on_chunk is not None)
        except Unsendable as exc:
            raise unsendable(endpoint, exc) from None
        started = time.perf_counter()
        try:
            async with self._http.post(f"{endpoint}/v1/chat/completions", body, timeout_s, on_sent) as response:
                if response.status != 200:
                    raise status_error(endpoint, response.status, await response.read())
                if on_chunk is None:
                    return _whole(endpoint, _object(endpoint, await response.read()), started)
                return await _read_stream(endpoint, response, on_chunk, started, self._max_line_bytes)
        except TimeoutError:
            raise BackendError(f"{endpoint} did not answer within {timeout_s:g}s", retryable=True) from None
        except HttpError as exc:
            raise unreachable(endpoint, exc) from None

    async def probe(self, endpoint: str, timeout_s: float) -> bool:
        try:
            async with self._http.get(f"{endpoint}/v1/models", timeout_s) as response:
                await response.read()
                return response.status == 200
        except (TimeoutError, HttpError):
            return False

    async def inventory(self, endpoint: str, timeout_s: float) -> Inventory:
        """``GET /v1/models``: the models it serves; which are loaded it cannot say (``loaded`` is None)."""
        try:
            async with self._http.get(f"{endpoint}/v1/models", timeout_s) as response:
                if response.status != 200:
                    raise status_error(endpoint, response.status, await response.read())
                data = _object(endpoint, await response.read())
        except TimeoutError:
            raise BackendError(f"{endpoint} did not answer within {timeout_s:g}s", retryable=True) from None
        except HttpError as exc:
            raise unreachable(endpoint, exc) from None
        listed = data.get("data")
        if not isinstance(listed, list):
            raise BackendError(f"{endpoint} listed its models without a 'data' list", retryable=True)
        names = frozenset(m["id"] for m in listed if isinstance(m, dict) and isinstance(m.get("id"), str))
        return Inventory(available=names, loaded=None)


def openai_options(options: InferenceOptions) -> dict[str, Any]:
    """The request's options as chat-completions fields (Ollama's counterpart: ``ollama_options``):
    ``extra`` first, the named fields over it.

    Ollama's own ``top_k``, ``min_p``, ``repeat_penalty`` and ``num_ctx`` are not chat-completions
    fields (OpenAI refuses unknown ones): a server that takes them (vLLM) gets them through ``extra``.
    """
    out = extra_options(options)
    named: dict[str, Any] = {
        "temperature": options.temperature,
        "max_tokens": options.max_tokens,
        "seed": options.seed,
        "top_p": options.top_p,
        "stop": list(options.stop) or None,
        "presence_penalty": options.presence_penalty,
        "frequency_penalty": options.frequency_penalty,
    }
    out.update({k: v for k, v in named.items() if v is not None})
    return out


def request_body(model: str, request: InferenceRequest, system: str, stream: bool) -> dict[str, Any]:
    """The chat-completions body: Nexus's system prompt (when there is one), then the conversation,
    or the prompt as one user message. Raises :class:`Unsendable` for a request whose JSON texts
    are not what they should be. ``keep_alive`` has no chat-completions field: it is left out."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    if request.is_chat:
        messages.extend(chat_messages(request.messages))
    else:
        messages.append({"role": "user", "content": request.input})
    body = openai_options(request.options)
    body.update({"model": model, "messages": messages, "stream": stream})
    if request.tools:
        body["tools"] = [function_tool(t) for t in request.tools]
        if request.tool_choice is not None:
            body["tool_choice"] = tool_choice(request.tool_choice)
    if request.format is not None:
        body["response_format"] = response_format(request.format)
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def tool_choice(choice: str) -> str | dict[str, Any]:
    """``auto``, ``none`` and ``required`` as they are; any other is the one function to call."""
    if choice in ("auto", "none", "required"):
        return choice
    return {"type": "function", "function": {"name": choice}}


def response_format(format_: str) -> dict[str, Any]:
    """``"json"`` is JSON mode; any other format is a JSON schema the answer must follow."""
    if format_ == "json":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "response", "schema": schema_of(format_)}}


def chat_messages(messages: tuple[Message, ...]) -> list[dict[str, Any]]:
    """The conversation as chat-completions messages.

    OpenAI ties each tool result to its call by id; a conversation from Ollama's API has no ids
    (a result names its function), so calls without one get ``call_<turn>_<n>`` and each result
    without one answers the first call of its function not answered yet.
    """
    out: list[dict[str, Any]] = []
    unanswered: list[tuple[str, str]] = []  # (id, function) of the last assistant turn's calls
    for turn, message in enumerate(messages):
        if message.role == "assistant" and message.tool_calls:
            ids = [c.id or f"call_{turn}_{n}" for n, c in enumerate(message.tool_calls)]
            unanswered = [(i, c.name) for i, c in zip(ids, message.tool_calls)]
            out.append({
                "role": "assistant",
                "content": message.content or None,
                "tool_calls": [
                    {"id": i, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for i, c in zip(ids, message.tool_calls)
                ],
            })
        elif message.role == "tool":
            call_id = answered_call(unanswered, message.tool_call_id, message.tool_name)
            turn_out: dict[str, Any] = {"role": "tool", "content": message.content}
            if call_id is not None:
                turn_out["tool_call_id"] = call_id
            out.append(turn_out)
        else:
            out.append({"role": message.role, "content": _content(message)})
    return out


def answered_call(unanswered: list[tuple[str, str]], call_id: str | None, function: str | None) -> str | None:
    """The id of the call a tool result answers (taken off ``unanswered``): its own, or the first
    unanswered call of ``function`` (of any function when it names none)."""
    for n, (id_, name) in enumerate(unanswered):
        if id_ == call_id or (call_id is None and function in (None, name)):
            del unanswered[n]
            return id_
    return call_id


def _content(message: Message) -> str | list[dict[str, Any]]:
    """Text alone, or with images as ``data:`` URLs after it (OpenAI's content parts)."""
    if not message.images:
        return message.content
    parts: list[dict[str, Any]] = [{"type": "text", "text": message.content}] if message.content else []
    parts.extend(
        {"type": "image_url",
         "image_url": {"url": f"data:{image_type(i)};base64,{base64.b64encode(i).decode('ascii')}"}}
        for i in message.images
    )
    return parts


def image_type(data: bytes) -> str:
    """An image's media type from its first bytes (a ``data:`` URL must say one); JPEG when unknown."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "image/jpeg"


def status_error(endpoint: str, status: int, raw: bytes) -> BackendError:
    """How an answer that is not 200 fails, from its status and OpenAI's ``{"error": {...}}`` body."""
    error, message = _error_of(raw)
    shown = message or raw[:200].decode(errors="replace")
    if status == 404 and error is not None and _about_the_model(error, message):
        return BackendError(f"{endpoint} answered 404: {shown!r}", retryable=False, missing_model=True)
    if status == 404 and error is None:
        # Not an OpenAI error body: most likely no such route (is the url the server's base?).
        shown = f"{shown} (no /v1/chat/completions there: is it an OpenAI-compatible server's base URL?)"
    return BackendError(
        f"{endpoint} answered {status}: {shown!r}",
        retryable=status in (408, 429) or status >= 500,
        busy=status in (429, 503),
        # A 400: a field the server refuses (tools it cannot call, a schema it cannot follow).
        bad_request=is_bad_request(status),
        reason=message or shown,
    )


def _error_of(raw: bytes) -> tuple[dict[str, Any] | None, str | None]:
    try:
        return _error_in(json.loads(raw))
    except ValueError:
        return None, None


def _error_in(data: Any) -> tuple[dict[str, Any] | None, str | None]:
    """The error object of an OpenAI-style body (``{"error": {...}}``, vLLM's ``{"object": "error"}``,
    or ``{"error": "text"}``) and its message."""
    if not isinstance(data, dict):
        return None, None
    error = data.get("error")
    if isinstance(error, str):
        return {"message": error}, error
    if isinstance(error, dict):
        message = error.get("message")
        return error, message if isinstance(message, str) else None
    if data.get("object") == "error":
        message = data.get("message")
        return data, message if isinstance(message, str) else None
    return None, None


def _about_the_model(error: dict[str, Any], message: str | None) -> bool:
    if error.get("code") == "model_not_found" or error.get("type") in ("not_found_error", "NotFoundError"):
        return True
    text = (message or "").lower()
    return "model" in text and ("not found" in text or "does not exist" in text or "not exist" in text)


def _object(endpoint: str, raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError:
        raise BackendError(f"{endpoint} answered with a non-JSON body", retryable=True) from None
    if not isinstance(data, dict):
        raise BackendError(f"{endpoint} answered with JSON that is not an object", retryable=True)
    return data


def _whole(endpoint: str, data: dict[str, Any], started: float) -> Generation:
    choice = _first_choice(endpoint, data)
    message = choice.get("message") if choice is not None else None
    text = message.get("content") if isinstance(message, dict) else None
    calls = tool_calls_of(message)
    if text is None and isinstance(message, dict) and ("content" in message or calls):
        text = ""  # content: null, e.g. an answer cut at max_tokens 0, or tool calls only
    if not isinstance(text, str):
        raise BackendError(f"{endpoint} answered without a choices[0].message.content text", retryable=True)
    prompt_tokens, completion_tokens = _usage(data)
    return Generation(
        text=text,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        done_reason=_finish_reason(choice),
        seconds=time.perf_counter() - started,
        ttft_s=None,
        tool_calls=calls,
    )


def tool_calls_of(message: Any) -> tuple[ToolCall, ...]:
    """The tool calls of a whole answer's message: ``[{"id", "type", "function": {"name", "arguments"}}]``."""
    if not isinstance(message, dict) or not isinstance(message.get("tool_calls"), list):
        return ()
    calls = (tool_call(c.get("function"), c.get("id")) for c in message["tool_calls"] if isinstance(c, dict))
    return tuple(c for c in calls if c is not None)


@dataclass
class _Fragments:
    id: str | None = None
    name: str | None = None
    arguments: list[str] = field(default_factory=list)


class ToolCallJoiner:
    """Tool calls streamed in fragments, joined into whole calls.

    OpenAI streams a call as deltas by ``index``: the first with its id and name, the next
    with pieces of its arguments' text. A call is whole once a later index starts, or the
    choice finishes; :meth:`add` and :meth:`finish` give each whole call once, in order.
    """

    def __init__(self) -> None:
        self._open: dict[int, _Fragments] = {}

    def add(self, deltas: Any) -> tuple[ToolCall, ...]:
        """Take a chunk's ``delta.tool_calls``; return the calls it showed to be whole."""
        if not isinstance(deltas, list):
            return ()
        whole: list[ToolCall] = []
        for delta in deltas:
            if not isinstance(delta, dict):
                continue
            index = self._index_of(delta)
            whole.extend(self._close(lambda i: i < index))  # noqa: B023 (_close calls it at once)
            parts = self._open.setdefault(index, _Fragments())
            if isinstance(delta.get("id"), str) and delta["id"] and parts.id is None:
                parts.id = delta["id"]
            function = delta.get("function")
            if isinstance(function, dict):
                if isinstance(function.get("name"), str) and function["name"] and parts.name is None:
                    parts.name = function["name"]
                if isinstance(function.get("arguments"), str):
                    parts.arguments.append(function["arguments"])
        return tuple(whole)

    def finish(self) -> tuple[ToolCall, ...]:
        """Every call still open: the choice finished."""
        return self._close(lambda i: True)

    def _index_of(self, delta: dict[str, Any]) -> int:
        """Its ``index``; a server that sends none starts a call with each id."""
        index = delta.get("index")
        if isinstance(index, int) and not isinstance(index, bool):
            return index
        last = max(self._open, default=-1)
        return last + 1 if delta.get("id") or last < 0 else last

    def _close(self, which: Callable[[int], bool]) -> tuple[ToolCall, ...]:
        closed = []
        for index in sorted(i for i in self._open if which(i)):
            parts = self._open.pop(index)
            if parts.name:  # a call that never said its function cannot be run: left out
                closed.append(ToolCall(parts.name, arguments_text("".join(parts.arguments)), parts.id))
        return tuple(closed)


async def _read_stream(
    endpoint: str, response: Response, on_chunk: OnChunk, started: float,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> Generation:
    parts: list[str] = []
    calls: list[ToolCall] = []
    joiner = ToolCallJoiner()
    ttft: float | None = None
    done_reason: str | None = None
    usage: tuple[int, int] | None = None
    finished = False
    async for data in _events(response, LineSplitter(endpoint, max_line_bytes)):
        if data == "[DONE]":
            finished = True
            break
        event = _object(endpoint, data.encode())
        error, message = _error_in(event)
        if error is not None:
            raise BackendError(f"{endpoint} failed mid-stream: {message or data[:200]}", retryable=False)
        if isinstance(event.get("usage"), dict):
            usage = _usage(event)
        choice = _first_choice(endpoint, event, required=False)
        if choice is None:
            continue
        delta = choice.get("delta")
        piece = delta.get("content") if isinstance(delta, dict) else None
        piece = piece if isinstance(piece, str) else ""
        whole = joiner.add(delta.get("tool_calls") if isinstance(delta, dict) else None)
        reason = _finish_reason(choice)
        if reason is not None:
            whole += joiner.finish()
        if piece or whole:
            if ttft is None:
                ttft = time.perf_counter() - started
            parts.append(piece)
            calls.extend(whole)
            await on_chunk(piece, whole)
        done_reason = reason or done_reason
    if not finished and done_reason is None:
        raise BackendError(f"{endpoint} ended the stream without a final chunk", retryable=True)
    rest = joiner.finish()  # calls of a server that said [DONE] without a finish reason
    if rest:
        if ttft is None:
            ttft = time.perf_counter() - started
        calls.extend(rest)
        await on_chunk("", rest)
    prompt_tokens, completion_tokens = usage if usage is not None else (0, 0)
    return Generation(
        text="".join(parts),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        done_reason=done_reason,
        seconds=time.perf_counter() - started,
        ttft_s=ttft,
        tool_calls=tuple(calls),
    )


async def _events(response: Response, splitter: LineSplitter) -> AsyncIterator[str]:
    """The data of each server-sent event (its ``data:`` lines joined), and any bare JSON line;
    comments and other fields are skipped. Lines are split by ``splitter`` (streams/backends/lines.py)."""
    lines: list[str] = []
    async for raw in lines_of(response, splitter):
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
            continue
        if line.startswith("data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(" ") else value)
        elif line.startswith("{"):
            # Not SSE: Ollama's /v1 writes an error met mid-stream as bare JSON ({"error": ...}).
            yield line
    if lines:
        yield "\n".join(lines)


def _first_choice(endpoint: str, data: dict[str, Any], required: bool = True) -> dict[str, Any] | None:
    choices = data.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    if required:
        raise BackendError(f"{endpoint} answered without choices", retryable=True)
    return None


def _finish_reason(choice: dict[str, Any] | None) -> str | None:
    reason = choice.get("finish_reason") if choice is not None else None
    return reason if isinstance(reason, str) else None


def _usage(data: dict[str, Any]) -> tuple[int, int]:
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return 0, 0
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
