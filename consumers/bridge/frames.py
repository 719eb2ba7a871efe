"""The websocket bridge's protocol: parse client frames, build server frames. No I/O.

Client frames (JSON text):

- ``{"type":"subscribe","session_id":"s1"}``, ``{"type":"subscribe","request_ids":["r1",...]}``
  or ``{"type":"subscribe","all":true}``, each with an optional ``"since"`` (ISO-8601 or
  epoch milliseconds) to replay what was produced since then;
- ``{"type":"unsubscribe", ...the same target...}``;
- ``{"type":"submit", ...the body of POST /infer...}``: a prompt (``input``) or a conversation
  (``messages``, ``tools``, ``tool_choice``, ``format``, ``keep_alive``, ``options``, ``priority``,
  ``tenant``), checked by :func:`schemas.validation.request_from_json` exactly as ``POST /infer`` checks it;
- ``{"type":"cancel","id":"r1"}``: cancel a request (the worker drops it or aborts its call).

Server frames: ``subscribed``, ``unsubscribed``, ``replayed``, ``accepted``, ``token``,
``result``, ``queued`` (where a request waits: ``position``, ``eta_ms``), ``cancelling`` and
``error``; see ``docs/bridge.md``. A ``result`` carries the
answer's ``tool_calls`` and ``message`` (the assistant turn); a ``token`` carries ``tool_calls``
when its chunk streamed some. A request too big for one Kafka record is an ``error`` with
``status`` 413.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, UTC
from typing import Any

from schemas import InferenceResponse, InferenceToken
from schemas.limits import MAX_REQUEST_IDS_PER_FRAME
from schemas.validation import RejectedRequest, parse_json, request_id, session_id

MAX_REQUEST_IDS = MAX_REQUEST_IDS_PER_FRAME


class FrameError(RejectedRequest):
    """A client frame that the bridge cannot act on; ``reason`` goes back in an error frame.

    A :class:`~schemas.validation.RejectedRequest` (400) like every edge's refusals; the
    bridge renders it as ``{"type":"error","reason":...}``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(400, reason)
        self.reason = reason


@dataclass(frozen=True)
class Target:
    """What a subscription selects: one session, some request ids, or every result."""

    session_id: str | None = None
    request_ids: tuple[str, ...] = ()
    all: bool = False

    def to_json(self) -> dict[str, Any]:
        if self.all:
            return {"all": True}
        if self.session_id is not None:
            return {"session_id": self.session_id}
        return {"request_ids": list(self.request_ids)}

    def matches(self, session_id: str, request_id: str, is_token: bool) -> bool:
        """Whether a record of this session and request belongs to the subscription."""
        if self.all:
            return not is_token  # "all" is a results feed; tokens of every request would flood it
        if self.session_id is not None:
            return session_id == self.session_id
        return request_id in self.request_ids


@dataclass(frozen=True)
class Subscribe:
    target: Target
    since_ms: int | None = None


@dataclass(frozen=True)
class Unsubscribe:
    target: Target


@dataclass(frozen=True)
class Submit:
    body: dict[str, Any]  # the POST /infer body, validated by schemas.validation


@dataclass(frozen=True)
class Cancel:
    request_id: str


ClientFrame = Subscribe | Unsubscribe | Submit | Cancel


def parse_client_frame(message: str | bytes) -> ClientFrame:
    """Turn one websocket message into a client frame, or raise :class:`FrameError`."""
    try:
        data = parse_json(message, "frame is not valid JSON")
    except RejectedRequest as exc:
        raise FrameError(exc.message) from None
    if not isinstance(data, dict):
        raise FrameError("frame must be a JSON object with a \"type\"")
    kind = data.get("type")
    if kind == "submit":
        body = {k: v for k, v in data.items() if k != "type"}
        return Submit(body)
    if kind == "subscribe":
        _only(data, {"type", "session_id", "request_ids", "all", "since"})
        since = data.get("since")
        return Subscribe(_target(data), None if since is None else parse_since(since))
    if kind == "unsubscribe":
        _only(data, {"type", "session_id", "request_ids", "all"})
        return Unsubscribe(_target(data))
    if kind == "cancel":
        _only(data, {"type", "id"})
        return Cancel(_id(request_id, data.get("id"), "id"))
    raise FrameError(
        f"unknown frame type {kind!r}; expected \"subscribe\", \"unsubscribe\", \"submit\" or \"cancel\""
    )


def parse_since(value: Any) -> int:
    """``since`` as epoch milliseconds: an ISO-8601 time (UTC when no offset) or epoch ms."""
    if isinstance(value, bool):
        raise FrameError("'since' must be an ISO-8601 time or epoch milliseconds, not a boolean")
    if isinstance(value, (int, float)):
        ms = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        ms = int(value.strip())
    elif isinstance(value, str):
        try:
            when = datetime.fromisoformat(value.strip())
        except ValueError:
            raise FrameError(
                f"'since' {value!r} is neither ISO-8601 (e.g. 2024-05-01T12:00:00Z) nor epoch ms"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        ms = int(when.timestamp() * 1000)
    else:
        raise FrameError("'since' must be an ISO-8601 time or epoch milliseconds")
    if ms < 0:
        raise FrameError(f"'since' must not be before 1970, got {value!r}")
    return ms


def _only(data: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise FrameError(f"unknown field {unknown[0]!r} in {data['type']}; allowed: {sorted(allowed)}")


def _target(data: dict[str, Any]) -> Target:
    given = [k for k in ("session_id", "request_ids", "all") if data.get(k) is not None]
    if len(given) != 1:
        raise FrameError(
            f"{data['type']} needs exactly one of \"session_id\", \"request_ids\" or \"all\""
            + (f", got {given}" if given else "")
        )
    if given[0] == "all":
        if data["all"] is not True:
            raise FrameError("'all' must be true")
        return Target(all=True)
    if given[0] == "session_id":
        return Target(session_id=_id(session_id, data["session_id"], "session_id"))
    ids = data["request_ids"]
    if not isinstance(ids, list) or not ids:
        raise FrameError("'request_ids' must be a non-empty list of strings")
    if len(ids) > MAX_REQUEST_IDS:
        raise FrameError(f"'request_ids' has {len(ids)} ids; at most {MAX_REQUEST_IDS} per frame")
    return Target(request_ids=tuple(dict.fromkeys(_id(request_id, i, "request_ids[]") for i in ids)))


def _id(check: Callable[[Any, str], str], value: Any, name: str) -> str:
    """A session or request id, checked as every edge checks it (:mod:`schemas.validation`)."""
    try:
        return check(value, name)
    except RejectedRequest as exc:
        raise FrameError(exc.message) from None


def _dump(frame: dict[str, Any]) -> str:
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


def token_frame(token: InferenceToken) -> str:
    """A chunk: its text (may be "") and, only when the chunk carries some, ``tool_calls``
    (``[{"id", "name", "arguments": {...}}]``, each call whole)."""
    frame: dict[str, Any] = {"type": "token", "id": token.id, "seq": token.seq, "text": token.text}
    if token.tool_calls:
        frame["tool_calls"] = [c.to_json() for c in token.tool_calls]
    return _dump(frame)


def result_frame(response: InferenceResponse, trace_id: str | None = None) -> str:
    """The response's JSON form: ``output``, ``tool_calls`` and ``message`` (the assistant turn,
    ``{"role": "assistant", "content", "tool_calls"?}``, ready to append to the conversation);
    ``trace_id`` when the response record names its trace (its ``traceparent`` header)."""
    frame = {"type": "result", **response.to_json()}
    if trace_id is not None:
        frame["trace_id"] = trace_id
    return _dump(frame)


def error_frame(reason: str, **detail: Any) -> str:
    return _dump({"type": "error", "reason": reason, **detail})


def subscribed_frame(target: Target, since_ms: int | None = None) -> str:
    extra = {} if since_ms is None else {"since": since_ms}
    return _dump({"type": "subscribed", **target.to_json(), **extra})


def unsubscribed_frame(target: Target) -> str:
    return _dump({"type": "unsubscribed", **target.to_json()})


def replayed_frame(target: Target, since_ms: int, count: int) -> str:
    """Sent after a ``since`` replay: what follows for this subscription is live."""
    return _dump({"type": "replayed", **target.to_json(), "since": since_ms, "count": count})


def accepted_frame(request_id: str, session_id: str) -> str:
    return _dump({"type": "accepted", "id": request_id, "session_id": session_id})


def queued_frame(request_id: str, model: str, position: int, eta_ms: int) -> str:
    """Where a request waits: ``position`` 0 starts next; ``eta_ms`` the estimated wait from now."""
    return _dump({"type": "queued", "id": request_id, "model": model, "position": position, "eta_ms": eta_ms})


def cancelling_frame(request_id: str) -> str:
    """Kafka took the cancel: the answer will say ``cancelled`` (unless it was answered already)."""
    return _dump({"type": "cancelling", "id": request_id})
