"""The limits every edge enforces on what a client sends, in one place.

``POST /infer`` and ``nexus submit`` (:mod:`schemas.validation`), the drop-in Ollama and
OpenAI APIs (:mod:`producers.gateway.dropin`) and the websocket bridge's frames
(:mod:`consumers.bridge.frames`) all check against these numbers, so a value one edge
accepts is not refused by another. The OpenAPI document and the docs quote them.

The body size is not here: it is a setting (``gateway.max_body_bytes``, 1 MiB), and the
bridge accepts messages of that size plus 1 KiB for the frame's own fields. Metadata has no
limit of its own besides its string values; HTTP header sizes bound the drop-in headers.
"""

from __future__ import annotations

# A request id (``id`` of POST /infer and of a submit frame, ``request_ids`` of a subscription).
MAX_ID_LENGTH = 256
# A session id (``context.session_id``, the ``X-Nexus-Session`` header, ``session_id`` of a
# subscription): it is the responses' Kafka key and a subscription's look-up key.
MAX_SESSION_ID_LENGTH = 256
# A tenant (``tenant`` of POST /infer, a submit frame and ``nexus submit``; the
# ``X-Nexus-Tenant`` header): the unit of fair sharing and of the per-tenant limits.
MAX_TENANT_LENGTH = 256
# ``timeout_ms`` of POST /infer and the ``X-Nexus-Timeout-Ms`` header: 1 ms to 24 h.
MAX_TIMEOUT_MS = 24 * 3600 * 1000
# ``max_tokens``: a positive 32-bit integer (Avro ``int``).
MAX_TOKENS = 2**31 - 1
# ``seed``: a signed 64-bit integer (Avro ``long``).
MIN_SEED = -(2**63)
MAX_SEED = 2**63 - 1
# Request ids in one subscribe or unsubscribe frame of the bridge.
MAX_REQUEST_IDS_PER_FRAME = 1000

# A request travels as ONE Kafka record, and Kafka refuses a record over its message limit
# (``message.max.bytes`` of the broker and ``max.request.size`` of the producer, 1 MiB by
# default): an edge must refuse a request that would not fit before producing it, with a 413
# that says so, instead of a producer error after it was accepted.
#
# The images of one request, decoded, in total (``messages[*].images``, ``images`` of the drop-in
# APIs). Base64 makes them a third bigger in a JSON body, and the 1 MiB body limit
# (``gateway.max_body_bytes``) is checked first, so 768 KiB of images is what a body can carry
# with room left for the conversation's text; in the record they are raw bytes.
MAX_IMAGE_BYTES = 768 * 1024
# The largest encoded request (Avro, single-object encoding) an edge produces: under Kafka's
# default 1 MiB (1_048_576 bytes) message limit with room for the record's key, headers and the
# batch's own overhead. :class:`producers.RequestProducer` checks it before producing and raises
# ``RequestTooLarge`` (413 at the HTTP edges, an error frame at the bridge).
MAX_RECORD_BYTES = 1_000_000

__all__ = [
    "MAX_ID_LENGTH",
    "MAX_IMAGE_BYTES",
    "MAX_RECORD_BYTES",
    "MAX_REQUEST_IDS_PER_FRAME",
    "MAX_SEED",
    "MAX_SESSION_ID_LENGTH",
    "MAX_TENANT_LENGTH",
    "MAX_TIMEOUT_MS",
    "MAX_TOKENS",
    "MIN_SEED",
]
