"""The OpenAI-compatible backend: ``POST /v1/chat/completions``, streaming or not, and ``GET /v1/models``.

For any server that speaks OpenAI's chat completions: vLLM, llama.cpp's server, TGI, LM
Studio, Ollama's own ``/v1``. The endpoint is the server's base URL (``http://gpu1:8000``,
without ``/v1``: the settings strip it). The model context is the system message, the
user's input the user message, untouched. A streamed answer is read as server-sent events
(``data: {...}`` lines, ending with ``data: [DONE]``) and asks for the usage in its last
chunk (``stream_options.include_usage``), so token counts are known as they are for Ollama.

Failures are classified as for Ollama: 429 and 503 mean busy (back off, don't open the
circuit), 408 and 5xx may pass on another endpoint, other 4xx would fail anywhere, except a
404 about the model (``model_not_found``, vLLM's "does not exist", Ollama's "not found"),
which is ``missing_model``: another endpoint may have it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from schemas import InferenceOptions
from streams.backends.base import BackendError, Generation, Inventory, OnChunk, OnSent

__all__ = ["OpenAIBackend", "openai_options"]


class OpenAIBackend:
    """:class:`streams.backends.base.Backend` for OpenAI-compatible servers, over one shared aiohttp session."""

    def __init__(self, http: aiohttp.ClientSession) -> None:
        self._http = http

    async def generate(
        self,
        endpoint: str,
        model: str,
        prompt: str,
        system: str,
        options: InferenceOptions,
        timeout_s: float,
        on_chunk: OnChunk | None = None,
        on_sent: OnSent | None = None,
    ) -> Generation:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        body: dict[str, Any] = {"model": model, "messages": messages, "stream": on_chunk is not None,
                                **openai_options(options)}
        if on_chunk is not None:
            body["stream_options"] = {"include_usage": True}
        started = time.perf_counter()
        try:
            async with self._http.post(
                f"{endpoint}/v1/chat/completions", json=body, timeout=aiohttp.ClientTimeout(total=timeout_s),
                trace_request_ctx=on_sent,
            ) as response:
                if response.status != 200:
                    raise status_error(endpoint, response.status, await response.read())
                if on_chunk is None:
                    return _whole(endpoint, _object(endpoint, await response.read()), started)
                return await _read_stream(endpoint, response, on_chunk, started)
        except asyncio.TimeoutError:
            raise BackendError(f"{endpoint} did not answer within {timeout_s:g}s", retryable=True) from None
        except aiohttp.ClientError as exc:
            raise BackendError(
                f"{endpoint} unreachable: {type(exc).__name__}: {exc}", retryable=True,
                reached=not isinstance(exc, aiohttp.ClientConnectorError),
            ) from None

    async def probe(self, endpoint: str, timeout_s: float) -> bool:
        try:
            timeout = aiohttp.ClientTimeout(total=timeout_s)
            async with self._http.get(f"{endpoint}/v1/models", timeout=timeout) as response:
                return response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def inventory(self, endpoint: str, timeout_s: float) -> Inventory:
        """``GET /v1/models``: the models it serves; which are loaded it cannot say (``loaded`` is None)."""
        try:
            timeout = aiohttp.ClientTimeout(total=timeout_s)
            async with self._http.get(f"{endpoint}/v1/models", timeout=timeout) as response:
                if response.status != 200:
                    raise status_error(endpoint, response.status, await response.read())
                data = _object(endpoint, await response.read())
        except asyncio.TimeoutError:
            raise BackendError(f"{endpoint} did not answer within {timeout_s:g}s", retryable=True) from None
        except aiohttp.ClientError as exc:
            raise BackendError(
                f"{endpoint} unreachable: {type(exc).__name__}: {exc}", retryable=True,
                reached=not isinstance(exc, aiohttp.ClientConnectorError),
            ) from None
        listed = data.get("data")
        if not isinstance(listed, list):
            raise BackendError(f"{endpoint} listed its models without a 'data' list", retryable=True)
        names = frozenset(m["id"] for m in listed if isinstance(m, dict) and isinstance(m.get("id"), str))
        return Inventory(available=names, loaded=None)


def openai_options(options: InferenceOptions) -> dict[str, Any]:
    """The request's options as chat-completions fields (Ollama's counterpart: ``ollama_options``)."""
    out: dict[str, Any] = {}
    if options.temperature is not None:
        out["temperature"] = options.temperature
    if options.max_tokens is not None:
        out["max_tokens"] = options.max_tokens
    if options.seed is not None:
        out["seed"] = options.seed
    return out


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
    if text is None and isinstance(message, dict) and "content" in message:
        text = ""  # content: null, e.g. an answer cut at max_tokens 0
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
    )


async def _read_stream(
    endpoint: str, response: aiohttp.ClientResponse, on_chunk: OnChunk, started: float
) -> Generation:
    parts: list[str] = []
    ttft: float | None = None
    done_reason: str | None = None
    usage: tuple[int, int] | None = None
    finished = False
    async for data in _events(response):
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
        if isinstance(piece, str) and piece:
            if ttft is None:
                ttft = time.perf_counter() - started
            parts.append(piece)
            await on_chunk(piece)
        done_reason = _finish_reason(choice) or done_reason
    if not finished and done_reason is None:
        raise BackendError(f"{endpoint} ended the stream without a final chunk", retryable=True)
    prompt_tokens, completion_tokens = usage if usage is not None else (0, 0)
    return Generation(
        text="".join(parts),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        done_reason=done_reason,
        seconds=time.perf_counter() - started,
        ttft_s=ttft,
    )


async def _events(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The data of each server-sent event (its ``data:`` lines joined), and any bare JSON line;
    comments and other fields are skipped."""
    lines: list[str] = []
    async for raw in response.content:
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
