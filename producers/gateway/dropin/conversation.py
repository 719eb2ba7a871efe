"""Shared, pure rules of the drop-in APIs (Ollama's and OpenAI's): no I/O, no aiohttp.

How a call's HTTP headers become a model context, how a conversation becomes one
``input``, how a client's model name maps to a Nexus model. Both API modules use
these, so the same call means the same request whichever API it came through.
Values are checked by :mod:`schemas.validation` against :mod:`schemas.limits`, as
``POST /infer`` and the bridge check theirs. See ``docs/drop-in.md``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from schemas import ModelContext, new_id
from schemas.limits import MAX_SEED, MAX_TIMEOUT_MS, MIN_SEED
from schemas.validation import RejectedRequest, cache_policy, flag, number, session_id, timeout_ms
from schemas.validation import integer as _integer

__all__ = [
    "CACHE_HEADER", "IGNORED_HEADER", "META_PREFIX", "MAX_TIMEOUT_MS", "REQUEST_ID_HEADER", "SESSION_HEADER",
    "TIMEOUT_HEADER", "CallContext", "DropInError", "call_context", "canonical_model_name", "flag", "integer",
    "number", "render_conversation", "require_model", "resolve_model", "unsupported",
]

SESSION_HEADER = "X-Nexus-Session"
META_PREFIX = "X-Nexus-Meta-"
TIMEOUT_HEADER = "X-Nexus-Timeout-Ms"
CACHE_HEADER = "X-Nexus-Cache"
REQUEST_ID_HEADER = "X-Nexus-Request-Id"
IGNORED_HEADER = "X-Nexus-Ignored"

ROLES = ("system", "user", "assistant")

# A call the drop-in APIs refuse: the one error type of every edge (status, message, and
# ``param``/``code`` that OpenAI's error shape reports). Each API renders it its own way.
DropInError = RejectedRequest


@dataclass(frozen=True)
class CallContext:
    """What a drop-in call says through Nexus's own headers."""

    context: ModelContext
    timeout_s: float  # how long the gateway waits for the answer
    cache: str


def call_context(headers: Iterable[tuple[str, str]], default_timeout_s: float) -> CallContext:
    """Read ``X-Nexus-Session``, ``X-Nexus-Meta-<key>``, ``X-Nexus-Timeout-Ms`` and ``X-Nexus-Cache``.

    Header names are case-insensitive, so metadata keys are lower-cased: ``X-Nexus-Meta-User: alice``
    gives ``{"user": "alice"}``. Without a session header every call gets a fresh session. The
    values are checked as ``POST /infer`` checks ``context.session_id``, ``timeout_ms`` and ``cache``.
    """
    session: str | None = None
    metadata: dict[str, str] = {}
    timeout_s = default_timeout_s
    cache = "default"
    prefix = META_PREFIX.lower()
    for name, value in headers:
        lower = name.lower()
        if lower == SESSION_HEADER.lower():
            session = _header(session_id, value, SESSION_HEADER)
        elif lower.startswith(prefix):
            key = lower[len(prefix):]
            if not key:
                raise DropInError(400, f"{META_PREFIX}<key> needs a key after the prefix")
            if key in metadata:
                raise DropInError(400, f"metadata key {key!r} is given twice ({name})")
            metadata[key] = value
        elif lower == TIMEOUT_HEADER.lower():
            timeout_s = _header(timeout_ms, _int_or_zero(value), TIMEOUT_HEADER) / 1000
        elif lower == CACHE_HEADER.lower():
            cache = _header(cache_policy, value, CACHE_HEADER)
    return CallContext(ModelContext(session or new_id(), metadata), timeout_s, cache)


def _header(check: Callable[[Any, str], Any], value: Any, header: str) -> Any:
    """A header checked by the shared rule; the error names the header but no body ``param``."""
    try:
        return check(value, header)
    except RejectedRequest as exc:
        raise DropInError(exc.status, exc.message) from None


def _int_or_zero(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        return 0  # out of range: refused with the range in the message


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


def integer(value: Any, name: str, low: int = MIN_SEED, high: int = MAX_SEED) -> int | None:
    """:func:`schemas.validation.integer`, except that a whole float such as 5.0 counts:
    Ollama's and OpenAI's clients may send JSON numbers that way."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return _integer(value, name, low, high)


def unsupported(name: str, why: str = "") -> DropInError:
    """The 400 for a feature Nexus cannot honour; better refused than silently dropped."""
    return DropInError(400, f"'{name}' is not supported by Nexus{': ' + why if why else ''}", param=name)
