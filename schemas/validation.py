"""Turn a ``POST /infer`` JSON body into an :class:`InferenceRequest`, or say why not.

Also the field checks every edge shares: the drop-in Ollama and OpenAI APIs
(:mod:`producers.gateway.dropin`) and the websocket bridge's frames
(:mod:`consumers.bridge.frames`) check session ids, request ids, timeouts, cache
policies and options with these functions against :mod:`schemas.limits`, so the
same value is accepted or refused whichever edge it came through. Each check raises
:class:`RejectedRequest`; each edge renders it in its own error shape.

A conversation (``messages``), ``tools``, ``tool_choice``, ``format``, ``keep_alive`` and the
sampling ``options`` are checked here too (:func:`messages`, :func:`tools`, :func:`options`...),
for ``POST /infer``, the bridge's ``submit`` frame and ``nexus submit``'s JSON lines alike; the
images of one request are limited to :data:`~schemas.limits.MAX_IMAGE_BYTES` in total (413).
So are the scheduling fields ``priority`` (:func:`priority`) and ``tenant`` (:func:`tenant`);
:func:`effective_tenant` is the rule every edge applies to pick the tenant a request counts against.

Pure functions, no I/O: the HTTP layer maps :class:`RejectedRequest` to its status.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Collection, Sequence
from datetime import timedelta
from typing import Any, cast

from nexus.errors import NexusError
from schemas.limits import (
    MAX_ID_LENGTH,
    MAX_IMAGE_BYTES,
    MAX_SEED,
    MAX_SESSION_ID_LENGTH,
    MAX_TENANT_LENGTH,
    MAX_TIMEOUT_MS,
    MAX_TOKENS,
    MIN_SEED,
)
from schemas.records import (
    CACHE_POLICIES,
    CachePolicy,
    INTERACTIVE,
    PRIORITIES,
    InferenceOptions,
    InferenceRequest,
    Message,
    ModelContext,
    Tool,
    ToolCall,
    new_id,
    utcnow,
)

__all__ = [
    "MAX_ID_LENGTH",
    "MAX_SESSION_ID_LENGTH",
    "MAX_TIMEOUT_MS",
    "OPTION_FIELDS",
    "ROLES",
    "TOOL_CHOICES",
    "RejectedRequest",
    "answer_format",
    "cache_policy",
    "check_images",
    "effective_tenant",
    "flag",
    "identifier",
    "image",
    "integer",
    "json_object",
    "keep_alive",
    "last_user_text",
    "message",
    "messages",
    "metadata",
    "number",
    "options",
    "parse_infer_body",
    "parse_json",
    "priority",
    "request_from_json",
    "request_id",
    "session_id",
    "stop",
    "tenant",
    "text",
    "timeout_ms",
    "tool_call",
    "tool_choice",
    "tools",
]

_FIELDS = {"id", "model_id", "input", "messages", "tools", "tool_choice", "format", "keep_alive", "context",
           "options", "stream", "cache", "timeout_ms", "priority", "tenant"}
#: The keys of ``options`` (POST /infer, submit frames, ``nexus submit``); any other backend
#: option goes in ``options.extra``, an object passed to the backend as given.
OPTION_FIELDS = ("temperature", "max_tokens", "seed", "top_p", "top_k", "min_p", "stop", "num_ctx",
                 "repeat_penalty", "presence_penalty", "frequency_penalty", "extra")
_OPTION_FIELDS = set(OPTION_FIELDS)
#: The roles of a conversation's turns.
ROLES = ("system", "user", "assistant", "tool")
#: ``tool_choice`` besides a function's name.
TOOL_CHOICES = ("auto", "none", "required")
_MESSAGE_FIELDS = ("role", "content", "images", "tool_calls", "tool_name", "tool_call_id")
_TOOL_CALL_FIELDS = ("id", "type", "name", "arguments", "function")
_TOOL_CALL_FUNCTION_FIELDS = ("name", "arguments", "index")
_TOOL_FIELDS = ("type", "name", "description", "parameters", "function")
_TOOL_FUNCTION_FIELDS = ("name", "description", "parameters")
# A Go duration (Ollama's keep_alive): "5m", "1h30m", "-1s", "0".
_DURATION = re.compile(r"[-+]?(0|((\d+(\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h))+)")
_MAX_KEEP_ALIVE_LENGTH = 64


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


def cache_policy(value: Any, name: str = "cache") -> CachePolicy:
    """One of :data:`~schemas.records.CACHE_POLICIES`."""
    if value not in CACHE_POLICIES:
        raise RejectedRequest(400, f"'{name}' must be one of {list(CACHE_POLICIES)}", param=name)
    return cast(CachePolicy, str(value))


def priority(value: Any, name: str = "priority") -> str:
    """A scheduling class, one of :data:`~schemas.records.PRIORITIES`; absent (None) is interactive."""
    if value is None:
        return INTERACTIVE
    if value not in PRIORITIES:
        raise RejectedRequest(400, f"'{name}' must be one of {', '.join(PRIORITIES)}, got {value!r:.60}",
                              param=name)
    return str(value)


def tenant(value: Any, name: str = "tenant") -> str | None:
    """A tenant: 1 to :data:`~schemas.limits.MAX_TENANT_LENGTH` characters; absent (None) is None."""
    if value is None:
        return None
    return identifier(value, name, MAX_TENANT_LENGTH)


def effective_tenant(key_name: str | None, tenant: str | None, session_id: str) -> str:
    """Who a request counts against in fair sharing and limits: the API key's name when keys are
    on (so a client cannot pick another tenant's share), else the tenant it gave (body field or
    ``X-Nexus-Tenant``), else its session."""
    return key_name or tenant or session_id


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
    raw_turns = data.get("messages")
    turns = () if raw_turns is None or raw_turns == [] else messages(raw_turns)
    if turns:
        if data.get("input") not in (None, ""):
            raise RejectedRequest(
                400, "give 'input' (a prompt) or 'messages' (a conversation), not both: a conversation's "
                "prompt is its last user message", param="input")
        prompt = last_user_text(turns)
    else:
        if data.get("input") is None:
            raise RejectedRequest(400, "missing required field 'input' (a prompt), or give 'messages' "
                                  "(a conversation)", param="input")
        prompt = text(data.get("input"), "input", required=True)
    functions = tools(data.get("tools"))
    if functions and not turns:
        raise RejectedRequest(400, "'tools' need a conversation: send 'messages' (e.g. "
                              "[{\"role\": \"user\", \"content\": \"...\"}]) instead of 'input'", param="tools")
    choice = tool_choice(data.get("tool_choice"), functions)
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
        options=options(data.get("options")),
        stream=stream,
        created_at=created_at,
        cache=cache,
        deadline=None if timeout is None else created_at + timedelta(milliseconds=timeout_ms(timeout)),
        messages=turns,
        tools=functions,
        tool_choice=choice,
        format=answer_format(data.get("format")),
        keep_alive=keep_alive(data.get("keep_alive")),
        priority=priority(data.get("priority")),
        tenant=tenant(data.get("tenant")),
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


def options(value: Any, name: str = "options") -> InferenceOptions:
    """The sampling options: the keys of :data:`OPTION_FIELDS`; any other backend option goes in
    ``extra`` (an object, passed to the backend as given). An unknown key is a 400 naming them."""
    if value is None:
        return InferenceOptions()
    if not isinstance(value, dict):
        raise RejectedRequest(400, f"'{name}' must be an object", param=name)
    unknown = sorted(set(value) - _OPTION_FIELDS)
    if unknown:
        raise RejectedRequest(
            400, f"unknown option {unknown[0]!r}; allowed: {list(OPTION_FIELDS)} (give any other backend "
            f"option in '{name}.extra', an object passed to the backend as given)", param=f"{name}.{unknown[0]}")
    extra = json_object(value.get("extra"), f"{name}.extra")
    if extra is not None:
        named = sorted(set(extra) & _OPTION_FIELDS)
        if named:
            raise RejectedRequest(400, f"'{name}.extra.{named[0]}' is an option of its own: give it as "
                                  f"'{name}.{named[0]}'", param=f"{name}.extra.{named[0]}")
    return InferenceOptions(
        temperature=number(value.get("temperature"), f"{name}.temperature", 0, math.inf),
        max_tokens=integer(value.get("max_tokens"), f"{name}.max_tokens", 1, MAX_TOKENS),
        seed=integer(value.get("seed"), f"{name}.seed"),
        top_p=number(value.get("top_p"), f"{name}.top_p", 0, 1),
        top_k=integer(value.get("top_k"), f"{name}.top_k", 0, MAX_TOKENS),
        min_p=number(value.get("min_p"), f"{name}.min_p", 0, 1),
        stop=stop(value.get("stop"), f"{name}.stop"),
        num_ctx=integer(value.get("num_ctx"), f"{name}.num_ctx", 1, MAX_TOKENS),
        repeat_penalty=number(value.get("repeat_penalty"), f"{name}.repeat_penalty", 0, math.inf),
        presence_penalty=number(value.get("presence_penalty"), f"{name}.presence_penalty", -math.inf, math.inf),
        frequency_penalty=number(value.get("frequency_penalty"), f"{name}.frequency_penalty", -math.inf, math.inf),
        extra=_json_text(extra, f"{name}.extra") if extra else None,
    )


_options = options  # the name it had


def stop(value: Any, name: str = "stop") -> tuple[str, ...]:
    """Stop sequences: a string or a list of strings, none empty; absent is none."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise RejectedRequest(400, f"'{name}' must be a string or a list of strings", param=name)
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item:
            where = name if isinstance(value, str) else f"{name}[{i}]"
            raise RejectedRequest(400, f"'{where}' must be a non-empty string", param=where)
    return tuple(items)


# --------------------------------------------------------------------------- conversations


def _json_text(value: Any, name: str) -> str:
    """A JSON value as compact text (as the record keeps it); 400 if nested too deep to write."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except (RecursionError, ValueError):
        raise RejectedRequest(400, f"'{name}' is nested too deeply", param=name) from None


def _fields(value: Any, name: str, allowed: Sequence[str], what: str = "an object") -> dict[str, Any]:
    """``value`` as an object with only ``allowed`` keys; 400 naming the first other one."""
    if not isinstance(value, dict):
        raise RejectedRequest(400, f"'{name}' must be {what}", param=name)
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise RejectedRequest(400, f"unknown field '{name}.{unknown[0]}'; allowed: {list(allowed)}",
                              param=f"{name}.{unknown[0]}")
    return value


def _optional_text(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise RejectedRequest(400, f"'{name}' must be a string", param=name)
    return value


def json_object(value: Any, name: str, *, allow_text: bool = False) -> dict[str, Any] | None:
    """A JSON object (or, with ``allow_text``, a JSON object's text, as OpenAI sends tool call
    arguments); None when absent."""
    if value is None:
        return None
    if allow_text and isinstance(value, str):
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            raise RejectedRequest(400, f"'{name}' must be an object or a JSON object's text", param=name) from None
        value = parsed
    if not isinstance(value, dict):
        raise RejectedRequest(
            400, f"'{name}' must be an object" + (" or a JSON object's text" if allow_text else ""), param=name)
    return value


def image(value: Any, name: str) -> bytes:
    """An image: base64 text (a ``data:`` URL's too) of the file's bytes, not empty."""
    if not isinstance(value, str):
        raise RejectedRequest(400, f"'{name}' must be a base64 string of the image file", param=name)
    data = value
    if data.startswith("data:"):
        head, comma, rest = data.partition(",")
        if not comma or not head.endswith(";base64"):
            raise RejectedRequest(400, f"'{name}' is a data: URL without ';base64,'", param=name)
        data = rest
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RejectedRequest(400, f"'{name}' is not valid base64: {exc}", param=name) from None
    if not raw:
        raise RejectedRequest(400, f"'{name}' must not be empty", param=name)
    return raw


def check_images(total: int) -> None:
    """413 when the images of one request, decoded, total more than
    :data:`~schemas.limits.MAX_IMAGE_BYTES`: a request must fit one Kafka record."""
    if total > MAX_IMAGE_BYTES:
        raise RejectedRequest(
            413, f"images of this request total {total} bytes; the limit is {MAX_IMAGE_BYTES} "
            "(a request must fit one Kafka record)", param="images")


def tool_call(value: Any, name: str) -> ToolCall:
    """A call an assistant turn made: ``{"id"?, "name", "arguments"?}``, or Ollama's and OpenAI's
    ``{"id"?, "type"?: "function", "function": {"name", "arguments"?}}``. ``arguments`` is an
    object (or, as OpenAI sends it, a JSON object's text); absent, ``{}``."""
    data = _fields(value, name, _TOOL_CALL_FIELDS)
    if data.get("type") not in (None, "function"):
        raise RejectedRequest(400, f"'{name}.type' must be \"function\"", param=f"{name}.type")
    call_id = data.get("id")
    if call_id is not None:
        call_id = identifier(call_id, f"{name}.id")
    if "function" in data:
        if "name" in data or "arguments" in data:
            raise RejectedRequest(400, f"'{name}' gives 'function' and 'name'/'arguments': use one shape",
                                  param=name)
        where = f"{name}.function"
        data = _fields(data["function"], where, _TOOL_CALL_FUNCTION_FIELDS)
        index = data.get("index")
        if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
            raise RejectedRequest(400, f"'{where}.index' must be an integer", param=f"{where}.index")
    else:
        where = name
    function = identifier(data.get("name"), f"{where}.name")
    arguments = json_object(data.get("arguments"), f"{where}.arguments", allow_text=True)
    arguments_text = _json_text(arguments if arguments is not None else {}, f"{where}.arguments")
    return ToolCall(name=function, arguments=arguments_text, id=call_id)


def message(value: Any, name: str = "message") -> Message:
    """One turn: ``{"role", "content"?, "images"?, "tool_calls"?, "tool_name"?, "tool_call_id"?}``.

    ``content`` is text (null or absent is ""); ``images`` base64 strings (user turns);
    ``tool_calls`` :func:`tool_call` objects (assistant turns); ``tool_name`` and
    ``tool_call_id`` name the function and the call a ``tool`` turn answers.
    """
    data = _fields(value, name, _MESSAGE_FIELDS, "an object with a role and content")
    role = data.get("role")
    if role not in ROLES:
        raise RejectedRequest(400, f"'{name}.role' must be one of {list(ROLES)}, got {role!r}",
                              param=f"{name}.role")
    content = text(data.get("content"), f"{name}.content")
    raw_images = data.get("images")
    pictures: tuple[bytes, ...] = ()
    if raw_images is not None:
        if not isinstance(raw_images, list):
            raise RejectedRequest(400, f"'{name}.images' must be a list of base64 strings", param=f"{name}.images")
        pictures = tuple(image(v, f"{name}.images[{i}]") for i, v in enumerate(raw_images))
    raw_calls = data.get("tool_calls")
    calls: tuple[ToolCall, ...] = ()
    if raw_calls is not None:
        if not isinstance(raw_calls, list):
            raise RejectedRequest(400, f"'{name}.tool_calls' must be a list", param=f"{name}.tool_calls")
        if raw_calls and role != "assistant":
            raise RejectedRequest(400, f"'{name}.tool_calls': only an assistant turn calls tools, this is a "
                                  f"{role} turn", param=f"{name}.tool_calls")
        calls = tuple(tool_call(v, f"{name}.tool_calls[{i}]") for i, v in enumerate(raw_calls))
    tool_name = _optional_text(data.get("tool_name"), f"{name}.tool_name")
    tool_call_id = _optional_text(data.get("tool_call_id"), f"{name}.tool_call_id")
    for field, given in (("tool_name", tool_name), ("tool_call_id", tool_call_id)):
        if given is not None and role != "tool":
            raise RejectedRequest(400, f"'{name}.{field}' belongs to a tool turn (role \"tool\"), this is a "
                                  f"{role} turn", param=f"{name}.{field}")
    return Message(role=role, content=content, images=pictures, tool_calls=calls,
                   tool_name=tool_name or None, tool_call_id=tool_call_id or None)


def messages(value: Any, name: str = "messages") -> tuple[Message, ...]:
    """A conversation, oldest turn first: a non-empty list of :func:`message` objects. The images
    of all turns together are limited to :data:`~schemas.limits.MAX_IMAGE_BYTES` (413)."""
    if not isinstance(value, list) or not value:
        raise RejectedRequest(400, f"'{name}' must be a non-empty list of messages", param=name)
    turns = tuple(message(v, f"{name}[{i}]") for i, v in enumerate(value))
    check_images(sum(len(i) for m in turns for i in m.images))
    return turns


def last_user_text(turns: Sequence[Message]) -> str:
    """The text of the last user turn ("" when there is none): a conversation's ``input``."""
    return next((m.content for m in reversed(turns) if m.role == "user"), "")


def tools(value: Any, name: str = "tools") -> tuple[Tool, ...]:
    """Functions the model may call: ``{"name", "description"?, "parameters"?}`` or OpenAI's and
    Ollama's ``{"type": "function", "function": {...the same...}}``; ``parameters`` is a JSON
    schema object (absent: ``{}``). Names are unique. Absent or [] is none."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise RejectedRequest(400, f"'{name}' must be a list of functions", param=name)
    out: list[Tool] = []
    for i, item in enumerate(value):
        where = f"{name}[{i}]"
        data = _fields(item, where, _TOOL_FIELDS)
        if data.get("type") not in (None, "function"):
            raise RejectedRequest(400, f"'{where}.type' must be \"function\"", param=f"{where}.type")
        if "function" in data:
            if set(data) - {"type", "function"}:
                raise RejectedRequest(400, f"'{where}' gives 'function' and its fields beside it: use one shape",
                                      param=where)
            where = f"{where}.function"
            data = _fields(data["function"], where, _TOOL_FUNCTION_FIELDS)
        function = identifier(data.get("name"), f"{where}.name")
        if any(t.name == function for t in out):
            raise RejectedRequest(400, f"'{where}.name': two tools are named {function!r}", param=f"{where}.name")
        parameters = json_object(data.get("parameters"), f"{where}.parameters")
        out.append(Tool(name=function, description=_optional_text(data.get("description"), f"{where}.description"),
                        parameters=_json_text(parameters if parameters is not None else {}, f"{where}.parameters")))
    return tuple(out)


def tool_choice(value: Any, functions: Sequence[Tool], name: str = "tool_choice") -> str | None:
    """``"auto"``, ``"none"``, ``"required"`` or one of ``functions``' names (also OpenAI's
    ``{"type": "function", "function": {"name": ...}}``); only with tools."""
    if value is None:
        return None
    if isinstance(value, dict):
        data = _fields(value, name, ("type", "function"))
        if data.get("type") not in (None, "function"):
            raise RejectedRequest(400, f"'{name}.type' must be \"function\"", param=f"{name}.type")
        value = identifier(_fields(data.get("function"), f"{name}.function", ("name",)).get("name"),
                           f"{name}.function.name")
        if value in TOOL_CHOICES:
            raise RejectedRequest(400, f"'{name}.function.name' {value!r} is a tool_choice keyword, not a function",
                                  param=f"{name}.function.name")
    if not isinstance(value, str) or not value:
        raise RejectedRequest(400, f"'{name}' must be one of {list(TOOL_CHOICES)} or a tool's name", param=name)
    if not functions:
        raise RejectedRequest(400, f"'{name}' needs 'tools'", param=name)
    names = [t.name for t in functions]
    if value not in TOOL_CHOICES and value not in names:
        raise RejectedRequest(400, f"'{name}' must be one of {list(TOOL_CHOICES)} or a tool's name "
                              f"({names}), got {value!r}", param=name)
    return value


def answer_format(value: Any, name: str = "format") -> str | None:
    """The answer's form: ``"json"`` (any JSON) or a JSON schema object the answer must match,
    kept as the schema's text; absent (or "") is free text."""
    if value is None or value == "":
        return None
    if value == "json":
        return "json"
    if isinstance(value, dict):
        return _json_text(value, name)
    raise RejectedRequest(400, f"'{name}' must be \"json\" or a JSON schema object", param=name)


def keep_alive(value: Any, name: str = "keep_alive") -> str | None:
    """How long the backend keeps the model loaded, as Ollama takes it: a Go duration ("5m",
    "1h30m", "0"; negative: forever) or a number of seconds, also as text (kept as "<n>s", "-1s"
    for any negative); absent or "" is the backend's default."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and value != "0" and re.fullmatch(r"-?\d{1,12}", value):  # seconds, as text
        value = int(value)
    if isinstance(value, bool):
        raise RejectedRequest(400, f"'{name}' must be a duration such as \"5m\" or a number of seconds", param=name)
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise RejectedRequest(400, f"'{name}' must be a finite number of seconds", param=name)
        return "-1s" if value < 0 else f"{int(value)}s"
    if not isinstance(value, str) or len(value) > _MAX_KEEP_ALIVE_LENGTH or not _DURATION.fullmatch(value):
        raise RejectedRequest(400, f"'{name}' must be a duration such as \"5m\", \"1h30m\" or \"0\", or a "
                              "number of seconds", param=name)
    return value
