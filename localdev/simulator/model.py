"""Pure logic of the Ollama simulator: replies, timings, admission, response bodies.

Nothing here does I/O or touches aiohttp, so every rule the HTTP shell
(``localdev.simulator.server``) applies can be unit-tested in microseconds.
"""

from __future__ import annotations

import enum
import hashlib
import math
import random
import re
import zlib
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, UTC
from typing import Any, Generic, TypeVar

from nexus.errors import NexusError
from nexus.settings import DEFAULT_MODEL_IDS

BUSY_ERROR = "server busy, please try again.  maximum pending requests exceeded"
"""Ollama's exact 503 message (two spaces included) when OLLAMA_MAX_QUEUE is full."""

FAILURE_ERROR = "simulated failure"
MODEL_REQUIRED_ERROR = "model is required"
SIMULATOR_HEADER = "X-Ollama-Simulator"
SIMULATOR_HEADER_VALUE = "nexus"
VERSION = "0.0.0-simulated"
EMBEDDING_DIMS = 8
KEEP_ALIVE = timedelta(minutes=5)
MAX_ARRIVALS = 10_000
MAX_STOPPED = 1_000  # the newest generations cut short by their client, kept for GET /simulator/stats
RECORDED_BODIES = 32
"""Request bodies kept per endpoint path by default (GET /simulator/stats "received_bodies")."""
DEFAULT_REGISTRY = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
_VOCAB_SIZE = 128_256  # llama3 vocabulary size; only used to make context ids plausible
_TOKEN_RE = re.compile(r"\s*\S+|\s+")


class SimulatorConfigError(NexusError, ValueError):
    """A simulator knob is out of range; still a ValueError, which the command lines catch."""


class ApiError(NexusError):
    """An Ollama-shaped error answer: the server turns it into ``{"error": message}`` with ``status``.

    Lives with the pure logic so request checks can raise it without knowing about HTTP.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class SimulatorConfig:
    """Knobs of a simulated Ollama server; mirrors OLLAMA_NUM_PARALLEL / OLLAMA_MAX_QUEUE."""

    models: tuple[str, ...] = DEFAULT_MODEL_IDS  # what Nexus serves without a [models] section
    ttft_ms: float = 50.0
    tokens_per_s: float = 200.0
    parallel: int = 4
    max_queue: int = 512
    fail_rate: float = 0.0
    seed: int | None = None
    # Models that refuse tools like a real model without the capability (smollm2:135m does).
    no_tools: tuple[str, ...] = ()
    # Request bodies kept per endpoint path, so a test can assert what reached the backend.
    record_bodies: int = RECORDED_BODIES

    def __post_init__(self) -> None:
        if not self.models or any(not m.strip() for m in self.models):
            raise SimulatorConfigError("models must be a non-empty tuple of non-empty names")
        if self.ttft_ms < 0 or math.isnan(self.ttft_ms):
            raise SimulatorConfigError("ttft_ms must be >= 0")
        if self.tokens_per_s < 0 or math.isnan(self.tokens_per_s):
            raise SimulatorConfigError("tokens_per_s must be >= 0 (0 or inf = no delay)")
        if self.parallel < 1:
            raise SimulatorConfigError("parallel must be >= 1")
        if self.max_queue < 0:
            raise SimulatorConfigError("max_queue must be >= 0")
        if not 0.0 <= self.fail_rate <= 1.0:
            raise SimulatorConfigError("fail_rate must be within [0, 1]")
        unknown = [m for m in self.no_tools if resolve_model(m, self.models) is None]
        if unknown:
            raise SimulatorConfigError(
                f"no_tools names models not served: {', '.join(unknown)} (served: {', '.join(self.models)})"
            )
        if self.record_bodies < 0:
            raise SimulatorConfigError("record_bodies must be >= 0")

    def supports_tools(self, model: str) -> bool:
        """False for the models configured with ``no_tools`` (matched like Ollama matches names)."""
        return resolve_model(model, self.no_tools) is None

    @property
    def token_interval_s(self) -> float:
        """Seconds between two streamed tokens; 0 when tokens_per_s is 0 or inf."""
        if self.tokens_per_s == 0 or math.isinf(self.tokens_per_s):
            return 0.0
        return 1.0 / self.tokens_per_s

    def generation_seconds(self, n_tokens: int) -> float:
        """Wall time of a generation: first token after ttft, the rest at tokens_per_s."""
        return self.ttft_ms / 1000.0 + max(n_tokens - 1, 0) * self.token_interval_s


# --------------------------------------------------------------------------- names


def canonical_model_name(name: str) -> str:
    """Ollama treats "x" and "x:latest" as one model; compare names in this form."""
    name = name.strip().casefold()
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def resolve_model(requested: str, models: tuple[str, ...]) -> str | None:
    """The configured id matching ``requested`` (tag-insensitive for ':latest'), else None."""
    wanted = canonical_model_name(requested)
    for model in models:
        if canonical_model_name(model) == wanted:
            return model
    return None


def not_found_error(model: str) -> str:
    return f"model '{model}' not found"


def qualified_model_name(model: str) -> str:
    """The full name Ollama writes in capability errors: host/namespace/model:tag.

    "smollm2:135m" is "registry.ollama.ai/library/smollm2:135m", "me/m" is
    "registry.ollama.ai/me/m:latest", like Ollama's model.ParseName fills the defaults.
    """
    *prefix, last = model.split("/")
    if ":" not in last:
        last = f"{last}:latest"
    if not prefix:
        prefix = [DEFAULT_REGISTRY, DEFAULT_NAMESPACE]
    elif len(prefix) == 1:
        prefix = [DEFAULT_REGISTRY, *prefix]
    return "/".join([*prefix, last])


def tools_unsupported_error(model: str) -> str:
    """Ollama 0.17.4's 400 text for tools sent to a model without the tools capability."""
    return f"{qualified_model_name(model)} does not support tools"


# --------------------------------------------------------------------------- replies


def tokenize(text: str) -> list[str]:
    """Word tokens keeping their leading whitespace, so ''.join(tokenize(t)) == t."""
    return _TOKEN_RE.findall(text)


def reply_text(model: str, prompt: str) -> str:
    """The one deterministic answer; the system prompt is deliberately never echoed."""
    return f"[simulated {model}] You said: {prompt}"


def reply_tokens(
    model: str, prompt: str, system: str | None, num_predict: int | None
) -> tuple[list[str], str]:
    """Tokens of the reply and the done_reason ("length" if num_predict cut it short).

    ``system`` is accepted for symmetry with the request but does not influence the
    text: tests use that to prove user input and system prompt are kept apart.
    """
    del system  # counted in prompt_eval_count only, see prompt_token_count
    tokens = tokenize(reply_text(model, prompt))
    if num_predict is not None and 0 < num_predict < len(tokens):
        return tokens[:num_predict], "length"
    return tokens, "stop"


def prompt_token_count(*texts: str | None) -> int:
    """prompt_eval_count: tokens of every input text (prompt, system, chat history)."""
    return sum(len(tokenize(t)) for t in texts if t)


def last_user_content(messages: Sequence[Mapping[str, Any]]) -> str:
    """Chat replies echo the last user message, like a prompt."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return str(message.get("content") or "")
    return ""


def context_ids(tokens: list[str]) -> list[int]:
    """Plausible, deterministic token ids for generate's ``context`` field."""
    return [zlib.crc32(t.encode()) % _VOCAB_SIZE for t in tokens]


def embedding(model: str, text: str, dims: int = EMBEDDING_DIMS) -> list[float]:
    """Deterministic L2-normalised vector derived from a hash of (model, text)."""
    digest = hashlib.sha256(f"{model}\0{text}".encode()).digest()
    raw = [(digest[i] - 127.5) / 127.5 for i in range(dims)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def should_fail(rng: random.Random, fail_rate: float) -> bool:
    """Draw whether a generate/chat request gets the simulated HTTP 500."""
    if fail_rate <= 0.0:
        return False
    if fail_rate >= 1.0:
        return True
    return rng.random() < fail_rate


# --------------------------------------------------------------------------- timings


@dataclass(frozen=True)
class GenerationStats:
    """The statistics Ollama appends to a final chunk; all durations in nanoseconds."""

    total_duration: int
    load_duration: int
    prompt_eval_count: int
    prompt_eval_duration: int
    eval_count: int
    eval_duration: int

    def as_dict(self) -> dict[str, int]:
        return {
            "total_duration": self.total_duration,
            "load_duration": self.load_duration,
            "prompt_eval_count": self.prompt_eval_count,
            "prompt_eval_duration": self.prompt_eval_duration,
            "eval_count": self.eval_count,
            "eval_duration": self.eval_duration,
        }


def compute_stats(
    config: SimulatorConfig,
    prompt_eval_count: int,
    eval_count: int,
    elapsed_ns: int | None = None,
) -> GenerationStats:
    """Durations consistent with the config (ttft = load + prompt eval; eval at tokens_per_s).

    ``elapsed_ns`` (measured, includes queueing) raises total_duration when larger.
    """
    ttft_ns = int(config.ttft_ms * 1_000_000)
    load_ns = ttft_ns // 10
    eval_ns = int(round(eval_count * config.token_interval_s * 1e9))
    total = load_ns + (ttft_ns - load_ns) + eval_ns
    if elapsed_ns is not None:
        total = max(total, int(elapsed_ns))
    return GenerationStats(
        total_duration=total,
        load_duration=load_ns,
        prompt_eval_count=prompt_eval_count,
        prompt_eval_duration=ttft_ns - load_ns,
        eval_count=eval_count,
        eval_duration=eval_ns,
    )


def rfc3339(moment: datetime) -> str:
    """Ollama's created_at format: UTC, microseconds, trailing Z."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --------------------------------------------------------------------------- bodies


def generate_chunk(model: str, created_at: str, text: str) -> dict[str, Any]:
    return {"model": model, "created_at": created_at, "response": text, "done": False}


def generate_final(
    model: str,
    created_at: str,
    response: str,
    done_reason: str,
    context: list[int],
    stats: GenerationStats,
) -> dict[str, Any]:
    """Last generate object: empty ``response`` when streamed, the full text otherwise."""
    return {
        "model": model,
        "created_at": created_at,
        "response": response,
        "done": True,
        "done_reason": done_reason,
        "context": context,
        **stats.as_dict(),
    }


def generate_load(model: str, created_at: str, done_reason: str = "load") -> dict[str, Any]:
    """Answer to Ollama's "load model" call (empty prompt)."""
    return {
        "model": model,
        "created_at": created_at,
        "response": "",
        "done": True,
        "done_reason": done_reason,
    }


def assistant_message(content: str, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """api.Message as Ollama writes it: content always there, tool_calls only when there are some."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def chat_chunk(
    model: str, created_at: str, content: str, tool_calls: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """A streamed chat chunk: a piece of text, or (content "") a whole tool call."""
    return {
        "model": model,
        "created_at": created_at,
        "message": assistant_message(content, tool_calls),
        "done": False,
    }


def chat_final(
    model: str,
    created_at: str,
    content: str,
    done_reason: str,
    stats: GenerationStats,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Last chat object: empty message content when streamed, the full text otherwise.

    Not streamed, the message also holds the tool calls (streamed, they came in earlier chunks).
    """
    return {
        "model": model,
        "created_at": created_at,
        "message": assistant_message(content, tool_calls),
        "done": True,
        "done_reason": done_reason,
        **stats.as_dict(),
    }


def chat_load(model: str, created_at: str, done_reason: str = "load") -> dict[str, Any]:
    """Answer to a chat with no messages (Ollama's way to load a model)."""
    return {
        "model": model,
        "created_at": created_at,
        "message": {"role": "assistant", "content": ""},
        "done": True,
        "done_reason": done_reason,
    }


def embed_response(
    model: str,
    embeddings: list[list[float]],
    prompt_eval_count: int,
    total_duration: int,
    load_duration: int = 0,
) -> dict[str, Any]:
    """POST /api/embed body; embeddings are not paced, so durations are just measured."""
    return {
        "model": model,
        "embeddings": embeddings,
        "total_duration": total_duration,
        "load_duration": load_duration,
        "prompt_eval_count": prompt_eval_count,
    }


def _family(model: str) -> str:
    base = model.rsplit("/", 1)[-1].split(":", 1)[0]
    match = re.match(r"[A-Za-z]+", base)
    return match.group(0).lower() if match else base


def model_details(model: str) -> dict[str, Any]:
    family = _family(model)
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": f"{_param_billions(model)}B",
        "quantization_level": "Q4_K_M",
    }


def _param_billions(model: str) -> int:
    return (1, 3, 7, 8)[zlib.crc32(model.encode()) % 4]


def model_size(model: str) -> int:
    """Bytes of a Q4 gguf of that parameter count (about 0.6 bytes per parameter)."""
    return _param_billions(model) * 600_000_000 + zlib.crc32(model.encode()) % 1_000_000


def model_digest(model: str) -> str:
    return hashlib.sha256(f"nexus-simulated:{model}".encode()).hexdigest()


def tags_response(config: SimulatorConfig, now: datetime) -> dict[str, Any]:
    """GET /api/tags: names kept exactly as configured so clients can match them."""
    return {
        "models": [
            {
                "name": m,
                "model": m,
                "modified_at": rfc3339(now),
                "size": model_size(m),
                "digest": model_digest(m),
                "details": model_details(m),
            }
            for m in config.models
        ]
    }


def ps_response(config: SimulatorConfig, now: datetime) -> dict[str, Any]:
    """GET /api/ps: every simulated model is permanently "loaded", fully in VRAM."""
    return {
        "models": [
            {
                "name": m,
                "model": m,
                "size": model_size(m),
                "digest": model_digest(m),
                "details": model_details(m),
                "expires_at": rfc3339(now + KEEP_ALIVE),
                "size_vram": model_size(m),
            }
            for m in config.models
        ]
    }


# --------------------------------------------------------------------------- admission


class Admission(enum.Enum):
    RUN = "run"
    WAIT = "wait"
    REJECT = "reject"


T = TypeVar("T")


class SlotQueue(Generic[T]):
    """Ollama's scheduler in miniature: ``parallel`` slots, ``max_queue`` waiters, else reject.

    Pure bookkeeping with opaque tickets; the caller turns a ticket into something it
    can wake (an asyncio future in the server). A released slot is handed directly to
    the oldest waiter, so FIFO order is kept and no newcomer can jump the queue.
    """

    def __init__(self, parallel: int, max_queue: int) -> None:
        self.parallel = parallel
        self.max_queue = max_queue
        self.active = 0
        self.max_active = 0
        self._waiting: deque[T] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def admit(self, ticket: T) -> Admission:
        """RUN takes a slot now; WAIT queues ``ticket``; REJECT means answer 503."""
        if self.active < self.parallel and not self._waiting:
            self._take_slot()
            return Admission.RUN
        if len(self._waiting) < self.max_queue:
            self._waiting.append(ticket)
            return Admission.WAIT
        return Admission.REJECT

    def withdraw(self, ticket: T) -> bool:
        """Drop a waiter that gave up; False if it already holds a slot (or is unknown)."""
        try:
            self._waiting.remove(ticket)
        except ValueError:
            return False
        return True

    def release(self) -> T | None:
        """Free a slot; if someone waits, the slot passes to them and their ticket is returned."""
        if self._waiting:
            return self._waiting.popleft()
        if self.active <= 0:
            raise RuntimeError("release() without a matching admission")
        self.active -= 1
        return None

    def _take_slot(self) -> None:
        self.active += 1
        self.max_active = max(self.max_active, self.active)


# --------------------------------------------------------------------------- stats


@dataclass
class SimulatorStats:
    """Counters a test or benchmark reads to know what the simulator actually served."""

    received: Counter[str] = field(default_factory=Counter)  # by endpoint path
    served: Counter[str] = field(default_factory=Counter)  # 2xx answers, by endpoint
    served_by_model: Counter[str] = field(default_factory=Counter)  # generate/chat/embed
    rejected_busy: int = 0
    simulated_failures: int = 0
    client_errors: int = 0
    disconnects: int = 0
    tokens_generated: int = 0
    active: int = 0
    max_concurrent: int = 0
    body_limit: int = RECORDED_BODIES  # bodies kept per endpoint path; 0 keeps none
    # The newest request bodies (parsed JSON, as sent) by endpoint path, oldest first.
    received_bodies: dict[str, deque[Any]] = field(default_factory=dict)
    # Monotonic arrival times of generate/chat requests, newest last, so a benchmark or
    # test can check rate limits at the endpoint side; bounded to keep memory flat.
    arrivals: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_ARRIVALS))
    # Generations the client gave up on after they started (it closed the stream, or hung up
    # while a non-streamed answer was being generated): the generation stopped there, as
    # Ollama stops generating when its client goes away. ``disconnects`` also counts clients
    # that left while still queued for a slot; these are the ones that held a slot.
    generations_stopped: int = 0
    streams_closed_early: int = 0  # of which streamed: closed before the final chunk
    # The newest stopped generations, oldest first: what a test needs to tell which call stopped.
    stopped: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=MAX_STOPPED))

    def record_arrival(self, now: float) -> None:
        self.arrivals.append(now)

    def record_stop(self, path: str, model: str, prompt: str, streamed: int, planned: int, stream: bool) -> None:
        """A started generation was cut short by its client after ``streamed`` of ``planned`` tokens."""
        self.generations_stopped += 1
        if stream:
            self.streams_closed_early += 1
        self.stopped.append({"path": path, "model": model, "prompt": prompt[:200], "stream": stream,
                             "tokens_streamed": streamed, "tokens_planned": planned})

    def record_body(self, path: str, body: Any) -> None:
        """Keep ``body`` (bounded per path) so a test can check what reached the "model server"."""
        if self.body_limit <= 0:
            return
        if path not in self.received_bodies:
            self.received_bodies[path] = deque(maxlen=self.body_limit)
        self.received_bodies[path].append(body)

    def bodies(self, path: str) -> list[Any]:
        """The kept bodies of ``path``, oldest first."""
        return list(self.received_bodies.get(path, ()))

    def snapshot(self) -> dict[str, Any]:
        """JSON-friendly copy (served at GET /simulator/stats)."""
        return {
            "received": dict(self.received),
            "served": dict(self.served),
            "served_by_model": dict(self.served_by_model),
            "rejected_busy": self.rejected_busy,
            "simulated_failures": self.simulated_failures,
            "client_errors": self.client_errors,
            "disconnects": self.disconnects,
            "tokens_generated": self.tokens_generated,
            "active": self.active,
            "max_concurrent": self.max_concurrent,
            "arrivals": list(self.arrivals),
            "generations_stopped": self.generations_stopped,
            "streams_closed_early": self.streams_closed_early,
            "stopped": list(self.stopped),
            "received_bodies": {path: list(bodies) for path, bodies in self.received_bodies.items()},
        }
