"""How ``nexus replay`` prints records: JSON Lines for machines, a table for people.

Pure functions from :class:`~consumers.replay.audit.ReplayRecord` to text.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any

from schemas import InferenceCancel, InferenceRequest, InferenceResponse, InferenceToken, ToolCall

from consumers.replay.audit import ReplayRecord, iso, key_text

FORMATS = ("jsonl", "table")


def record_json(record: ReplayRecord) -> dict[str, Any]:
    """One record as a JSON object: where it is, its key and its decoded value.

    A value that does not decode is given as ``value_base64`` with the reason in ``error``.
    """
    key, key_b64 = key_text(record.key)
    out: dict[str, Any] = {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp,
        "time": iso(record.timestamp),
        "kind": record.kind,
        "key": key,
        "value": record.value.to_json() if record.value is not None else None,
    }
    if key_b64 is not None:
        out["key_base64"] = key_b64
    if record.raw is not None and record.value is None:
        out["value_base64"] = base64.b64encode(record.raw).decode()
    if record.error is not None:
        out["error"] = record.error
    if record.headers:
        out["headers"] = {k: v.decode(errors="replace") for k, v in record.headers.items()}
    return out


def jsonl_line(record: ReplayRecord) -> str:
    return json.dumps(record_json(record), ensure_ascii=False, separators=(",", ":"))


TABLE_COLUMNS = (("time", 23), ("where", 26), ("kind", 11), ("id", 32), ("model", 12), ("session", 16),
                 ("status", 9), ("text", 0))


def table_header() -> str:
    return _row([name for name, _ in TABLE_COLUMNS])


def table_row(record: ReplayRecord, text_width: int = 60) -> str:
    value = record.value
    text = record.error or ""
    status = record.status or ""
    if isinstance(value, InferenceRequest):
        shown = _request_text(value)
        text = shown if record.kind == "request" else f"{record.error} | {shown}"
    elif isinstance(value, InferenceResponse):
        text = _with_calls(value.output, value.tool_calls) if value.status == "ok" else (value.error or "")
    elif isinstance(value, InferenceToken):
        text = _with_calls(f"#{value.seq} {value.text}", value.tool_calls)
    elif isinstance(value, InferenceCancel):
        text = " ".join(p for p in (value.reason, f"(key {value.key_name})" if value.key_name else "") if p)
    elif value is None:
        status = "undecodable"
    return _row(
        [
            iso(record.timestamp)[:23],
            f"{record.topic}/{record.partition}/{record.offset}",
            record.kind,
            record.id or "-",
            record.model_id or "-",
            record.session_id or "-",
            status,
            _one_line(text, text_width),
        ]
    )


def _request_text(request: InferenceRequest) -> str:
    """A prompt; a conversation as ``[chat, N turns, tools a,b] <last user turn>``; a batch
    request starts with ``[batch]``."""
    lane = "[batch] " if request.priority == "batch" else ""
    if not request.is_chat:
        return lane + request.input
    tools = f", tools {','.join(t.name for t in request.tools)}" if request.tools else ""
    return f"{lane}[chat, {len(request.messages)} turns{tools}] {request.input}"


def _with_calls(text: str, calls: Sequence[ToolCall]) -> str:
    """``text`` followed by each tool call as ``[tool call] name({...})``."""
    shown = [f"[tool call] {c.name}({c.arguments})" for c in calls]
    return " ".join([text, *shown] if text else shown)


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _row(cells: list[str]) -> str:
    parts = []
    for (_, width), cell in zip(TABLE_COLUMNS, cells):
        parts.append(cell if not width else cell[:width].ljust(width))
    return " ".join(parts).rstrip()


def progress_line(done: int, total: int, width: int = 30) -> str:
    """``[#######-------]  42%  4,200/10,000 records``; ``total`` 0 counts as done."""
    fraction = 1.0 if total <= 0 else min(1.0, done / total)
    filled = int(round(fraction * width))
    return f"[{'#' * filled}{'-' * (width - filled)}] {fraction:4.0%}  {done:,}/{total:,} records"
