"""Names of the Kafka record headers Nexus writes and reads: part of the wire contract.

Headers carry what is about a record rather than in it, so the Avro values stay
the same whatever path a record took.
"""

from __future__ import annotations

__all__ = ["ERROR", "ERROR_KIND", "PRIORITY_HEADER", "QUEUE_MS_HEADER", "REPLY_TO", "SOURCE", "STAGES",
           "STAGE_NAMES", "TENANT_HEADER", "TRACEPARENT", "TRACESTATE", "read_stages", "stages_value"]

#: On ``inference.dlq`` records: why the record was dead-lettered, for a human.
ERROR = "nexus-error"
#: On ``inference.dlq`` records: the kind of failure (``undecodable``, ``unknown-model``...).
ERROR_KIND = "nexus-error-kind"
#: On ``inference.dlq`` records: the topic, partition and offset the record came from.
SOURCE = "nexus-source"
#: On ``inference.requests`` records: the gateway instance waiting for the answer (drop-in APIs).
#: The worker copies it onto the response and token records it writes.
REPLY_TO = "nexus-reply-to"
#: On ``inference.requests``, ``inference.responses`` and ``inference.tokens`` records: the W3C trace
#: context (https://www.w3.org/TR/trace-context/) of the call that brought the request, under the
#: names OpenTelemetry's Kafka instrumentations use; the same names are read from HTTP requests.
#: Formats and rules: nexus/tracing.py.
TRACEPARENT = "traceparent"
#: Beside ``traceparent`` when the caller sent one: its vendors' entries, passed on unchanged.
TRACESTATE = "tracestate"
#: On ``inference.responses`` records written by a worker: the wall-clock times (Unix epoch, in
#: milliseconds with three decimals) of the request's way through it, ``name=ms`` pairs joined by
#: commas in the order of :data:`STAGE_NAMES`; a stage the request did not pass (a cached answer
#: calls no model) is left out. For measuring where time goes (bench/latency_floor.py); readers
#: must not depend on it.
STAGES = "nexus-stages"
#: ``appended``: the request record's broker timestamp (its produce acknowledged); ``fetched``: the
#: worker's consumer handed it over; ``batched``: its batch started; ``dispatched``: its model call
#: started; ``answered``: the answer was ready; ``sent``: the response record went to the producer.
STAGE_NAMES = ("appended", "fetched", "batched", "dispatched", "answered", "sent")

# HTTP headers of the gateway (``/infer`` and the drop-in Ollama and OpenAI APIs).

#: Request header: the scheduling class, ``interactive`` or ``batch`` (a body field wins on /infer).
PRIORITY_HEADER = "X-Nexus-Priority"
#: Request header: the tenant, when API keys are off (with keys on, the key's name is the tenant).
TENANT_HEADER = "X-Nexus-Tenant"
#: Response header of the drop-in APIs: how long the request waited in the worker's schedule, in ms.
QUEUE_MS_HEADER = "X-Nexus-Queue-Ms"


def stages_value(times: dict[str, float]) -> bytes:
    """The :data:`STAGES` header value of ``times`` (stage name: epoch seconds)."""
    return ",".join(f"{name}={times[name] * 1000:.3f}" for name in STAGE_NAMES if name in times).encode()


def read_stages(value: bytes) -> dict[str, float]:
    """The stage times (epoch seconds) of a :data:`STAGES` header value; unknown names are kept,
    malformed pairs skipped."""
    times = {}
    for pair in value.decode("ascii", "replace").split(","):
        name, _, ms = pair.partition("=")
        try:
            times[name] = float(ms) / 1000
        except ValueError:
            continue
    return times
