"""The seam between the worker and a model server: what one call is and how it fails.

The worker's answering path talks to endpoints only through a :class:`Backend`, as
httpx talks to the network only through a transport: :mod:`streams.backends.ollama`
is the real one (over :mod:`streams.backends.http`), :mod:`streams.backends.memory` a scripted one, so retries,
fallbacks, circuits and deadlines are tested in-process in milliseconds.

A call carries the whole request: a prompt (``request.input``) or a conversation
(``request.messages``), with its tools, tool choice, format, options and keep-alive. Each
backend decides how its API says them (Ollama's ``/api/generate`` or ``/api/chat``, OpenAI's
``/v1/chat/completions``); the answering path never looks inside.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from nexus.errors import NexusError
from schemas import InferenceRequest, ToolCall
from schemas.endpoint_state import model_key

#: Told each streamed chunk: its text (may be "") and the tool calls that came whole with it.
OnChunk = Callable[[str, tuple[ToolCall, ...]], Awaitable[None]]
OnSent = Callable[[], None]


class BackendError(NexusError):
    """The endpoint failed to answer; the message says how, for the response's error.

    ``retryable`` failures (busy, 5xx, timeout, unreachable) may succeed on another
    endpoint; the others (4xx) would fail anywhere. ``busy`` (429, Ollama's 503 "server
    busy") means the endpoint works but is full: back off, don't open its circuit.
    ``reached`` is false when no connection was made: no model work was spent on it.
    ``missing_model`` means the endpoint works but does not have the model (Ollama's 404
    "model not found", OpenAI's ``model_not_found``): another endpoint may have it.
    ``bad_request`` means the backend refused what the request asks (its 400: tools for a
    model without tool support, a malformed schema): the request's fault, so it is answered
    at once with ``reason``, the backend's own words, for the client.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        busy: bool = False,
        reached: bool = True,
        missing_model: bool = False,
        bad_request: bool = False,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.busy = busy
        self.reached = reached
        self.missing_model = missing_model
        self.bad_request = bad_request
        self.reason = reason  # the backend's own message, when it gave one

    @property
    def client_message(self) -> str:
        """What the client is told: the backend's own words when there are some."""
        return self.reason or str(self)


def is_bad_request(status: int) -> bool:
    """Whether an HTTP status says the request itself is wrong (not the endpoint, not the model's absence).

    400 is what Ollama, OpenAI, vLLM and llama.cpp answer; 422 what FastAPI-based servers (TGI) answer
    for a body they cannot validate.
    """
    return status in (400, 422)


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    done_reason: str | None
    seconds: float
    ttft_s: float | None  # time to the first chunk, when streamed
    tool_calls: tuple[ToolCall, ...] = ()  # the functions the model asks the caller to run


@dataclass(frozen=True)
class Inventory:
    """Which models an endpoint has, and which of them are loaded in memory right now.

    ``loaded`` is ``None`` when the backend cannot say (an OpenAI-compatible server has no
    ``/api/ps``). Model names are as the endpoint lists them (``smollm2:135m``); a name
    without a tag also matches its ``:latest``.
    """

    available: frozenset[str]
    loaded: frozenset[str] | None = None

    def has(self, model: str) -> bool:
        return model_key(model) in {model_key(m) for m in self.available}

    def is_loaded(self, model: str) -> bool | None:
        if self.loaded is None:
            return None
        return model_key(model) in {model_key(m) for m in self.loaded}


class Backend(Protocol):
    """The calls the worker makes to a model endpoint (an Ollama server's base URL)."""

    async def generate(
        self,
        endpoint: str,
        model: str,
        request: InferenceRequest,
        system: str,
        timeout_s: float,
        on_chunk: OnChunk | None = None,
        on_sent: OnSent | None = None,
    ) -> Generation:
        """One generation of ``model`` (the request's, or its fallback: ``request.model_id`` is
        not read) for ``request``; ``system`` is Nexus's system prompt (from the template; empty:
        none). With ``on_chunk``, streamed chunk by chunk.

        ``on_sent`` is called when the request went on the wire (rate limits count from
        then). Raises :class:`BackendError` when the endpoint did not answer.
        """
        ...

    async def probe(self, endpoint: str, timeout_s: float) -> bool:
        """Whether the endpoint answers at all: closes an open circuit. Never raises for
        an endpoint that is down; it says ``False``."""
        ...

    async def inventory(self, endpoint: str, timeout_s: float) -> Inventory:
        """The models the endpoint has (Ollama: ``/api/tags`` and ``/api/ps``; OpenAI:
        ``/v1/models``). Raises :class:`BackendError` when it cannot be asked."""
        ...
