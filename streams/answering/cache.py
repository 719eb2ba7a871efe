"""Response cache policy: what is cached, under which key, until when, and which entries to
delete now (:class:`CacheIndex`). No I/O.

The entries live in a Faust table (see :mod:`streams.app`), so they survive
restarts through its changelog; this module only decides.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

from nexus.settings import ModelSettings
from schemas import InferenceOptions, InferenceRequest, Message, ToolCall

# The options a key always had; any other option joins the key only when set (see cache_key).
_FIRST_OPTIONS = ("temperature", "max_tokens", "seed")


@dataclass(frozen=True)
class CacheEntry:
    output: str
    prompt_tokens: int
    completion_tokens: int
    done_reason: str | None
    endpoint: str | None
    expires_at: float  # epoch seconds
    tool_calls: tuple[ToolCall, ...] = ()  # the assistant message is output plus these

    def to_bytes(self) -> bytes:
        value = asdict(self)
        if not self.tool_calls:
            del value["tool_calls"]  # as entries were before tool calls: a worker not upgraded yet reads it
        return json.dumps(value, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> CacheEntry:
        """An entry as any worker wrote it: without ``tool_calls`` (older ones), or with fields a
        newer one added (left out)."""
        value = json.loads(data)
        calls = tuple(ToolCall.from_avro(c) for c in value.pop("tool_calls", None) or ())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in value.items() if k in known}, tool_calls=calls)

    def fresh(self, now: float) -> bool:
        return now < self.expires_at


def cache_key(request: InferenceRequest) -> bytes:
    """Model, prompt, context and options: everything that shapes the answer.

    A conversation's turns, its tools, tool choice and format, and options beyond temperature,
    max tokens and seed join the key only when the request has them, so a plain prompt's key
    is the one it always was and the entries already cached stay valid. ``keep_alive`` (how long
    the model stays loaded) shapes no answer and is left out.
    """
    material: list[Any] = [
        request.model_id,
        request.input,
        request.context.session_id,
        sorted(request.context.metadata.items()),
        [request.options.temperature, request.options.max_tokens, request.options.seed],
    ]
    shape = answer_shape(request)
    if shape:
        material.append(shape)
    return hashlib.sha256(json.dumps(material, ensure_ascii=False).encode()).hexdigest().encode()


def answer_shape(request: InferenceRequest) -> dict[str, Any]:
    """What beyond a plain prompt shapes the answer, as JSON values; empty for a plain prompt."""
    shape: dict[str, Any] = {}
    if request.messages:
        shape["messages"] = [_message_material(m) for m in request.messages]
    if request.tools:
        shape["tools"] = [[t.name, t.description, t.parameters] for t in request.tools]
    if request.tool_choice is not None:
        shape["tool_choice"] = request.tool_choice
    if request.format is not None:
        shape["format"] = request.format
    options = _options_material(request.options)
    if options:
        shape["options"] = options
    return shape


def _message_material(message: Message) -> list[Any]:
    """A turn as key material; an image by its digest (the same bytes, the same key, less to hash twice)."""
    return [
        message.role,
        message.content,
        [hashlib.sha256(image).hexdigest() for image in message.images],
        [[c.name, c.arguments, c.id] for c in message.tool_calls],
        message.tool_name,
        message.tool_call_id,
    ]


def _options_material(options: InferenceOptions) -> dict[str, Any]:
    """The options set beyond the first three, by name: any option added later joins the key too."""
    defaults = InferenceOptions()
    out: dict[str, Any] = {}
    for f in fields(InferenceOptions):
        value = getattr(options, f.name)
        if f.name not in _FIRST_OPTIONS and value != getattr(defaults, f.name):
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


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


@dataclass(frozen=True)
class Doomed:
    """An entry to delete now: its key, its changelog partition, and why (``expired`` or ``evicted``)."""

    key: bytes
    partition: int
    reason: str


class CacheIndex:
    """Where each cache entry lives (its changelog partition) and when it expires; which entries
    to delete now. No I/O.

    A table only grows: its entries expire for lookups (:meth:`CacheEntry.fresh`) but stay in
    memory and on the changelog. The index orders them by expiry (a heap), so the worker deletes
    the expired ones, and past ``max_entries`` the ones closest to expiry, without scanning the
    table. Closest to expiry first, because with one TTL per model that is the oldest written,
    and an entry about to expire is worth least.
    """

    def __init__(self) -> None:
        self._entries: dict[bytes, tuple[int, float, int]] = {}  # key -> (partition, expires_at, seq)
        self._heap: list[tuple[float, int, bytes]] = []  # (expires_at, seq, key); stale items skipped
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[bytes]:
        return iter(list(self._entries))

    def add(self, key: bytes, partition: int, expires_at: float) -> None:
        """An entry written (or rewritten: the last write counts) on ``partition``."""
        seq = next(self._seq)
        self._entries[key] = (partition, expires_at, seq)
        heapq.heappush(self._heap, (expires_at, seq, key))
        if len(self._heap) > 2 * len(self._entries) + 64:  # rewritten keys leave stale items behind
            self._heap = [(e, s, k) for k, (_, e, s) in self._entries.items()]
            heapq.heapify(self._heap)

    def remove(self, key: bytes) -> None:
        """An entry deleted by someone else (a tombstone read from the changelog), or gone from memory."""
        self._entries.pop(key, None)

    def due(self, now: float, max_entries: int) -> list[Doomed]:
        """The entries to delete now, each once, closest to expiry first: every expired one
        (``expires_at <= now``: :meth:`CacheEntry.fresh` no longer serves it), then as many as it
        takes to keep ``max_entries``. They leave the index."""
        doomed = []
        while self._heap:
            expires_at, seq, key = self._heap[0]
            expired = expires_at <= now
            if not expired and len(self._entries) <= max_entries:
                break
            heapq.heappop(self._heap)
            current = self._entries.get(key)
            if current is None or current[2] != seq:
                continue  # deleted, or rewritten since: its newer item decides
            del self._entries[key]
            doomed.append(Doomed(key, current[0], "expired" if expired else "evicted"))
        return doomed
