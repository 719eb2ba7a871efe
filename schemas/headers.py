"""Names of the Kafka record headers Nexus writes and reads: part of the wire contract.

Headers carry what is about a record rather than in it, so the Avro values stay
the same whatever path a record took.
"""

from __future__ import annotations

__all__ = ["ERROR", "ERROR_KIND", "PRIORITY_HEADER", "QUEUE_MS_HEADER", "REPLY_TO", "SOURCE", "TENANT_HEADER"]

#: On ``inference.dlq`` records: why the record was dead-lettered, for a human.
ERROR = "nexus-error"
#: On ``inference.dlq`` records: the kind of failure (``undecodable``, ``unknown-model``...).
ERROR_KIND = "nexus-error-kind"
#: On ``inference.dlq`` records: the topic, partition and offset the record came from.
SOURCE = "nexus-source"
#: On ``inference.requests`` records: the gateway instance waiting for the answer (drop-in APIs).
#: The worker copies it onto the response and token records it writes.
REPLY_TO = "nexus-reply-to"

# HTTP headers of the gateway (``/infer`` and the drop-in Ollama and OpenAI APIs).

#: Request header: the scheduling class, ``interactive`` or ``batch`` (a body field wins on /infer).
PRIORITY_HEADER = "X-Nexus-Priority"
#: Request header: the tenant, when API keys are off (with keys on, the key's name is the tenant).
TENANT_HEADER = "X-Nexus-Tenant"
#: Response header of the drop-in APIs: how long the request waited in the worker's schedule, in ms.
QUEUE_MS_HEADER = "X-Nexus-Queue-Ms"
