"""The seam between the worker and a model server: what one call is and how it fails.

The worker's answering path talks to endpoints only through a :class:`Backend`, as
httpx talks to the network only through a transport: :mod:`streams.backends.ollama`
is the real one (aiohttp), :mod:`streams.backends.memory` a scripted one, so retries,
fallbacks, circuits and deadlines are tested in-process in milliseconds.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from nexus.errors import NexusError
from schemas import InferenceOptions
from schemas.endpoint_state import model_key

OnChunk = Callable[[str], Awaitable[None]]
OnSent = Callable[[], None]


class BackendError(NexusError):
    """The endpoint failed to answer; the message says how, for the response's error.

    ``retryable`` failures (busy, 5xx, timeout, unreachable) may succeed on another
    endpoint; the others (4xx) would fail anywhere. ``busy`` (429, Ollama's 503 "server
    busy") means the endpoint works but is full: back off, don't open its circuit.
    ``reached`` is false when no connection was made: no model work was spent on it.
    ``missing_model`` means the endpoint works but does not have the model (Ollama's 404
    "model not found", OpenAI's ``model_not_found``): another endpoint may have it.
    """

    def __init__(
        self, message: str, *, retryable: bool, busy: bool = False, reached: bool = True, missing_model: bool = False
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.busy = busy
        self.reached = reached
        self.missing_model = missing_model


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    done_reason: str | None
    seconds: float
    ttft_s: float | None  # time to the first chunk, when streamed


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
        prompt: str,
        system: str,
        options: InferenceOptions,
        timeout_s: float,
        on_chunk: OnChunk | None = None,
        on_sent: OnSent | None = None,
    ) -> Generation:
        """One generation; with ``on_chunk``, streamed chunk by chunk.

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
