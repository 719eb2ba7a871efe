"""Shared, pure rules of the drop-in APIs (Ollama's and OpenAI's): no I/O, no aiohttp.

How a call's HTTP headers become a model context, how a conversation becomes one
``input``, how a client's model name maps to a Nexus model. Both API modules use
these, so the same call means the same request whichever API it came through.
See ``docs/drop-in.md``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from schemas import CACHE_POLICIES, ModelContext, new_id

SESSION_HEADER = "X-Nexus-Session"
META_PREFIX = "X-Nexus-Meta-"
TIMEOUT_HEADER = "X-Nexus-Timeout-Ms"
CACHE_HEADER = "X-Nexus-Cache"
REQUEST_ID_HEADER = "X-Nexus-Request-Id"
IGNORED_HEADER = "X-Nexus-Ignored"

MAX_SESSION_LENGTH = 256
MAX_TIMEOUT_MS = 24 * 3600 * 1000
ROLES = ("system", "user", "assistant")
_INT64 = 2**63


class DropInError(ValueError):
    """A call the drop-in API refuses; each API renders it in its own error shape.

    ``param`` names the offending field (OpenAI reports it), ``code`` is OpenAI's
    machine-readable code (``model_not_found``, ``timeout``...).
    """

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


@dataclass(frozen=True)
class CallContext:
    """What a drop-in call says through Nexus's own headers."""

    context: ModelContext
    timeout_s: float  # how long the gateway waits for the answer
    cache: str


def call_context(headers: Iterable[tuple[str, str]], default_timeout_s: float) -> CallContext:
    """Read ``X-Nexus-Session``, ``X-Nexus-Meta-<key>``, ``X-Nexus-Timeout-Ms`` and ``X-Nexus-Cache``.

    Header names are case-insensitive, so metadata keys are lower-cased: ``X-Nexus-Meta-User: alice``
    gives ``{"user": "alice"}``. Without a session header every call gets a fresh session.
    """
    session: str | None = None
    metadata: dict[str, str] = {}
    timeout_s = default_timeout_s
    cache = "default"
    prefix = META_PREFIX.lower()
    for name, value in headers:
        lower = name.lower()
        if lower == SESSION_HEADER.lower():
            if not value or len(value) > MAX_SESSION_LENGTH:
                raise DropInError(400, f"{SESSION_HEADER} must be 1 to {MAX_SESSION_LENGTH} characters")
            session = value
        elif lower.startswith(prefix):
            key = lower[len(prefix):]
            if not key:
                raise DropInError(400, f"{META_PREFIX}<key> needs a key after the prefix")
            if key in metadata:
                raise DropInError(400, f"metadata key {key!r} is given twice ({name})")
            metadata[key] = value
        elif lower == TIMEOUT_HEADER.lower():
            try:
                timeout_ms = int(value)
            except ValueError:
                timeout_ms = 0
            if not 0 < timeout_ms <= MAX_TIMEOUT_MS:
                raise DropInError(400, f"{TIMEOUT_HEADER} must be an integer in [1, {MAX_TIMEOUT_MS}]")
            timeout_s = timeout_ms / 1000
        elif lower == CACHE_HEADER.lower():
            if value not in CACHE_POLICIES:
                raise DropInError(400, f"{CACHE_HEADER} must be one of {list(CACHE_POLICIES)}")
            cache = value
    return CallContext(ModelContext(session or new_id(), metadata), timeout_s, cache)


def canonical_model_name(name: str) -> str:
    """Ollama treats ``x`` and ``x:latest`` as one model; compare names in this form."""
    name = name.strip().casefold()
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def resolve_model(requested: str, known: Collection[str]) -> str | None:
    """The Nexus model id a client's name means (exact, else ``:latest``-insensitive), or None."""
    if requested in known:
        return requested
    wanted = canonical_model_name(requested)
    return next((m for m in known if canonical_model_name(m) == wanted), None)


def render_conversation(turns: list[tuple[str, str]]) -> str:
    """The one ``input`` a conversation becomes; deterministic, documented in docs/drop-in.md.

    A single user turn is sent verbatim. Anything else becomes a transcript, one turn
    per line as ``role: "<content as a JSON string>"``, so a turn's content cannot
    forge another turn (its line breaks and quotes are escaped).
    """
    if len(turns) == 1 and turns[0][0] == "user":
        return turns[0][1]
    return "\n".join(f"{role}: {_json_string(content)}" for role, content in turns)


# json.dumps(ensure_ascii=False) leaves these Unicode line breaks raw; escaped, the string is
# the same value and every turn stays on one line.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _json_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False).translate(_LINE_BREAKS)


def require_model(
    body: Mapping[str, Any], known: Collection[str], key: str, missing: str,
    not_found: str = "model '{model}' not found",
) -> tuple[str, str]:
    """(the name as the client spelled it, the Nexus model id); 400 when absent, 404 when unknown."""
    requested = body.get(key)
    if not isinstance(requested, str) or not requested.strip():
        raise DropInError(400, missing, param=key)
    model_id = resolve_model(requested, known)
    if model_id is None:
        raise DropInError(404, not_found.format(model=requested), param=key, code="model_not_found")
    return requested, model_id


def number(value: Any, name: str, low: float, high: float) -> float | None:
    """A finite number in [low, high], or None when absent."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DropInError(400, f"'{name}' must be a number", param=name)
    if not low <= value <= high:
        raise DropInError(400, f"'{name}' must be in [{low:g}, {high:g}]", param=name)
    return float(value)


def integer(value: Any, name: str, low: int = -_INT64, high: int = _INT64 - 1) -> int | None:
    """An integer in [low, high] (a whole float such as 5.0 counts), or None when absent."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DropInError(400, f"'{name}' must be an integer", param=name)
    if not low <= value <= high:
        raise DropInError(400, f"'{name}' must be an integer in [{low}, {high}]", param=name)
    return value


def flag(value: Any, name: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise DropInError(400, f"'{name}' must be true or false", param=name)
    return value


def unsupported(name: str, why: str = "") -> DropInError:
    """The 400 for a feature Nexus cannot honour; better refused than silently dropped."""
    return DropInError(400, f"'{name}' is not supported by Nexus{': ' + why if why else ''}", param=name)
