"""The conversation fields of Ollama's API, read and answered the way Ollama 0.17.4 does.

Ollama binds a request body into Go structs (``api.ChatRequest``, ``api.GenerateRequest``), so a
field of the wrong JSON type is a 400 naming the Go type; model options are checked later (a 500,
``option "stop" must be of type array``), and ``format`` later still, when the runner starts
(500, ``invalid format: ...`` or ``invalid JSON schema in format``). The simulator gives the same
statuses and texts, so Nexus is tested against the errors it will meet.

Then the answer, deterministic: a tool call when tools are offered and the user spoke last, the
tool's result repeated when a tool spoke last, otherwise the usual echo; ``format`` turns the text
into JSON. Pure functions, no I/O; the HTTP shell is ``localdev.simulator.server``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from localdev.simulator.model import ApiError, last_user_content, reply_text, tokenize
from localdev.simulator.schema import minimal_instance, schema_problem

ANSWER_KEY = "answer"
"""JSON mode answers ``{"answer": <the text>}``: an object, as Ollama's JSON grammar demands."""

INVALID_SCHEMA_ERROR = "invalid JSON schema in format"

# api.Options (and its embedded api.Runner) of Ollama 0.17.4: the JSON kind each option must have.
OPTION_KINDS: dict[str, str] = {
    **dict.fromkeys(
        ("num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx", "num_batch",
         "num_gpu", "main_gpu", "num_thread"),
        "integer",
    ),
    **dict.fromkeys(
        ("top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty",
         "frequency_penalty"),
        "float32",
    ),
    "stop": "array",
    "use_mmap": "boolean",
}

_GO_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_DURATION_PART = re.compile(r"(\d*)(\.\d*)?")
_BASE64_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


# --------------------------------------------------------------------------- Go's binding errors


def json_kind(value: Any) -> str:
    """The JSON type name Go's encoding/json uses in its errors ("number", "object"...)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def unmarshal_error(value: Any, field: str, go_type: str) -> ApiError:
    """Ollama's 400 for a field of the wrong type, word for word as encoding/json says it."""
    return ApiError(
        400, f"json: cannot unmarshal {json_kind(value)} into Go struct field {field} of type {go_type}"
    )


def go_quote(text: str) -> str:
    """Go's %q of a string (close enough: JSON string escaping, non-ASCII kept)."""
    return json.dumps(text, ensure_ascii=False)


# --------------------------------------------------------------------------- scalar fields


def keep_alive_seconds(value: Any) -> float | None:
    """``keep_alive`` as Ollama's api.Duration reads it: seconds, or a Go duration string.

    None when absent; a negative value means "forever" (returned as ``inf``). A bad value is
    Ollama's 400 with Go's own message (``time: missing unit in duration "5"``).
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        go_type = {"bool": "bool", "array": "[]interface {}", "object": "map[string]interface {}"}
        raise ApiError(400, f"Unsupported type: '{go_type[json_kind(value)]}'")
    if isinstance(value, str):
        seconds = go_duration_seconds(value)
    else:
        seconds = float(value)
    return float("inf") if seconds < 0 else seconds


def go_duration_seconds(text: str) -> float:
    """Go's time.ParseDuration ("1h30m", "250ms", "0"), raising ApiError 400 with its message."""
    quoted = go_quote(text)
    rest, sign = text, 1.0
    if rest[:1] in ("+", "-"):
        sign = -1.0 if rest[0] == "-" else 1.0
        rest = rest[1:]
    if rest == "0":
        return 0.0
    if not rest:
        raise ApiError(400, f"time: invalid duration {quoted}")
    total = 0.0
    while rest:
        number = _GO_DURATION_PART.match(rest)
        assert number is not None  # the pattern matches the empty string
        whole, fraction = number.group(1), number.group(2) or ""
        if not whole and len(fraction) < 2:
            raise ApiError(400, f"time: invalid duration {quoted}")
        rest = rest[number.end():]
        unit = re.match(r"[^\d.]*", rest).group(0)  # type: ignore[union-attr]
        if not unit:
            raise ApiError(400, f"time: missing unit in duration {quoted}")
        if unit not in _GO_DURATION_UNITS:
            raise ApiError(400, f"time: unknown unit {go_quote(unit)} in duration {quoted}")
        total += float((whole or "0") + fraction) * _GO_DURATION_UNITS[unit]
        rest = rest[len(unit):]
    return sign * total


def decode_image(value: Any, field: str) -> bytes:
    """One base64 image (api.ImageData): 400 naming the first bad byte, as Go's decoder does."""
    if not isinstance(value, str):
        raise unmarshal_error(value, field, "api.ImageData")
    text = value.replace("\r", "").replace("\n", "")
    for index, char in enumerate(text):
        if char not in _BASE64_ALPHABET and char != "=":
            raise ApiError(400, f"illegal base64 data at input byte {index}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"illegal base64 data at input byte {max(len(text) - 1, 0)}") from None


def images(value: Any, field: str) -> list[bytes]:
    """A message's (or generate's) ``images``: a list of base64 strings, decoded."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise unmarshal_error(value, field, "[]api.ImageData")
    return [decode_image(item, field) for item in value]


def thinking_refused(model: str, think: Any) -> ApiError | None:
    """Simulated models do not think: ``think: true`` is Ollama's 400 for such a model."""
    if think is True or (isinstance(think, str) and think):
        return ApiError(400, f"{go_quote(model)} does not support thinking")
    return None


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Options:
    """The options that change the simulated answer; the others are checked, then ignored."""

    num_predict: int | None = None
    stop: tuple[str, ...] = ()


def options_object(body: Mapping[str, Any], struct: str) -> dict[str, Any]:
    """``options`` as bound (a 400 if it is not a JSON object); their values are checked later."""
    value = body.get("options")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise unmarshal_error(value, f"{struct}.options", "map[string]interface {}")
    return value


def parse_options(options: Mapping[str, Any]) -> Options:
    """Check each known option's type like api.Options.FromMap (Ollama answers a mistake with 500).

    Unknown options are ignored, as Ollama only logs them. Numbers are cut to integers where Go
    does (``num_predict: 3.7`` is 3).
    """
    for key, value in options.items():
        kind = OPTION_KINDS.get(key)
        if kind is None or value is None:
            continue
        if not _has_kind(value, kind):
            raise ApiError(500, f"option {go_quote(key)} must be of type {kind}")
        if kind == "array" and not all(isinstance(item, str) for item in value):
            raise ApiError(500, f"option {go_quote(key)} must be of an array of strings")
    num_predict = options.get("num_predict")
    return Options(
        num_predict=int(num_predict) if num_predict is not None else None,
        stop=tuple(options.get("stop") or ()),
    )


def _has_kind(value: Any, kind: str) -> bool:
    if kind in ("integer", "float32"):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "array":
        return isinstance(value, list)
    return isinstance(value, bool)


# --------------------------------------------------------------------------- format


@dataclass(frozen=True)
class AnswerFormat:
    """What ``format`` asks for: any JSON object (``schema`` None, "json") or an instance of a schema."""

    schema: Mapping[str, Any] | None = None


def parse_format(value: Any) -> AnswerFormat | None:
    """Ollama's reading of ``format`` (llm/server.go, Completion): None for free text.

    Absent, null and "" mean no format; "json" is JSON mode; an object is a schema the grammar
    converter must understand. Anything else is Ollama's 500, word for word.
    """
    if value is None or value == "":
        return None
    if value == "json":
        return AnswerFormat()
    if not isinstance(value, dict):
        raw = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        raise ApiError(
            500, f'invalid format: {go_quote(raw)}; expected "json" or a valid JSON Schema object'
        )
    if schema_problem(value) is not None:
        raise ApiError(500, INVALID_SCHEMA_ERROR)
    return AnswerFormat(schema=value)


def formatted(text: str, answer_format: AnswerFormat | None) -> str:
    """The text of the answer in the requested format (JSON written with spaces, as models do)."""
    if answer_format is None:
        return text
    if answer_format.schema is None:
        return json.dumps({ANSWER_KEY: text}, ensure_ascii=False)
    return json.dumps(minimal_instance(answer_format.schema), ensure_ascii=False)


# --------------------------------------------------------------------------- messages and tools


def messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``messages`` checked like api.Message binds (roles lower-cased as Ollama does).

    A missing role or content is "" (Go's zero value); a value of the wrong type is the 400 Go
    gives. Images are checked as base64; an assistant's tool calls need object arguments.
    """
    value = body.get("messages")
    if value is None:
        return []
    if not isinstance(value, list):
        raise unmarshal_error(value, "ChatRequest.messages", "[]api.Message")
    checked = []
    for message in value:
        if not isinstance(message, dict):
            raise unmarshal_error(message, "ChatRequest.messages", "api.Message")
        for key in ("role", "content", "tool_name", "tool_call_id", "thinking"):
            if message.get(key) is not None and not isinstance(message[key], str):
                raise unmarshal_error(message[key], f"ChatRequest.messages.{key}", "string")
        images(message.get("images"), "ChatRequest.messages.images")
        _tool_calls(message.get("tool_calls"))
        checked.append({**message, "role": str(message.get("role") or "").lower()})
    return checked


def _tool_calls(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, list):
        raise unmarshal_error(value, "ChatRequest.messages.tool_calls", "[]api.ToolCall")
    for call in value:
        if not isinstance(call, dict):
            raise unmarshal_error(call, "ChatRequest.messages.tool_calls", "api.ToolCall")
        function = call.get("function", {})
        if not isinstance(function, dict):
            raise unmarshal_error(function, "ChatRequest.messages.tool_calls.function", "api.ToolCallFunction")
        if function.get("name") is not None and not isinstance(function["name"], str):
            raise unmarshal_error(function["name"], "ChatRequest.messages.tool_calls.function.name", "string")
        arguments = function.get("arguments")
        if arguments is not None and not isinstance(arguments, dict):
            # Ollama's ordered map refuses anything but an object; a JSON text is the usual mistake.
            raise ApiError(400, "tool call arguments must be a JSON object, not " + json_kind(arguments))


def tools(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``tools`` as api.Tools binds: a list of {"type", "function": {"name", "parameters": {...}}}."""
    value = body.get("tools")
    if value is None:
        return []
    if not isinstance(value, list):
        raise unmarshal_error(value, "ChatRequest.tools", "api.Tools")
    for tool in value:
        if not isinstance(tool, dict):
            raise unmarshal_error(tool, "ChatRequest.tools", "api.Tool")
        function = tool.get("function", {})
        if not isinstance(function, dict):
            raise unmarshal_error(function, "Tool.tools.function", "api.ToolFunction")
        for key in ("name", "description"):
            if function.get(key) is not None and not isinstance(function[key], str):
                raise unmarshal_error(function[key], f"ToolFunction.tools.function.{key}", "string")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise unmarshal_error(
                parameters, "ToolFunction.tools.function.parameters", "api.ToolFunctionParameters"
            )
    return value


def tool_call(name: str, arguments: Mapping[str, Any], index: int, salt: str) -> dict[str, Any]:
    """One tool call as Ollama 0.17.4 answers it (api.ToolCall): id, function{index, name, arguments}.

    Ollama's id is "call_" and 8 random [a-z0-9]; here it is derived from ``salt`` (the
    conversation) so answers repeat, and starts with "sim" so it reads as simulated.
    """
    digest = hashlib.sha256(f"{salt}\0{index}\0{name}".encode()).hexdigest()
    return {
        "id": f"call_sim{digest[:5]}",
        "function": {"index": index, "name": name, "arguments": dict(arguments)},
    }


# --------------------------------------------------------------------------- answers


@dataclass(frozen=True)
class Answer:
    """What the simulated model says: text (as tokens, streamed one per chunk) or tool calls.

    Each tool call goes whole in a chunk of its own, with content "", as Ollama streams them.
    """

    tokens: tuple[str, ...]
    tool_calls: tuple[dict[str, Any], ...] = ()
    done_reason: str = "stop"

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def eval_count(self) -> int:
        """Tokens "generated": the text's, plus each tool call's JSON as the model would write it."""
        return len(self.tokens) + sum(len(tokenize(json.dumps(c["function"]))) for c in self.tool_calls)


def text_answer(text: str, answer_format: AnswerFormat | None, options: Options) -> Answer:
    """Format the text, cut it at the first stop sequence ("stop"), then at num_predict ("length")."""
    text = formatted(text, answer_format)
    for stop in options.stop:
        if stop and stop in text:
            text = text[: text.index(stop)]
    tokens = tokenize(text)
    limit = options.num_predict
    if limit is not None and 0 < limit < len(tokens):
        return Answer(tuple(tokens[:limit]), done_reason="length")
    return Answer(tuple(tokens))


def conversation_reply(model: str, turns: Sequence[Mapping[str, Any]]) -> str:
    """The text answer to a conversation: the tool's result if a tool spoke last, else the echo.

    The echo repeats the last user turn (``[simulated m] You said: ...``), never the system prompt,
    so a test can tell the roles apart in the answer.
    """
    if turns and turns[-1].get("role") == "tool":
        return f"[simulated {model}] The tool said: {turns[-1].get('content') or ''}"
    return reply_text(model, last_user_content(list(turns)))


def chat_answer(
    model: str,
    turns: Sequence[Mapping[str, Any]],
    offered: Sequence[Mapping[str, Any]],
    answer_format: AnswerFormat | None,
    options: Options,
) -> Answer:
    """The simulated model's turn in a chat.

    With tools offered and the user speaking last, it calls the first tool with a minimal instance
    of that tool's parameters (content "", done_reason "stop", not cut by num_predict: a cut call is
    no call); otherwise it answers text (see :func:`conversation_reply`), formatted as asked.
    """
    if offered and turns and turns[-1].get("role") == "user":
        function = offered[0].get("function") or {}
        parameters = function.get("parameters") or {}
        salt = json.dumps([model, list(turns)], sort_keys=True, default=str)
        arguments = minimal_instance(parameters) if parameters else {}
        call = tool_call(str(function.get("name") or ""), arguments if isinstance(arguments, dict) else {}, 0, salt)
        return Answer((), (call,), "stop")
    return text_answer(conversation_reply(model, turns), answer_format, options)


def generate_answer(
    model: str, prompt: str, answer_format: AnswerFormat | None, options: Options
) -> Answer:
    """/api/generate's answer: the echo of the prompt (never of ``system``), formatted as asked."""
    return text_answer(reply_text(model, prompt), answer_format, options)


def history_texts(turns: Sequence[Mapping[str, Any]]) -> list[str]:
    """Everything a chat template would feed the model, for prompt_eval_count."""
    texts = []
    for turn in turns:
        texts.append(str(turn.get("content") or ""))
        for call in turn.get("tool_calls") or []:
            texts.append(json.dumps(call.get("function") or {}))
    return texts
