"""Typed views of the Avro records, with their JSON forms for HTTP and logs."""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass, field, fields
from functools import cache
from datetime import datetime, UTC
from typing import Any, Literal, TypeVar

from schemas.codec import Codec

Status = Literal["ok", "error", "expired", "cancelled"]
#: Scheduling classes (``InferenceRequest.priority``): interactive requests are dispatched before
#: batch ones, and batch requests travel on their own topic. A string on the wire, checked at the edges.
INTERACTIVE = "interactive"
BATCH = "batch"
PRIORITIES: tuple[str, ...] = (INTERACTIVE, BATCH)
CachePolicy = Literal["default", "no-cache", "no-store"]
CACHE_POLICIES: tuple[str, ...] = ("default", "no-cache", "no-store")
#: ``InferenceResponse.error_kind`` of an answer whose model is on no endpoint (a 404 at the edges).
MODEL_NOT_FOUND = "model_not_found"
#: ``InferenceResponse.error_kind`` of an answer the backend refused as a bad request (its 400:
#: tools for a model without tool support, a malformed schema): a 400 at the edges.
BAD_REQUEST = "bad_request"


R = TypeVar("R")


@cache
def _names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


@cache
def _name_set(cls: type) -> frozenset[str]:
    return frozenset(_names(cls))


def _known(cls: type, value: dict[str, Any]) -> dict[str, Any]:
    """The fields this code knows; a newer schema's extra fields are left out, not fatal."""
    names = _name_set(cls)
    return {k: v for k, v in value.items() if k in names}


def _build(cls: type[R], values: dict[str, Any]) -> R:
    """A frozen record of ``cls`` from decoded field values.

    A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``: for a
    request (25 fields and its options' 12) that cost as much as fastavro's decoding. Values
    decoded with the current schema have every field, so they are set at once; a field missing
    (a pinned, older reader schema) takes ``__init__``'s way, and its default.
    """
    if len(values) != len(_names(cls)):  # type: ignore[arg-type]  # a class is hashable
        return cls(**values)
    record = object.__new__(cls)
    record.__dict__.update(values)
    return record


def _plain(record: Any) -> dict[str, Any]:
    """A record as the dict fastavro writes, nested records included, values not copied.

    ``dataclasses.asdict`` deep-copies every value: it cost more CPU than the encoding.
    """
    out = {}
    kind: type = type(record)
    for name in _names(kind):
        value = getattr(record, name)
        if hasattr(value, "__dataclass_fields__"):
            value = _plain(value)
        elif type(value) is tuple:  # arrays: messages, tools, tool calls, images, stop
            value = [_plain(v) for v in value] if value and hasattr(value[0], "__dataclass_fields__") else list(value)
        out[name] = value
    return out


def _json_value(text: str) -> Any:
    """JSON text as its value, for the JSON forms; text that is not JSON stays text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def utcnow() -> datetime:
    """Now, at the millisecond precision Avro's timestamp-millis keeps."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class ModelContext:
    session_id: str
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def fresh(cls) -> ModelContext:
        return cls(session_id=new_id())


@dataclass(frozen=True)
class InferenceOptions:
    """How the model samples: what Ollama's ``options`` and OpenAI's body fields of the same name say.

    ``extra`` carries any other backend option as a JSON object's text, passed on as given.
    """

    temperature: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    stop: tuple[str, ...] = ()
    num_ctx: int | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    extra: str | None = None  # a JSON object, as text (v4)

    @classmethod
    def from_avro(cls, value: dict[str, Any]) -> InferenceOptions:
        known = _known(cls, value)
        known["stop"] = tuple(known.get("stop") or ())
        return _build(cls, known)


@dataclass(frozen=True)
class ToolCall:
    """A function the model asks the caller to run; ``arguments`` is a JSON object's text."""

    name: str
    arguments: str = "{}"
    id: str | None = None  # the backend's id (OpenAI); None from Ollama

    @classmethod
    def from_avro(cls, value: dict[str, Any]) -> ToolCall:
        return cls(**_known(cls, value))

    def to_json(self) -> dict[str, Any]:
        """Arguments as an object, as Ollama's API shows them."""
        return {"id": self.id, "name": self.name, "arguments": _json_value(self.arguments)}


@dataclass(frozen=True)
class Message:
    """One turn of a conversation: ``system``, ``user``, ``assistant`` or ``tool``."""

    role: str
    content: str = ""
    images: tuple[bytes, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    tool_name: str | None = None  # a tool turn: the function whose result it carries
    tool_call_id: str | None = None  # a tool turn: the call it answers (OpenAI)

    @classmethod
    def from_avro(cls, value: dict[str, Any]) -> Message:
        known = _known(cls, value)
        known["images"] = tuple(known.get("images") or ())
        known["tool_calls"] = tuple(ToolCall.from_avro(c) for c in known.get("tool_calls") or ())
        return cls(**known)

    def to_json(self) -> dict[str, Any]:
        """Images as base64 text, as Ollama's API carries them."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.images:
            out["images"] = [base64.b64encode(i).decode("ascii") for i in self.images]
        if self.tool_calls:
            out["tool_calls"] = [c.to_json() for c in self.tool_calls]
        if self.tool_name is not None:
            out["tool_name"] = self.tool_name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


@dataclass(frozen=True)
class Tool:
    """A function the model may call; ``parameters`` is a JSON schema's text."""

    name: str
    description: str | None = None
    parameters: str = "{}"

    @classmethod
    def from_avro(cls, value: dict[str, Any]) -> Tool:
        return cls(**_known(cls, value))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": _json_value(self.parameters)}


@dataclass(frozen=True)
class InferenceRequest:
    id: str
    model_id: str
    input: str
    context: ModelContext
    options: InferenceOptions = field(default_factory=InferenceOptions)
    stream: bool = False
    created_at: datetime = field(default_factory=utcnow)
    cache: CachePolicy = "default"
    deadline: datetime | None = None
    original_id: str | None = None
    reply_to: str | None = None
    key_name: str | None = None  # the submitting API key's name, set by the edge (never from the body)
    # v4: a conversation (to the backend's chat API) and what shapes its answer.
    messages: tuple[Message, ...] = ()
    tools: tuple[Tool, ...] = ()
    tool_choice: str | None = None  # auto, none, required, or a function's name
    format: str | None = None  # "json", or a JSON schema's text
    keep_alive: str | None = None
    # v5: scheduling. ``priority`` is one of PRIORITIES; ``tenant`` is set by the edge.
    priority: str = INTERACTIVE
    tenant: str | None = None

    def to_avro(self) -> dict[str, Any]:
        return _plain(self)

    @property
    def tenant_or_session(self) -> str:
        """Who the request counts against: its tenant, else its key's name, else its session
        (records older than v5 have no tenant)."""
        return self.tenant or self.key_name or self.context.session_id

    @classmethod
    def from_avro(cls, value: dict[str, Any]) -> InferenceRequest:
        known = _known(cls, value)
        known["context"] = _build(ModelContext, _known(ModelContext, known["context"]))
        known["options"] = InferenceOptions.from_avro(known["options"])
        known["messages"] = tuple(Message.from_avro(m) for m in known.get("messages") or ())
        known["tools"] = tuple(Tool.from_avro(t) for t in known.get("tools") or ())
        return _build(cls, known)

    @property
    def deterministic(self) -> bool:
        """Same input, same answer: temperature 0 or a fixed seed."""
        return self.options.temperature == 0 or self.options.seed is not None

    @property
    def is_chat(self) -> bool:
        """A conversation (sent to the chat API), not a prompt."""
        return bool(self.messages)

    def to_json(self) -> dict[str, Any]:
        out = self.to_avro()
        out["created_at"] = self.created_at.isoformat()
        out["deadline"] = self.deadline.isoformat() if self.deadline else None
        out["messages"] = [m.to_json() for m in self.messages]
        out["tools"] = [t.to_json() for t in self.tools]
        out["options"]["stop"] = list(self.options.stop)
        return out


@dataclass(frozen=True)
class InferenceResponse:
    id: str
    model_id: str
    status: Status
    context: ModelContext
    latency_ms: int
    completed_at: datetime
    output: str = ""
    error: str | None = None
    backend_latency_ms: int = 0
    endpoint: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    done_reason: str | None = None
    cached: bool = False
    time_to_first_token_ms: int | None = None
    retries: int = 0
    reply_to: str | None = None
    key_name: str | None = None  # copied from the request
    error_kind: str | None = None  # "model_not_found", or None (v4)
    tool_calls: tuple[ToolCall, ...] = ()  # v5: the assistant message is output plus these
    # v6: how long it waited in the worker's schedule, and the request's class and tenant.
    queue_ms: int = 0
    priority: str = INTERACTIVE
    tenant: str | None = None

    def to_avro(self) -> dict[str, Any]:
        return _plain(self)

    @classmethod
    def from_avro(cls, value: dict[str, Any]) -> InferenceResponse:
        known = _known(cls, value)
        known["context"] = ModelContext(**_known(ModelContext, known["context"]))
        known["tool_calls"] = tuple(ToolCall.from_avro(c) for c in known.get("tool_calls") or ())
        return cls(**known)

    @property
    def message(self) -> Message:
        """The assistant's turn: its text and the tool calls it asks for."""
        return Message("assistant", self.output, tool_calls=self.tool_calls)

    def to_json(self) -> dict[str, Any]:
        """With ``message``, the assistant turn in Ollama's shape (tool call arguments as objects)."""
        out = self.to_avro()
        out["completed_at"] = self.completed_at.isoformat()
        out["tool_calls"] = [c.to_json() for c in self.tool_calls]
        out["message"] = self.message.to_json()
        return out


@dataclass(frozen=True)
class InferenceToken:
    """A chunk of a streamed answer; a request's chunks in ``seq`` order make its output."""

    id: str
    model_id: str
    session_id: str
    seq: int
    text: str
    created_at: datetime = field(default_factory=utcnow)
    reply_to: str | None = None
    key_name: str | None = None  # copied from the request
    tool_calls: tuple[ToolCall, ...] = ()  # v3: tool calls streamed with this chunk

    def to_avro(self) -> dict[str, Any]:
        return _plain(self)

    @classmethod
    def from_avro(cls, value: dict[str, Any]) -> InferenceToken:
        known = _known(cls, value)
        known["tool_calls"] = tuple(ToolCall.from_avro(c) for c in known.get("tool_calls") or ())
        return cls(**known)

    def to_json(self) -> dict[str, Any]:
        out = self.to_avro()
        out["created_at"] = self.created_at.isoformat()
        out["tool_calls"] = [c.to_json() for c in self.tool_calls]
        return out


@dataclass(frozen=True)
class InferenceCancel:
    """A client asks to cancel request ``id``; whoever holds it drops it or aborts its call.

    ``key_name`` is set by the edge: a request submitted with a key is cancelled only by the same key.
    """

    id: str
    requested_at: datetime = field(default_factory=utcnow)
    reason: str = ""
    key_name: str | None = None

    def to_avro(self) -> dict[str, Any]:
        return _plain(self)

    @classmethod
    def from_avro(cls, value: dict[str, Any]) -> InferenceCancel:
        return cls(**_known(cls, value))

    def to_json(self) -> dict[str, Any]:
        out = self.to_avro()
        out["requested_at"] = self.requested_at.isoformat()
        return out


def encode_cancel(codec: Codec, cancel: InferenceCancel) -> bytes:
    return codec.encode("InferenceCancel", cancel.to_avro())


def decode_cancel(codec: Codec, data: bytes) -> InferenceCancel:
    _, value = codec.decode(data, expected="InferenceCancel")
    return InferenceCancel.from_avro(value)


def encode_token(codec: Codec, token: InferenceToken) -> bytes:
    return codec.encode("InferenceToken", token.to_avro())


def decode_token(codec: Codec, data: bytes) -> InferenceToken:
    _, value = codec.decode(data, expected="InferenceToken")
    return InferenceToken.from_avro(value)


def encode_request(codec: Codec, request: InferenceRequest) -> bytes:
    return codec.encode("InferenceRequest", request.to_avro())


def decode_request(codec: Codec, data: bytes) -> InferenceRequest:
    _, value = codec.decode(data, expected="InferenceRequest")
    return InferenceRequest.from_avro(value)


def encode_response(codec: Codec, response: InferenceResponse) -> bytes:
    return codec.encode("InferenceResponse", response.to_avro())


def decode_response(codec: Codec, data: bytes) -> InferenceResponse:
    _, value = codec.decode(data, expected="InferenceResponse")
    return InferenceResponse.from_avro(value)
