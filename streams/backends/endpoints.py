"""Every configured endpoint called through the backend of its kind: one :class:`Backend` for the worker.

An endpoint is its URL everywhere in the answering path (routing, waiting lines, circuits,
metrics); its ``kind`` in the settings (``ollama``, ``openai``) says which API it speaks.
:class:`EndpointsBackend` keeps that map and passes each call to the backend of the kind, so
routing, retries, fallbacks and the cache treat every kind alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from nexus.settings import ENDPOINT_KINDS, Settings
from schemas import InferenceRequest
from streams.backends.base import Backend, Generation, Inventory, OnChunk, OnSent
from streams.backends.http import HttpClient
from streams.backends.ollama import OllamaBackend
from streams.backends.openai import OpenAIBackend

__all__ = ["BACKENDS", "EndpointsBackend"]

# How each kind of endpoint is called, over the worker's one HTTP client.
BACKENDS: dict[str, Callable[[HttpClient], Backend]] = {
    "ollama": OllamaBackend,
    "openai": OpenAIBackend,
}


class EndpointsBackend:
    """A :class:`Backend` that calls each endpoint through the backend of its kind.

    ``kinds`` maps an endpoint URL to its kind; a URL not in it is of kind ``default``.
    """

    def __init__(self, backends: Mapping[str, Backend], kinds: Mapping[str, str], default: str = "ollama") -> None:
        missing = sorted({*kinds.values(), default} - set(backends))
        if missing:
            raise ValueError(f"no backend for endpoint kind {missing[0]!r}")
        self._backends = dict(backends)
        self._kinds = dict(kinds)
        self._default = default

    @classmethod
    def from_settings(cls, settings: Settings, http: HttpClient) -> EndpointsBackend:
        """The worker's backend: every configured endpoint by its kind, all over ``http``."""
        kinds = {e.url: e.kind for m in settings.models for e in m.endpoints}
        return cls({kind: BACKENDS[kind](http) for kind in ENDPOINT_KINDS}, kinds)

    def kind(self, endpoint: str) -> str:
        return self._kinds.get(endpoint, self._default)

    def backend(self, endpoint: str) -> Backend:
        return self._backends[self.kind(endpoint)]

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
        return await self.backend(endpoint).generate(
            endpoint, model, request, system, timeout_s, on_chunk, on_sent
        )

    async def probe(self, endpoint: str, timeout_s: float) -> bool:
        return await self.backend(endpoint).probe(endpoint, timeout_s)

    async def inventory(self, endpoint: str, timeout_s: float) -> Inventory:
        return await self.backend(endpoint).inventory(endpoint, timeout_s)
