"""Turn a ``POST /infer`` JSON body into an :class:`InferenceRequest`, or say why not.

Also the field checks every edge shares: the drop-in Ollama and OpenAI APIs
(:mod:`producers.gateway.dropin`) and the websocket bridge's frames
(:mod:`consumers.bridge.frames`) check session ids, request ids, timeouts, cache
policies and options with these functions against :mod:`schemas.limits`, so the
same value is accepted or refused whichever edge it came through. Each check raises
:class:`RejectedRequest`; each edge renders it in its own error shape.

Pure functions, no I/O: the HTTP layer maps :class:`RejectedRequest` to its status.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from datetime import timedelta
from typing import Any

from nexus.errors import NexusError
from schemas.limits import MAX_ID_LENGTH, MAX_SEED, MAX_SESSION_ID_LENGTH, MAX_TIMEOUT_MS, MAX_TOKENS, MIN_SEED
from schemas.records import CACHE_POLICIES, InferenceOptions, InferenceRequest, ModelContext, new_id, utcnow

__all__ = [
    "MAX_ID_LENGTH",
    "MAX_SESSION_ID_LENGTH",
    "MAX_TIMEOUT_MS",
    "RejectedRequest",
    "cache_policy",
    "flag",
    "identifier",
    "integer",
    "metadata",
    "number",
    "parse_infer_body",
    "parse_json",
    "request_from_json",
    "request_id",
    "session_id",
    "text",
    "timeout_ms",
]

_FIELDS = {"id", "model_id", "input", "context", "options", "stream", "cache", "timeout_ms"}
_OPTION_FIELDS = {"temperature", "max_tokens", "seed"}


class RejectedRequest(NexusError, ValueError):
    """What a client sent cannot become a request; ``status`` is the HTTP status to answer.

    ``param`` names the offending field (OpenAI's error shape reports it) and ``code`` is a
    machine-readable code (``model_not_found``...); both are optional. Still a ``ValueError``,
    as callers have always caught it as one.
    """

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


# --------------------------------------------------------------------------- field checks


def parse_json(data: bytes | str, what: str = "body is not valid JSON") -> Any:
    """The JSON value of ``data``; 400 for invalid JSON, invalid UTF-8, nesting too deep to parse
    or an integer literal longer than Python converts (ValueError covers the first two and the last)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise RejectedRequest(400, f"{what}: {exc}") from None


def identifier(value: Any, name: str, max_length: int = MAX_ID_LENGTH) -> str:
    """A non-empty string of at most ``max_length`` characters."""
    if not isinstance(value, str) or not value:
        raise RejectedRequest(400, f"'{name}' must be a non-empty string", param=name)
    if len(value) > max_length:
        raise RejectedRequest(400, f"'{name}' is longer than {max_length} characters", param=name)
    return value


def session_id(value: Any, name: str = "session_id") -> str:
    """A session id: 1 to :data:`~schemas.limits.MAX_SESSION_ID_LENGTH` characters."""
    return identifier(value, name, MAX_SESSION_ID_LENGTH)


def request_id(value: Any, name: str = "id") -> str:
    """A request id: 1 to :data:`~schemas.limits.MAX_ID_LENGTH` characters."""
    return identifier(value, name, MAX_ID_LENGTH)


def metadata(value: Any, name: str = "metadata") -> dict[str, str]:
    """A model context's metadata: an object of string values."""
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise RejectedRequest(400, f"'{name}' must be an object of string values", param=name)
    return dict(value)


def timeout_ms(value: Any, name: str = "timeout_ms") -> int:
    """How long a request may take, in ms: an integer in [1, :data:`~schemas.limits.MAX_TIMEOUT_MS`]."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_TIMEOUT_MS:
        raise RejectedRequest(400, f"'{name}' must be an integer in [1, {MAX_TIMEOUT_MS}]", param=name)
    return value


def cache_policy(value: Any, name: str = "cache") -> str:
    """One of :data:`~schemas.records.CACHE_POLICIES`."""
    if value not in CACHE_POLICIES:
        raise RejectedRequest(400, f"'{name}' must be one of {list(CACHE_POLICIES)}", param=name)
    return str(value)


def text(value: Any, name: str, *, required: bool = False, allow_empty: bool = True) -> str:
    """A string field; absent (None) is '' unless ``required``."""
    if value is None:
        if required:
            raise RejectedRequest(400, f"missing required field '{name}'", param=name)
        return ""
    if not isinstance(value, str):
        raise RejectedRequest(400, f"'{name}' must be a string", param=name)
    if not value and not allow_empty:
        raise RejectedRequest(400, f"'{name}' must not be empty", param=name)
    return value


def flag(value: Any, name: str, default: bool) -> bool:
    """true or false; ``default`` when absent."""
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RejectedRequest(400, f"'{name}' must be true or false", param=name)
    return value


def number(value: Any, name: str, low: float, high: float) -> float | None:
    """A finite number in [low, high], or None when absent."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RejectedRequest(400, f"'{name}' must be a finite number", param=name)
    if not low <= value <= high:
        raise RejectedRequest(400, f"'{name}' must be in [{low:g}, {high:g}]", param=name)
    return float(value)


def integer(value: Any, name: str, low: int = MIN_SEED, high: int = MAX_SEED) -> int | None:
    """An integer in [low, high] (a signed 64-bit integer by default), or None when absent."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RejectedRequest(400, f"'{name}' must be an integer", param=name)
    if not low <= value <= high:
        raise RejectedRequest(400, f"'{name}' must be an integer in [{low}, {high}]", param=name)
    return value


# --------------------------------------------------------------------------- POST /infer


def parse_infer_body(body: bytes, known_models: Collection[str]) -> InferenceRequest:
    return request_from_json(parse_json(body), known_models)


def request_from_json(data: Any, known_models: Collection[str]) -> InferenceRequest:
    if not isinstance(data, dict):
        raise RejectedRequest(400, "body must be a JSON object")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise RejectedRequest(400, f"unknown field {unknown[0]!r}; allowed: {sorted(_FIELDS)}", param=unknown[0])
    model_id = text(data.get("model_id"), "model_id", required=True, allow_empty=False)
    prompt = text(data.get("input"), "input", required=True)
    given_id = data.get("id")
    stream = data.get("stream", False)  # null too is refused: the field is a boolean
    if not isinstance(stream, bool):
        raise RejectedRequest(400, "'stream' must be true or false", param="stream")
    cache = cache_policy(data.get("cache", "default"))
    timeout = data.get("timeout_ms")
    created_at = utcnow()
    request = InferenceRequest(
        id=new_id() if given_id is None else request_id(given_id),
        model_id=model_id,
        input=prompt,
        context=_context(data.get("context")),
        options=_options(data.get("options")),
        stream=stream,
        created_at=created_at,
        cache=cache,  # type: ignore[arg-type]
        deadline=None if timeout is None else created_at + timedelta(milliseconds=timeout_ms(timeout)),
    )
    if model_id not in known_models:
        raise RejectedRequest(404, f"unknown model {model_id!r}; known models: {sorted(known_models)}",
                              param="model_id", code="model_not_found")
    return request


def _context(value: Any) -> ModelContext:
    if value is None:
        return ModelContext.fresh()
    if not isinstance(value, dict):
        raise RejectedRequest(400, "'context' must be an object with session_id and metadata", param="context")
    unknown = sorted(set(value) - {"session_id", "metadata"})
    if unknown:
        raise RejectedRequest(400, f"unknown field 'context.{unknown[0]}'", param=f"context.{unknown[0]}")
    given = value.get("session_id")
    return ModelContext(
        session_id=new_id() if given is None else session_id(given, "context.session_id"),
        metadata=metadata(value.get("metadata", {}), "context.metadata"),
    )


def _options(value: Any) -> InferenceOptions:
    if value is None:
        return InferenceOptions()
    if not isinstance(value, dict):
        raise RejectedRequest(400, "'options' must be an object", param="options")
    unknown = sorted(set(value) - _OPTION_FIELDS)
    if unknown:
        raise RejectedRequest(400, f"unknown option {unknown[0]!r}; allowed: {sorted(_OPTION_FIELDS)}",
                              param=f"options.{unknown[0]}")
    return InferenceOptions(
        temperature=number(value.get("temperature"), "options.temperature", 0, math.inf),
        max_tokens=integer(value.get("max_tokens"), "options.max_tokens", 1, MAX_TOKENS),
        seed=integer(value.get("seed"), "options.seed"),
    )
