"""What the bridge raises on purpose; both derive from :class:`nexus.errors.NexusError`."""

from __future__ import annotations

from nexus.errors import NexusError

__all__ = ["BridgeStartError", "HistoryError"]


class BridgeStartError(NexusError):
    """The bridge could not start: Kafka or the listening port is unavailable."""


class HistoryError(NexusError):
    """A ``since`` replay could not be read from Kafka; live delivery goes on."""
