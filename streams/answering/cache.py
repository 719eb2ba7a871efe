"""Response cache policy: what is cached, under which key, until when. No I/O.

The entries live in a Faust table (see :mod:`streams.app`), so they survive
restarts through its changelog; this module only decides.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from nexus.settings import ModelSettings
from schemas import InferenceRequest


@dataclass(frozen=True)
class CacheEntry:
    output: str
    prompt_tokens: int
    completion_tokens: int
    done_reason: str | None
    endpoint: str | None
    expires_at: float  # epoch seconds

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "CacheEntry":
        return cls(**json.loads(data))

    def fresh(self, now: float) -> bool:
        return now < self.expires_at


def cache_key(request: InferenceRequest) -> bytes:
    """Model, prompt, context and options: everything that shapes the answer."""
    material = json.dumps(
        [
            request.model_id,
            request.input,
            request.context.session_id,
            sorted(request.context.metadata.items()),
            [request.options.temperature, request.options.max_tokens, request.options.seed],
        ],
        ensure_ascii=False,
    )
    return hashlib.sha256(material.encode()).hexdigest().encode()


def should_look_up(request: InferenceRequest, model: ModelSettings) -> bool:
    return model.cache != "off" and request.deterministic and request.cache != "no-cache"


def should_store(request: InferenceRequest, model: ModelSettings) -> bool:
    return model.cache != "off" and request.deterministic and request.cache != "no-store"


def shareable(request: InferenceRequest) -> bool:
    """Identical requests of one batch may share one backend call."""
    return request.deterministic and request.cache != "no-cache"


def chunks_of(text: str, words_per_chunk: int = 4) -> list[str]:
    """Split a cached answer into token-like chunks for streamed requests."""
    words = text.split(" ")
    pieces = [" ".join(words[i : i + words_per_chunk]) for i in range(0, len(words), words_per_chunk)]
    return [p if i == 0 else " " + p for i, p in enumerate(pieces)] or [""]
