"""Shared, pure rules of the drop-in APIs (Ollama's and OpenAI's): no I/O, no aiohttp.

How a call's HTTP headers become a model context, how a client's model name maps to a Nexus
model, and the pieces of a conversation both APIs share: images (base64 or ``data:`` URLs, with
their size limit), tools, tool call arguments, stop sequences, ``keep_alive``. Both API modules
use these, so the same call means the same request whichever API it came through. Values are
checked by :mod:`schemas.validation` against :mod:`schemas.limits`, as ``POST /infer`` and the
bridge check theirs. See ``docs/drop-in.md``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from schemas import INTERACTIVE, Message, ModelContext, Tool, new_id
from schemas import validation
from schemas.records import CachePolicy
from schemas.headers import PRIORITY_HEADER, QUEUE_MS_HEADER, TENANT_HEADER
from schemas.limits import MAX_SEED, MAX_TIMEOUT_MS, MIN_SEED
from schemas.validation import RejectedRequest, cache_policy, flag, number, session_id, timeout_ms
from schemas.validation import integer as _integer

__all__ = [
    "CACHE_HEADER", "IGNORED_HEADER", "META_PREFIX", "MAX_TIMEOUT_MS", "PRIORITY_HEADER", "QUEUE_MS_HEADER",
    "REQUEST_ID_HEADER", "SESSION_HEADER", "TENANT_HEADER", "TIMEOUT_HEADER", "CallContext", "DropInError", "arguments_text", "base64_image", "call_context",
    "canonical_model_name", "check_images", "data_url_image", "flag", "integer", "json_object", "json_text",
    "keep_alive", "last_user_text", "number", "require_model", "resolve_model", "stop_sequences", "tools",
    "unsupported",
]

SESSION_HEADER = "X-Nexus-Session"
META_PREFIX = "X-Nexus-Meta-"
TIMEOUT_HEADER = "X-Nexus-Timeout-Ms"
CACHE_HEADER = "X-Nexus-Cache"
REQUEST_ID_HEADER = "X-Nexus-Request-Id"
IGNORED_HEADER = "X-Nexus-Ignored"

ROLES = ("system", "user", "assistant", "tool")

# A call the drop-in APIs refuse: the one error type of every edge (status, message, and
# ``param``/``code`` that OpenAI's error shape reports). Each API renders it its own way.
DropInError = RejectedRequest


@dataclass(frozen=True)
class CallContext:
    """What a drop-in call says through Nexus's own headers."""

    context: ModelContext
    timeout_s: float  # how long the gateway waits for the answer
    cache: CachePolicy
    priority: str = INTERACTIVE  # X-Nexus-Priority
    tenant: str | None = None  # X-Nexus-Tenant, as given (the edge applies effective_tenant)


def call_context(headers: Iterable[tuple[str, str]], default_timeout_s: float) -> CallContext:
    """Read ``X-Nexus-Session``, ``X-Nexus-Meta-<key>``, ``X-Nexus-Timeout-Ms``, ``X-Nexus-Cache``,
    ``X-Nexus-Priority`` and ``X-Nexus-Tenant``.

    Header names are case-insensitive, so metadata keys are lower-cased: ``X-Nexus-Meta-User: alice``
    gives ``{"user": "alice"}``. Without a session header every call gets a fresh session. The
    values are checked as ``POST /infer`` checks ``context.session_id``, ``timeout_ms``, ``cache``,
    ``priority`` and ``tenant``.
    """
    session: str | None = None
    metadata: dict[str, str] = {}
    timeout_s = default_timeout_s
    cache: CachePolicy = "default"
    priority = INTERACTIVE
    tenant: str | None = None
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
        elif lower == PRIORITY_HEADER.lower():
            priority = _header(validation.priority, value, PRIORITY_HEADER)
        elif lower == TENANT_HEADER.lower():
            tenant = _header(validation.tenant, value, TENANT_HEADER)
    return CallContext(ModelContext(session or new_id(), metadata), timeout_s, cache, priority, tenant)


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


# --------------------------------------------------------------------------- conversations


def json_text(value: Any, name: str) -> str:
    """``value`` as compact JSON text, keys in the client's order (a schema's property order
    is the order a constrained model writes them); 400 for NaN or infinities, which JSON lacks."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:
        raise DropInError(400, f"'{name}' holds a number JSON cannot carry (NaN or infinity)", param=name) from None


def json_object(value: Any, name: str) -> str:
    """A JSON object (a schema, a tool's parameters) as text; 400 for anything else."""
    if not isinstance(value, dict):
        raise DropInError(400, f"'{name}' must be a JSON object", param=name)
    return json_text(value, name)


def arguments_text(value: Any, name: str) -> str:
    """A tool call's arguments as a JSON object's text, from an object (Ollama) or its text (OpenAI).

    Text is kept as the client sent it when it is a JSON object; absent or empty means ``{}``.
    """
    if value is None or value == "":
        return "{}"
    if isinstance(value, dict):
        return json_text(value, name)
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            parsed = None
        if isinstance(parsed, dict):
            return value
    raise DropInError(400, f"'{name}' must be a JSON object (or its text)", param=name)


def base64_image(value: Any, name: str) -> bytes:
    """An image as Ollama carries it, base64 text, decoded to the file's bytes; 400 if it is not
    base64 or empty (:func:`schemas.validation.image`, as ``POST /infer`` checks its images)."""
    return validation.image(value, name)


def data_url_image(value: Any, name: str) -> bytes:
    """An image as OpenAI carries it, a ``data:<type>;base64,<data>`` URL, decoded to the file's bytes.

    Nexus does not fetch images: an http(s) URL is a 400 that says to send a data: URL.
    """
    if not isinstance(value, str) or not value:
        raise DropInError(400, f"'{name}' must be a URL string", param=name)
    if not value[:5].lower() == "data:":
        raise DropInError(
            400, f"'{name}': only data: URLs are supported (data:<type>;base64,<data>); Nexus does not fetch "
            "images from the web", param=name)
    header, comma, data = value[5:].partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise DropInError(400, f"'{name}' must be a base64 data: URL (data:<type>;base64,<data>)", param=name)
    return base64_image(data, name)


def check_images(messages: Iterable[Message]) -> None:
    """413 when the images of one request, decoded, are over :data:`schemas.limits.MAX_IMAGE_BYTES`
    in total: a request must fit one Kafka record (:func:`schemas.validation.check_images`)."""
    validation.check_images(sum(len(image) for message in messages for image in message.images))


def last_user_text(messages: Iterable[Message]) -> str:
    """A conversation's ``input``: the last user turn's text ('' without one), for the audit trail."""
    return next((m.content for m in reversed(list(messages)) if m.role == "user"), "")


def tools(value: Any, name: str = "tools") -> tuple[Tool, ...]:
    """``[{"type": "function", "function": {"name", "description", "parameters"}}]``, Ollama's and
    OpenAI's common shape; ``parameters`` (a JSON schema object) becomes its text."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise DropInError(400, f"'{name}' must be an array of tools", param=name)
    out = []
    for i, tool in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise DropInError(400, f"'{where}' must be a function tool: {{\"type\": \"function\", \"function\": "
                              "{...}}", param=where)
        function = tool.get("function")
        if not isinstance(function, dict):
            raise DropInError(400, f"'{where}.function' must be an object", param=f"{where}.function")
        tool_name = function.get("name")
        if not isinstance(tool_name, str) or not tool_name:
            raise DropInError(400, f"'{where}.function.name' must be a non-empty string",
                              param=f"{where}.function.name")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise DropInError(400, f"'{where}.function.description' must be a string",
                              param=f"{where}.function.description")
        parameters = function.get("parameters")
        out.append(Tool(tool_name, description or None,
                        "{}" if parameters is None else json_object(parameters, f"{where}.function.parameters")))
    return tuple(out)


# The same rules as POST /infer's: a value one edge accepts, every edge accepts.
stop_sequences = validation.stop  # a string or an array of non-empty strings
keep_alive = validation.keep_alive  # a Go duration ("5m", "0") or seconds (300 -> "300s"; negative -> "-1s")
