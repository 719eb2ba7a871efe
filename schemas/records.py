"""Typed views of the Avro records, with their JSON forms for HTTP and logs."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from .codec import Codec

Status = Literal["ok", "error"]


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

    def to_avro(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_avro(cls, value: dict[str, Any]) -> "InferenceRequest":
        return cls(
            id=value["id"],
            model_id=value["model_id"],
            input=value["input"],
            context=ModelContext(**value["context"]),
            options=InferenceOptions(**value["options"]),
            stream=value["stream"],
            created_at=value["created_at"],
        )

    def to_json(self) -> dict[str, Any]:
        out = self.to_avro()
        out["created_at"] = self.created_at.isoformat()
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

    def to_avro(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_avro(cls, value: dict[str, Any]) -> "InferenceResponse":
        fields = dict(value)
        fields["context"] = ModelContext(**fields["context"])
        return cls(**fields)

    def to_json(self) -> dict[str, Any]:
        out = self.to_avro()
        out["completed_at"] = self.completed_at.isoformat()
        return out


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
