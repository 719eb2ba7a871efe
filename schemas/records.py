"""Typed views of the Avro records, with their JSON forms for HTTP and logs."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, fields
from functools import cache
from datetime import datetime, timezone
from typing import Any, Literal

from schemas.codec import Codec

Status = Literal["ok", "error"]
CachePolicy = Literal["default", "no-cache", "no-store"]
CACHE_POLICIES: tuple[str, ...] = ("default", "no-cache", "no-store")
#: ``InferenceResponse.error_kind`` of an answer whose model is on no endpoint (a 404 at the edges).
MODEL_NOT_FOUND = "model_not_found"


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


def _plain(record: Any) -> dict[str, Any]:
    """A record as the dict fastavro writes, nested records included, values not copied.

    ``dataclasses.asdict`` deep-copies every value: it cost more CPU than the encoding.
    """
    out = {}
    for name in _names(type(record)):
        value = getattr(record, name)
        out[name] = _plain(value) if hasattr(value, "__dataclass_fields__") else value
    return out


def utcnow() -> datetime:
    """Now, at the millisecond precision Avro's timestamp-millis keeps."""
    now = datetime.now(timezone.utc)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class ModelContext:
    session_id: str
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def fresh(cls) -> "ModelContext":
        return cls(session_id=new_id())


@dataclass(frozen=True)
class InferenceOptions:
    temperature: float | None = None
    max_tokens: int | None = None
    seed: int | None = None


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

    def to_avro(self) -> dict[str, Any]:
        return _plain(self)

    @classmethod
    def from_avro(cls, value: dict[str, Any]) -> "InferenceRequest":
        known = _known(cls, value)
        known["context"] = ModelContext(**_known(ModelContext, known["context"]))
        known["options"] = InferenceOptions(**_known(InferenceOptions, known["options"]))
        return cls(**known)

    @property
    def deterministic(self) -> bool:
        """Same input, same answer: temperature 0 or a fixed seed."""
        return self.options.temperature == 0 or self.options.seed is not None

    def to_json(self) -> dict[str, Any]:
        out = self.to_avro()
        out["created_at"] = self.created_at.isoformat()
        out["deadline"] = self.deadline.isoformat() if self.deadline else None
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

    def to_avro(self) -> dict[str, Any]:
        return _plain(self)

    @classmethod
    def from_avro(cls, value: dict[str, Any]) -> "InferenceResponse":
        known = _known(cls, value)
        known["context"] = ModelContext(**_known(ModelContext, known["context"]))
        return cls(**known)

    def to_json(self) -> dict[str, Any]:
        out = self.to_avro()
        out["completed_at"] = self.completed_at.isoformat()
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

    def to_avro(self) -> dict[str, Any]:
        return _plain(self)

    @classmethod
    def from_avro(cls, value: dict[str, Any]) -> "InferenceToken":
        return cls(**_known(cls, value))

    def to_json(self) -> dict[str, Any]:
        out = self.to_avro()
        out["created_at"] = self.created_at.isoformat()
        return out


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
