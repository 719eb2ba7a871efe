"""The Ollama backend: ``POST /api/generate``, streaming or not, ``GET /api/version`` probes, and
the endpoint's inventory from ``GET /api/tags`` (models it has) and ``GET /api/ps`` (loaded now).

It runs on aiohttp: with many calls in flight, httpx's pool spent about 3 ms of CPU
per call where aiohttp spends 0.2 ms, and that CPU was the worker's throughput limit
(``docs/performance.md``).
"""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace
from typing import Any

import aiohttp

from schemas import InferenceOptions
from streams.backends.base import BackendError, Generation, Inventory, OnChunk, OnSent

__all__ = [
    "BackendError", "Generation", "Inventory", "OllamaBackend", "generate", "model_names", "new_session", "ollama_options",
]


class OllamaBackend:
    """:class:`streams.backends.base.Backend` over one aiohttp session shared by every endpoint."""

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
        return await generate(self._http, endpoint, model, prompt, system, options, timeout_s, on_chunk, on_sent)

    async def probe(self, endpoint: str, timeout_s: float) -> bool:
        try:
            timeout = aiohttp.ClientTimeout(total=timeout_s)
            async with self._http.get(f"{endpoint}/api/version", timeout=timeout) as response:
                return response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
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
            async with self._http.get(f"{endpoint}{path}", timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                if response.status != 200:
                    raise _status_error(endpoint, response.status, await response.read())
                data = _object(endpoint, await response.read())
        except asyncio.TimeoutError:
            raise BackendError(f"{endpoint}{path} did not answer within {timeout_s:g}s", retryable=True) from None
        except aiohttp.ClientError as exc:
            raise BackendError(
                f"{endpoint} unreachable: {type(exc).__name__}: {exc}", retryable=True,
                reached=not isinstance(exc, aiohttp.ClientConnectorError),
            ) from None
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
    out: dict[str, Any] = {}
    if options.temperature is not None:
        out["temperature"] = options.temperature
    if options.max_tokens is not None:
        out["num_predict"] = options.max_tokens
    if options.seed is not None:
        out["seed"] = options.seed
    return out


def new_session() -> aiohttp.ClientSession:
    """The worker's one HTTP session to every endpoint, able to report when a call is sent."""
    trace = aiohttp.TraceConfig()

    async def headers_sent(session: Any, context: SimpleNamespace, params: Any) -> None:
        on_sent = context.trace_request_ctx
        if callable(on_sent):
            on_sent()

    trace.on_request_headers_sent.append(headers_sent)
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), trace_configs=[trace])


async def generate(
    http: aiohttp.ClientSession,
    endpoint: str,
    model: str,
    prompt: str,
    system: str,
    options: InferenceOptions,
    timeout_s: float,
    on_chunk: OnChunk | None = None,
    on_sent: OnSent | None = None,
) -> Generation:
    """One call to ``{endpoint}/api/generate``; with ``on_chunk``, streamed chunk by chunk.

    ``on_sent`` is called when the request's headers went on the wire (a session from
    :func:`new_session` is needed for that).
    """
    body = {
        "model": model,
        "prompt": prompt,
        "system": system,
        "stream": on_chunk is not None,
        "options": ollama_options(options),
    }
    started = time.perf_counter()
    try:
        async with http.post(
            f"{endpoint}/api/generate", json=body, timeout=aiohttp.ClientTimeout(total=timeout_s),
            trace_request_ctx=on_sent,
        ) as response:
            if response.status != 200:
                raise _status_error(endpoint, response.status, await response.read())
            if on_chunk is None:
                data = _object(endpoint, await response.read())
                return _generation(endpoint, data, data.get("response"), started, None)
            return await _read_stream(endpoint, response, on_chunk, started)
    except asyncio.TimeoutError:
        raise BackendError(f"{endpoint} did not answer within {timeout_s:g}s", retryable=True) from None
    except aiohttp.ClientError as exc:
        raise BackendError(
            f"{endpoint} unreachable: {type(exc).__name__}: {exc}", retryable=True,
            reached=not isinstance(exc, aiohttp.ClientConnectorError),
        ) from None


async def _read_stream(
    endpoint: str, response: aiohttp.ClientResponse, on_chunk: OnChunk, started: float
) -> Generation:
    parts: list[str] = []
    ttft: float | None = None
    async for line in response.content:  # NDJSON: one object per line
        if not line.strip():
            continue
        data = _object(endpoint, line)
        if "error" in data:
            raise BackendError(f"{endpoint} failed mid-stream: {data['error']}", retryable=False)
        piece = data.get("response", "")
        if piece:
            if ttft is None:
                ttft = time.perf_counter() - started
            parts.append(piece)
            await on_chunk(piece)
        if data.get("done"):
            return _generation(endpoint, data, "".join(parts), started, ttft)
    raise BackendError(f"{endpoint} ended the stream without a final chunk", retryable=True)


def _object(endpoint: str, raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError:
        raise BackendError(f"{endpoint} answered with a non-JSON body", retryable=True) from None
    if not isinstance(data, dict):
        raise BackendError(f"{endpoint} answered with JSON that is not an object", retryable=True)
    return data


def _status_error(endpoint: str, status: int, raw: bytes) -> BackendError:
    try:
        reason = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        reason = None
    # 503 is Ollama's "server busy"; 429 and 5xx may pass on another endpoint.
    retryable = status in (408, 429) or status >= 500
    return BackendError(
        f"{endpoint} answered {status}: {reason or raw[:200].decode(errors='replace')!r}",
        retryable=retryable,
        busy=status == 429 or (status == 503 and "busy" in str(reason).lower()),
        # Ollama's 404 {"error": "model 'x' not found"} (newer: 'model "x" not found, try pulling it first').
        missing_model=status == 404 and "not found" in str(reason).lower(),
    )


def _generation(
    endpoint: str, data: dict[str, Any], text: Any, started: float, ttft: float | None
) -> Generation:
    if not isinstance(text, str):
        raise BackendError(f"{endpoint} answered without a 'response' text", retryable=True)
    return Generation(
        text=text,
        prompt_tokens=int(data.get("prompt_eval_count") or 0),
        completion_tokens=int(data.get("eval_count") or 0),
        done_reason=data.get("done_reason"),
        seconds=time.perf_counter() - started,
        ttft_s=ttft,
    )
