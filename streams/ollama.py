"""A thin client for Ollama's ``POST /api/generate`` (non-streaming)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx

from schemas import InferenceOptions


class BackendError(RuntimeError):
    """The model endpoint failed to answer; the message says how, for the response's error."""


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    done_reason: str | None
    seconds: float


def ollama_options(options: InferenceOptions) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if options.temperature is not None:
        out["temperature"] = options.temperature
    if options.max_tokens is not None:
        out["num_predict"] = options.max_tokens
    if options.seed is not None:
        out["seed"] = options.seed
    return out


async def generate(
    http: httpx.AsyncClient,
    endpoint: str,
    model: str,
    prompt: str,
    system: str,
    options: InferenceOptions,
    timeout_s: float,
) -> Generation:
    body = {
        "model": model,
        "prompt": prompt,
        "system": system,
        "stream": False,
        "options": ollama_options(options),
    }
    started = time.perf_counter()
    try:
        response = await http.post(f"{endpoint}/api/generate", json=body, timeout=timeout_s)
    except httpx.TimeoutException:
        raise BackendError(f"{endpoint} did not answer within {timeout_s:g}s") from None
    except httpx.HTTPError as exc:
        raise BackendError(f"{endpoint} unreachable: {type(exc).__name__}: {exc}") from None
    seconds = time.perf_counter() - started
    try:
        data = response.json()
    except ValueError:
        raise BackendError(
            f"{endpoint} answered {response.status_code} with a non-JSON body"
        ) from None
    if response.status_code != 200:
        reason = data.get("error") if isinstance(data, dict) else None
        raise BackendError(f"{endpoint} answered {response.status_code}: {reason or data!r}")
    if not isinstance(data, dict) or not isinstance(data.get("response"), str):
        raise BackendError(f"{endpoint} answered without a 'response' text")
    return Generation(
        text=data["response"],
        prompt_tokens=int(data.get("prompt_eval_count") or 0),
        completion_tokens=int(data.get("eval_count") or 0),
        done_reason=data.get("done_reason"),
        seconds=seconds,
    )
