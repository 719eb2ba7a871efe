"""Model servers behind one seam: :class:`Backend`, implemented for Ollama's native API, OpenAI-compatible
servers and in memory; :class:`EndpointsBackend` calls each configured endpoint through the one of its kind."""

from streams.backends.base import Backend, BackendError, Generation, Inventory, OnChunk, OnSent
from streams.backends.endpoints import BACKENDS, EndpointsBackend
from streams.backends.ollama import OllamaBackend
from streams.backends.openai import OpenAIBackend

__all__ = [
    # clients
    "Backend", "EndpointsBackend", "OllamaBackend", "OpenAIBackend", "BACKENDS",
    # errors
    "BackendError",
    # structures
    "Generation", "Inventory", "OnChunk", "OnSent",
]
