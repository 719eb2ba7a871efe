"""An in-memory :class:`~streams.backends.base.Backend`: endpoints scripted call by call.

For tests of everything around the call (routing, waiting, retries, fallback, circuits,
deadlines) without sockets or real time::

    backend = MemoryBackend(clock)
    backend.script("http://a", server_error(500), Reply("hello"))  # fails once, then answers
    backend.script("http://b", Hold(gate))     # answers when the test sets ``gate``
    backend.endpoint("http://c").healthy = False   # its probes fail
    backend.has("http://d", "llama3.1", loaded=())  # its inventory: has llama3.1, nothing loaded

An endpoint given an inventory (:meth:`MemoryBackend.has`) answers a call for a model it
lacks as Ollama does, 404 "model 'x' not found" (``missing_model``); without one it has
every model and its inventory cannot be asked.

Each call takes the endpoint's next step; with the script used up, its ``default``
(an answer echoing the prompt unless told otherwise). A :class:`Hold` waits on an
``asyncio.Event`` the test controls, through the given clock, so a call's timeout is
reached by advancing a :class:`~streams.answering.clock.ManualClock`, not by sleeping.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from schemas import InferenceOptions, InferenceRequest, ToolCall
from streams.answering.clock import Clock, SystemClock
from streams.backends.base import BackendError, Generation, Inventory, OnChunk, OnSent, is_bad_request


@dataclass(frozen=True)
class Reply:
    """An answer; ``text`` is streamed as ``chunks`` (its words by default) when asked to stream,
    then ``tool_calls`` in a chunk of their own (as Ollama streams them). ``None`` text echoes the
    call: ``[memory <model>] <prompt>`` (a conversation's prompt is its last user turn)."""

    text: str | None = None
    chunks: tuple[str, ...] | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    prompt_tokens: int = 1
    completion_tokens: int = 1
    done_reason: str | None = "stop"
    seconds: float = 0.01  # reported as the call's duration (the router's EWMA sees it)


@dataclass(frozen=True)
class Failure:
    """A failed call: ``BackendError(f"{endpoint} {message}", ...)``, after ``chunks`` went out."""

    message: str
    retryable: bool = True
    busy: bool = False
    reached: bool = True
    chunks: tuple[str, ...] = ()  # streamed before the failure (a stream broken mid-way)
    missing_model: bool = False
    bad_request: bool = False
    reason: str | None = None  # the backend's own message


@dataclass(frozen=True)
class Hold:
    """Wait for ``gate`` (``None``: forever) then do ``then``; the call's timeout may come first."""

    gate: asyncio.Event | None = None
    then: Reply | Failure = Reply()


Step = Reply | Failure | Hold


def server_error(status: int = 500, reason: str = "boom") -> Failure:
    """An HTTP error status, classified as the Ollama backend classifies it."""
    return Failure(
        f"answered {status}: {reason!r}",
        retryable=status in (408, 429) or status >= 500,
        busy=status == 429 or (status == 503 and "busy" in reason.lower()),
        bad_request=is_bad_request(status),
        reason=reason,
    )


def server_busy() -> Failure:
    """Ollama's 503 when its queue is full."""
    return server_error(503, "server busy, please try again.  maximum pending requests exceeded")


def model_not_found(model: str) -> Failure:
    """Ollama's 404 for a model the endpoint does not have."""
    return Failure(f"answered 404: \"model '{model}' not found\"", retryable=False, missing_model=True)


def refused() -> Failure:
    """Nothing listens: no connection, so no model work was spent."""
    return Failure("unreachable: ClientConnectorError: connection refused", reached=False)


def bad_request(reason: str = "invalid options") -> Failure:
    """A 400: the request asks what the backend refuses; it would fail on any endpoint."""
    return server_error(400, reason)


@dataclass(frozen=True)
class Call:
    """One call as the endpoint received it."""

    endpoint: str
    model: str
    request: InferenceRequest
    system: str
    timeout_s: float
    streamed: bool

    @property
    def prompt(self) -> str:
        return self.request.input

    @property
    def options(self) -> InferenceOptions:
        return self.request.options


@dataclass
class MemoryEndpoint:
    url: str
    steps: deque[Step] = field(default_factory=deque)
    default: Step = Reply()
    healthy: bool = True  # what probes answer
    calls: list[Call] = field(default_factory=list)
    probes: int = 0
    # What it has and has loaded; None: every model, and asking for the inventory fails.
    inventory: Inventory | None = None
    inventories: int = 0  # times it was asked
    in_flight: int = 0
    most_in_flight: int = 0


class MemoryBackend:
    """Scripted endpoints by URL; unknown URLs answer with the default step."""

    def __init__(self, clock: Clock | None = None, default: Step = Reply()) -> None:
        self._clock = clock or SystemClock()
        self._default = default
        self.endpoints: dict[str, MemoryEndpoint] = {}

    def endpoint(self, url: str) -> MemoryEndpoint:
        if url not in self.endpoints:
            self.endpoints[url] = MemoryEndpoint(url, default=self._default)
        return self.endpoints[url]

    def script(self, url: str, *steps: Step, then: Step | None = None) -> MemoryEndpoint:
        """Queue ``steps`` for ``url``'s next calls; ``then`` replaces its default afterwards."""
        e = self.endpoint(url)
        e.steps.extend(steps)
        if then is not None:
            e.default = then
        return e

    def calls(self, url: str) -> int:
        return len(self.endpoint(url).calls)

    def probes(self, url: str) -> int:
        return self.endpoint(url).probes

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
        e = self.endpoint(endpoint)
        call = Call(endpoint, model, request, system, timeout_s, on_chunk is not None)
        e.calls.append(call)
        if e.inventory is not None and not e.inventory.has(model):
            step: Step = model_not_found(model)  # the script waits for a call it can answer
        else:
            step = e.steps.popleft() if e.steps else e.default
        if on_sent is not None:
            on_sent()
        e.in_flight += 1
        e.most_in_flight = max(e.most_in_flight, e.in_flight)
        try:
            if isinstance(step, Hold):
                gate = step.gate or asyncio.Event()
                if not await self._clock.wait_for(gate, timeout_s):
                    raise BackendError(f"{endpoint} did not answer within {timeout_s:g}s", retryable=True)
                step = step.then
            return await self._act(call, step, on_chunk)
        finally:
            e.in_flight -= 1

    async def _act(self, call: Call, step: Reply | Failure, on_chunk: OnChunk | None) -> Generation:
        if isinstance(step, Failure):
            if on_chunk is not None:
                for piece in step.chunks:
                    await on_chunk(piece, ())
            raise BackendError(
                f"{call.endpoint} {step.message}", retryable=step.retryable, busy=step.busy, reached=step.reached,
                missing_model=step.missing_model, bad_request=step.bad_request, reason=step.reason,
            )
        text = step.text if step.text is not None else f"[memory {call.model}] {call.prompt}"
        ttft: float | None = None
        if on_chunk is not None:
            ttft = 0.0  # no time passes in here
            for piece in step.chunks if step.chunks is not None else _words(text):
                await on_chunk(piece, ())
            if step.tool_calls:
                await on_chunk("", step.tool_calls)
        return Generation(
            text=text,
            prompt_tokens=step.prompt_tokens,
            completion_tokens=step.completion_tokens,
            done_reason=step.done_reason,
            seconds=step.seconds,
            ttft_s=ttft,
            tool_calls=step.tool_calls,
        )

    async def probe(self, endpoint: str, timeout_s: float) -> bool:
        e = self.endpoint(endpoint)
        e.probes += 1
        return e.healthy

    def has(self, url: str, *models: str, loaded: tuple[str, ...] | None = None) -> MemoryEndpoint:
        """Give ``url`` an inventory: it has ``models``, of which ``loaded`` (all of them unless
        told) are loaded. A call for another model is answered 404 "model not found"."""
        e = self.endpoint(url)
        e.inventory = Inventory(frozenset(models), frozenset(models if loaded is None else loaded))
        return e

    async def inventory(self, endpoint: str, timeout_s: float) -> Inventory:
        e = self.endpoint(endpoint)
        e.inventories += 1
        if e.inventory is None or not e.healthy:
            raise BackendError(f"{endpoint} cannot say which models it has", retryable=True)
        return e.inventory


def _words(text: str) -> tuple[str, ...]:
    words = text.split(" ")
    return tuple(w if i == 0 else " " + w for i, w in enumerate(words))
