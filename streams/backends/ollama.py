"""The Ollama backend: ``POST /api/generate`` for a prompt, ``POST /api/chat`` for a conversation
(so the model's chat template sees the roles), streaming or not; ``GET /api/version`` probes, and
the endpoint's inventory from ``GET /api/tags`` (models it has) and ``GET /api/ps`` (loaded now).

A conversation's tool calls come back in ``message.tool_calls``, each whole (streamed: in a chunk
of its own); they pass on as :class:`~schemas.ToolCall` with their arguments as JSON text.

It runs on the worker's own HTTP client (:mod:`streams.backends.http`): with many calls in
flight httpx's pool spent about 3 ms of CPU per call, aiohttp's client 0.12–0.16 ms and that
client 0.08–0.10 ms (the kernel's share included), and that CPU is what limits a worker's
throughput (``docs/performance.md``).
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from schemas import InferenceOptions, InferenceRequest, Message, ToolCall
from streams.backends.base import BackendError, Generation, Inventory, OnChunk, OnSent, is_bad_request
from streams.backends.http import HttpClient, HttpError, Response, new_session
from streams.backends.lines import MAX_LINE_BYTES, LineSplitter, lines_of
from streams.backends.wire import (
    Unsendable, extra_options, function_tool, json_value, keep_alive_value, schema_of, tool_call, unreachable,
    unsendable,
)

__all__ = [
    "BackendError", "Generation", "Inventory", "OllamaBackend", "chat_messages", "generate", "model_names",
    "new_session", "ollama_options", "request_body",
]


class OllamaBackend:
    """:class:`streams.backends.base.Backend` over one HTTP client shared by every endpoint."""

    def __init__(self, http: HttpClient, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._http = http
        self._max_line_bytes = max_line_bytes  # one streamed NDJSON line at most

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
        return await generate(self._http, endpoint, model, request, system, timeout_s,
                              on_chunk, on_sent, max_line_bytes=self._max_line_bytes)

    async def probe(self, endpoint: str, timeout_s: float) -> bool:
        try:
            async with self._http.get(f"{endpoint}/api/version", timeout_s) as response:
                await response.read()
                return response.status == 200
        except (TimeoutError, HttpError):
            return False

    async def inventory(self, endpoint: str, timeout_s: float) -> Inventory:
        """``/api/tags`` (every model it has) and ``/api/ps`` (loaded in memory now); a server
        without ``/api/ps`` (404) has an unknown ``loaded``."""
        available = await self._names(endpoint, "/api/tags", timeout_s)
        try:
            loaded: frozenset[str] | None = await self._names(endpoint, "/api/ps", timeout_s)
        except BackendError:
            loaded = None
        return Inventory(available, loaded)

    async def _names(self, endpoint: str, path: str, timeout_s: float) -> frozenset[str]:
        try:
            async with self._http.get(f"{endpoint}{path}", timeout_s) as response:
                if response.status != 200:
                    raise _status_error(endpoint, response.status, await response.read())
                data = _object(endpoint, await response.read())
        except TimeoutError:
            raise BackendError(f"{endpoint}{path} did not answer within {timeout_s:g}s", retryable=True) from None
        except HttpError as exc:
            raise unreachable(endpoint, exc) from None
        return model_names(data)



def model_names(data: dict[str, Any]) -> frozenset[str]:
    """The model names of an ``/api/tags`` or ``/api/ps`` answer: ``{"models": [{"name": ...}]}``."""
    models = data.get("models")
    if not isinstance(models, list):
        return frozenset()
    names = set()
    for entry in models:
        if isinstance(entry, dict):
            name = entry.get("name") or entry.get("model")
            if isinstance(name, str) and name:
                names.add(name)
    return frozenset(names)


def ollama_options(options: InferenceOptions) -> dict[str, Any]:
    """The request's options as Ollama's ``options``: ``extra`` first, the named fields over it
    (they are what the edges validated)."""
    out = extra_options(options)
    named: dict[str, Any] = {
        "temperature": options.temperature,
        "num_predict": options.max_tokens,
        "seed": options.seed,
        "top_p": options.top_p,
        "top_k": options.top_k,
        "min_p": options.min_p,
        "stop": list(options.stop) or None,
        "num_ctx": options.num_ctx,
        "repeat_penalty": options.repeat_penalty,
        "presence_penalty": options.presence_penalty,
        "frequency_penalty": options.frequency_penalty,
    }
    out.update({k: v for k, v in named.items() if v is not None})
    return out


def request_body(model: str, request: InferenceRequest, system: str, stream: bool) -> tuple[str, dict[str, Any]]:
    """The path and body of the call: a conversation to ``/api/chat`` (the model's chat template
    sees the roles), a prompt to ``/api/generate``. Raises :class:`Unsendable` for a request
    whose JSON texts are not what they should be."""
    if request.is_chat:
        body: dict[str, Any] = {
            "model": model,
            "messages": chat_messages(request.messages, system),
            "stream": stream,
            "options": ollama_options(request.options),
        }
        if request.tools and request.tool_choice != "none":
            # Ollama has no tool_choice: "none" is said by offering no tools; the others cannot be forced.
            body["tools"] = [function_tool(t) for t in request.tools]
        path = "/api/chat"
    else:
        body = {
            "model": model,
            "prompt": request.input,
            "system": system,
            "stream": stream,
            "options": ollama_options(request.options),
        }
        path = "/api/generate"
    if request.format is not None:
        body["format"] = "json" if request.format == "json" else schema_of(request.format)
    if request.keep_alive is not None:
        body["keep_alive"] = keep_alive_value(request.keep_alive)
    return path, body


def chat_messages(messages: tuple[Message, ...], system: str) -> list[dict[str, Any]]:
    """The conversation as ``/api/chat`` messages, Nexus's system prompt (when there is one) first."""
    out = [{"role": "system", "content": system}] if system else []
    out.extend(chat_message(m) for m in messages)
    return out


def chat_message(message: Message) -> dict[str, Any]:
    """One turn in Ollama's shape: images as base64, a call's arguments as an object, a tool
    result named by ``tool_name``."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.images:
        out["images"] = [base64.b64encode(i).decode("ascii") for i in message.images]
    if message.tool_calls:
        out["tool_calls"] = [_call(c) for c in message.tool_calls]
    if message.tool_name is not None:
        out["tool_name"] = message.tool_name
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def _call(call: ToolCall) -> dict[str, Any]:
    """A call the model made, as Ollama reads it back: arguments as an object, the id when it has one."""
    out: dict[str, Any] = {"id": call.id} if call.id else {}
    arguments = json_value(call.arguments, f"the arguments of tool call {call.name!r}")
    out["function"] = {"name": call.name, "arguments": arguments}
    return out


def tool_calls_of(message: Any) -> tuple[ToolCall, ...]:
    """The tool calls of an ``/api/chat`` message: ``[{"function": {"name", "arguments": {...}}}]``."""
    if not isinstance(message, dict) or not isinstance(message.get("tool_calls"), list):
        return ()
    calls = (tool_call(c.get("function"), c.get("id")) for c in message["tool_calls"] if isinstance(c, dict))
    return tuple(c for c in calls if c is not None)


def _piece(data: dict[str, Any], chat: bool) -> tuple[Any, tuple[ToolCall, ...]]:
    """The text and tool calls of one answer or chunk: ``response`` from ``/api/generate``,
    ``message`` from ``/api/chat``. The text is not checked here (``None`` when absent)."""
    if not chat:
        return data.get("response"), ()
    message = data.get("message")
    text = message.get("content") if isinstance(message, dict) else None
    if text is None and isinstance(message, dict):
        text = ""  # a message with tool calls only
    return text, tool_calls_of(message)


async def generate(
    http: HttpClient,
    endpoint: str,
    model: str,
    request: InferenceRequest,
    system: str,
    timeout_s: float,
    on_chunk: OnChunk | None = None,
    on_sent: OnSent | None = None,
    *,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> Generation:
    """One call to ``{endpoint}/api/generate`` (a prompt) or ``/api/chat`` (a conversation); with
    ``on_chunk``, streamed chunk by chunk.

    ``on_sent`` is called when the request went on the wire. A streamed line
    longer than ``max_line_bytes`` fails the call with a :class:`BackendError` naming the cap.
    """
    try:
        path, body = request_body(model, request, system, stream=on_chunk is not None)
    except Unsendable as exc:
        raise unsendable(endpoint, exc) from None
    chat = path == "/api/chat"
    started = time.perf_counter()
    try:
        async with http.post(f"{endpoint}{path}", body, timeout_s, on_sent) as response:
            if response.status != 200:
                raise _status_error(endpoint, response.status, await response.read())
            if on_chunk is None:
                data = _object(endpoint, await response.read())
                text, calls = _piece(data, chat)
                return _generation(endpoint, data, text, calls, started, None)
            return await _read_stream(endpoint, response, chat, on_chunk, started, max_line_bytes)
    except TimeoutError:
        raise BackendError(f"{endpoint} did not answer within {timeout_s:g}s", retryable=True) from None
    except HttpError as exc:
        raise unreachable(endpoint, exc) from None


async def _read_stream(
    endpoint: str, response: Response, chat: bool, on_chunk: OnChunk, started: float,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> Generation:
    parts: list[str] = []
    calls: list[ToolCall] = []
    ttft: float | None = None
    # NDJSON: one object per line (streams/backends/lines.py caps a line).
    async for line in lines_of(response, LineSplitter(endpoint, max_line_bytes)):
        if not line.strip():
            continue
        data = _object(endpoint, line)
        if "error" in data:
            raise BackendError(f"{endpoint} failed mid-stream: {data['error']}", retryable=False)
        piece, piece_calls = _piece(data, chat)
        piece = piece if isinstance(piece, str) else ""
        if piece or piece_calls:  # Ollama sends each tool call whole, in a chunk of its own
            if ttft is None:
                ttft = time.perf_counter() - started
            parts.append(piece)
            calls.extend(piece_calls)
            await on_chunk(piece, piece_calls)
        if data.get("done"):
            return _generation(endpoint, data, "".join(parts), tuple(calls), started, ttft)
    raise BackendError(f"{endpoint} ended the stream without a final chunk", retryable=True)


def _object(endpoint: str, raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError:
        raise BackendError(f"{endpoint} answered with a non-JSON body", retryable=True) from None
    if not isinstance(data, dict):
        raise BackendError(f"{endpoint} answered with JSON that is not an object", retryable=True)
    return data


# Ollama 0.17 refuses some requests with 500, not 400: a format that is neither "json" nor a
# JSON schema it can enforce, an option of the wrong type. They would fail on any endpoint.
_REFUSED_AS_500 = ("invalid format:", "invalid json schema in format", "must be of type")


def refused_as_500(reason: str) -> bool:
    """Whether Ollama's 500 ``{"error": reason}`` refuses the request itself (not a server fault)."""
    lower = reason.lower()
    return any(marker in lower for marker in _REFUSED_AS_500)


def _status_error(endpoint: str, status: int, raw: bytes) -> BackendError:
    try:
        reason = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        reason = None
    shown = reason if isinstance(reason, str) and reason else raw[:200].decode(errors="replace")
    bad_request = is_bad_request(status) or (status == 500 and refused_as_500(str(reason)))
    # 503 is Ollama's "server busy"; 429 and 5xx may pass on another endpoint.
    retryable = not bad_request and (status in (408, 429) or status >= 500)
    return BackendError(
        f"{endpoint} answered {status}: {reason or raw[:200].decode(errors='replace')!r}",
        retryable=retryable,
        busy=status == 429 or (status == 503 and "busy" in str(reason).lower()),
        # Ollama's 404 {"error": "model 'x' not found"} (newer: 'model "x" not found, try pulling it first').
        missing_model=status == 404 and "not found" in str(reason).lower(),
        # Its 400 {"error": "... does not support tools"}: what the request asks, no endpoint can do.
        bad_request=bad_request,
        reason=shown or None,
    )


def _generation(
    endpoint: str, data: dict[str, Any], text: Any, calls: tuple[ToolCall, ...], started: float, ttft: float | None
) -> Generation:
    if not isinstance(text, str):
        raise BackendError(f"{endpoint} answered without a text ('response', or a chat's 'message')", retryable=True)
    return Generation(
        text=text,
        prompt_tokens=int(data.get("prompt_eval_count") or 0),
        completion_tokens=int(data.get("eval_count") or 0),
        done_reason=data.get("done_reason"),
        seconds=time.perf_counter() - started,
        ttft_s=ttft,
        tool_calls=calls,
    )
