"""Model servers behind one seam: :class:`Backend`, with an Ollama and an in-memory implementation."""

from streams.backends.base import Backend, BackendError, Generation, Inventory, OnChunk, OnSent

__all__ = ["Backend", "BackendError", "Generation", "Inventory", "OnChunk", "OnSent"]
