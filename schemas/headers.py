"""Names of the Kafka record headers Nexus writes and reads: part of the wire contract.

Headers carry what is about a record rather than in it, so the Avro values stay
the same whatever path a record took.
"""

from __future__ import annotations

__all__ = ["ERROR", "ERROR_KIND", "REPLY_TO", "SOURCE"]

#: On ``inference.dlq`` records: why the record was dead-lettered, for a human.
ERROR = "nexus-error"
#: On ``inference.dlq`` records: the kind of failure (``undecodable``, ``unknown-model``...).
ERROR_KIND = "nexus-error-kind"
#: On ``inference.dlq`` records: the topic, partition and offset the record came from.
SOURCE = "nexus-source"
#: On ``inference.requests`` records: the gateway instance waiting for the answer (drop-in APIs).
#: The worker copies it onto the response and token records it writes.
REPLY_TO = "nexus-reply-to"
