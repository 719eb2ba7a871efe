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

OnChunk = Callable[[str], Awaitable[None]]
OnSent = Callable[[], None]


class BackendError(NexusError):
    """The endpoint failed to answer; the message says how, for the response's error.

    ``retryable`` failures (busy, 5xx, timeout, unreachable) may succeed on another
    endpoint; the others (4xx) would fail anywhere. ``busy`` (429, Ollama's 503 "server
    busy") means the endpoint works but is full: back off, don't open its circuit.
    ``reached`` is false when no connection was made: no model work was spent on it.
    """

    def __init__(self, message: str, *, retryable: bool, busy: bool = False, reached: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.busy = busy
        self.reached = reached


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    done_reason: str | None
    seconds: float
    ttft_s: float | None  # time to the first chunk, when streamed


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
