"""What ``nexus replay`` raises on purpose, rooted at :class:`nexus.errors.NexusError`.

``nexus replay`` exits 2 on a :class:`ReplayError` that is not about Kafka (the arguments
ask for something it cannot do) and 3 on a :class:`ReplayKafkaError`.
"""

from __future__ import annotations

from nexus.errors import NexusError

__all__ = ["ReplayArgumentError", "ReplayError", "ReplayKafkaError", "ReplayStalledError"]


class ReplayError(NexusError):
    """A replay cannot be done as asked; the message says why and what to change."""


class ReplayArgumentError(ReplayError, ValueError):
    """An argument of ``nexus replay`` is wrong (a bad ``--since``, an unknown topic...).

    Also a :class:`ValueError`, as bad input always was.
    """


class ReplayKafkaError(ReplayError):
    """Kafka cannot be read: unreachable, no such topic, or it stopped delivering."""


class ReplayStalledError(ReplayKafkaError):
    """Kafka stopped delivering records before the end of the range."""
