"""What both backends read out of a request's JSON texts, and write back as JSON texts. No I/O.

The wire record carries JSON as text (a tool's parameters, a call's arguments, a format's
schema, ``options.extra``) so Avro needs no open-ended type; an HTTP body needs the values.
A text that is not what it should be is the request's fault: :class:`Unsendable` says which,
and the backend answers it as a bad request without calling the endpoint.
"""

from __future__ import annotations

import json
from typing import Any

from nexus.errors import NexusError
from schemas import InferenceOptions, Tool, ToolCall
from streams.backends.base import BackendError
from streams.backends.http import ConnectError, HttpError

__all__ = [
    "Unsendable", "arguments_text", "extra_options", "json_object", "json_value", "keep_alive_value", "schema_of",
    "function_tool", "tool_call", "unreachable", "unsendable",
]


class Unsendable(NexusError, ValueError):
    """The request cannot be put in a body: the message says which field and why."""


def json_value(text: str, what: str) -> Any:
    """The value of JSON ``text``; :class:`Unsendable` naming ``what`` when it is not JSON."""
    try:
        return json.loads(text)
    except ValueError:
        raise Unsendable(f"{what} is not JSON: {text[:200]!r}") from None


def json_object(text: str, what: str) -> dict[str, Any]:
    value = json_value(text, what)
    if not isinstance(value, dict):
        raise Unsendable(f"{what} is not a JSON object: {text[:200]!r}")
    return value


def extra_options(options: InferenceOptions) -> dict[str, Any]:
    """``options.extra``: the backend options Nexus has no field for, as given."""
    return json_object(options.extra, "options.extra") if options.extra else {}


def schema_of(format_: str) -> dict[str, Any]:
    """A format that is not ``"json"``: the JSON schema its text holds."""
    return json_object(format_, "format (neither \"json\" nor a JSON schema)")


def keep_alive_value(text: str) -> str | int | float:
    """How long the backend keeps the model loaded: a number of seconds as a number (Ollama reads
    ``"-1"`` as no duration at all, ``-1`` as forever), a duration (``"5m"``) as text."""
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() else number


def arguments_text(value: Any) -> str:
    """A tool call's arguments as the JSON object text the records carry: Ollama sends an
    object, OpenAI a text (kept as sent: the caller parses what the model wrote)."""
    if isinstance(value, str):
        return value or "{}"
    if value is None:
        return "{}"
    return json.dumps(value, ensure_ascii=False)


def tool_call(function: Any, id_: Any = None) -> ToolCall | None:
    """A tool call from a ``{"name", "arguments"}`` object, or ``None`` when it names no function."""
    if not isinstance(function, dict):
        return None
    name = function.get("name")
    if not isinstance(name, str) or not name:
        return None
    return ToolCall(name, arguments_text(function.get("arguments")), id_ if isinstance(id_, str) and id_ else None)


def function_tool(tool: Tool) -> dict[str, Any]:
    """A tool as both APIs offer it: ``{"type": "function", "function": {name, description, parameters}}``."""
    function: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        function["description"] = tool.description
    function["parameters"] = json_object(tool.parameters, f"the parameters of tool {tool.name!r}")
    return {"type": "function", "function": function}


def unsendable(endpoint: str, exc: Unsendable) -> BackendError:
    """A request that cannot be put in a body: a bad request, and no call was made."""
    return BackendError(
        f"{endpoint} not called: {exc}", retryable=False, reached=False, bad_request=True, reason=str(exc)
    )


def unreachable(endpoint: str, exc: HttpError) -> BackendError:
    """A failed exchange (:mod:`streams.backends.http`): retryable; ``reached`` unless no
    connection was made, so the request reached no server."""
    return BackendError(f"{endpoint} unreachable: {type(exc).__name__}: {exc}", retryable=True,
                        reached=not isinstance(exc, ConnectError))
