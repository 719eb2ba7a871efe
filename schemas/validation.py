"""Turn a ``POST /infer`` JSON body into an :class:`InferenceRequest`, or say why not.

Pure functions, no I/O: the HTTP layer maps :class:`RejectedRequest` to its status.
"""

from __future__ import annotations

import json
import math
from datetime import timedelta
from collections.abc import Collection
from typing import Any

from schemas import CACHE_POLICIES, InferenceOptions, InferenceRequest, ModelContext, new_id, utcnow

MAX_ID_LENGTH = 256
_FIELDS = {"id", "model_id", "input", "context", "options", "stream", "cache", "timeout_ms"}
MAX_TIMEOUT_MS = 24 * 3600 * 1000
_OPTION_FIELDS = {"temperature", "max_tokens", "seed"}
_INT64 = 2**63


class RejectedRequest(ValueError):
    """The body cannot become a request; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_infer_body(body: bytes, known_models: Collection[str]) -> InferenceRequest:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise RejectedRequest(400, f"body is not valid JSON: {exc}") from None
    return request_from_json(data, known_models)


def request_from_json(data: Any, known_models: Collection[str]) -> InferenceRequest:
    if not isinstance(data, dict):
        raise RejectedRequest(400, "body must be a JSON object")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise RejectedRequest(400, f"unknown field {unknown[0]!r}; allowed: {sorted(_FIELDS)}")
    model_id = _string(data, "model_id", required=True)
    text = _string(data, "input", required=True, allow_empty=True)
    request_id = _string(data, "id", required=False) or new_id()
    if len(request_id) > MAX_ID_LENGTH:
        raise RejectedRequest(400, f"'id' is longer than {MAX_ID_LENGTH} characters")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise RejectedRequest(400, "'stream' must be true or false")
    cache = data.get("cache", "default")
    if cache not in CACHE_POLICIES:
        raise RejectedRequest(400, f"'cache' must be one of {list(CACHE_POLICIES)}")
    timeout_ms = data.get("timeout_ms")
    if timeout_ms is not None and (
        isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or not 0 < timeout_ms <= MAX_TIMEOUT_MS
    ):
        raise RejectedRequest(400, f"'timeout_ms' must be an integer in [1, {MAX_TIMEOUT_MS}]")
    created_at = utcnow()
    request = InferenceRequest(
        id=request_id,
        model_id=model_id,
        input=text,
        context=_context(data.get("context")),
        options=_options(data.get("options")),
        stream=stream,
        created_at=created_at,
        cache=cache,
        deadline=created_at + timedelta(milliseconds=timeout_ms) if timeout_ms else None,
    )
    if model_id not in known_models:
        raise RejectedRequest(404, f"unknown model {model_id!r}; known models: {sorted(known_models)}")
    return request


def _string(data: dict[str, Any], key: str, *, required: bool, allow_empty: bool = False) -> str:
    value = data.get(key)
    if value is None:
        if required:
            raise RejectedRequest(400, f"missing required field {key!r}")
        return ""
    if not isinstance(value, str):
        raise RejectedRequest(400, f"{key!r} must be a string")
    if not value and not allow_empty:
        raise RejectedRequest(400, f"{key!r} must not be empty")
    return value


def _context(value: Any) -> ModelContext:
    if value is None:
        return ModelContext.fresh()
    if not isinstance(value, dict):
        raise RejectedRequest(400, "'context' must be an object with session_id and metadata")
    unknown = sorted(set(value) - {"session_id", "metadata"})
    if unknown:
        raise RejectedRequest(400, f"unknown field 'context.{unknown[0]}'")
    session_id = value.get("session_id")
    if session_id is None:
        session_id = new_id()
    elif not isinstance(session_id, str) or not session_id:
        raise RejectedRequest(400, "'context.session_id' must be a non-empty string")
    metadata = value.get("metadata", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise RejectedRequest(400, "'context.metadata' must be an object of string values")
    return ModelContext(session_id=session_id, metadata=dict(metadata))


def _options(value: Any) -> InferenceOptions:
    if value is None:
        return InferenceOptions()
    if not isinstance(value, dict):
        raise RejectedRequest(400, "'options' must be an object")
    unknown = sorted(set(value) - _OPTION_FIELDS)
    if unknown:
        raise RejectedRequest(400, f"unknown option {unknown[0]!r}; allowed: {sorted(_OPTION_FIELDS)}")
    temperature = value.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise RejectedRequest(400, "'options.temperature' must be a number")
        if not math.isfinite(temperature) or temperature < 0:
            raise RejectedRequest(400, "'options.temperature' must be a finite number >= 0")
        temperature = float(temperature)
    max_tokens = _int_option(value, "max_tokens", 1, 2**31 - 1)
    seed = _int_option(value, "seed", -_INT64, _INT64 - 1)
    return InferenceOptions(temperature=temperature, max_tokens=max_tokens, seed=seed)


def _int_option(options: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = options.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RejectedRequest(400, f"'options.{key}' must be an integer in [{low}, {high}]")
    return value
