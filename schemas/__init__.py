"""Nexus's wire contract: Avro schemas, the single-object codec, typed records,
record headers, the endpoint-state and queue records, limits and request validation.

The worker and the edges share only this package and the Kafka topics.
"""

from schemas import headers

from schemas.codec import (
    Codec,
    InvalidValueError,
    MalformedRecordError,
    NotAvroError,
    SchemaError,
    UnknownSchemaError,
)
from schemas.endpoint_state import WorkerReport
from schemas.queue_state import QueueReport
from schemas.records import (
    BATCH,
    INTERACTIVE,
    PRIORITIES,
    InferenceCancel,
    InferenceOptions,
    InferenceRequest,
    InferenceResponse,
    InferenceToken,
    Message,
    ModelContext,
    Tool,
    ToolCall,
    BAD_REQUEST,
    CACHE_POLICIES,
    MODEL_NOT_FOUND,
    decode_cancel,
    decode_request,
    decode_response,
    decode_token,
    encode_cancel,
    encode_request,
    encode_response,
    encode_token,
    new_id,
    utcnow,
)

__all__ = [
    # the codec
    "Codec",
    "InvalidValueError",
    "MalformedRecordError",
    "NotAvroError",
    "SchemaError",
    "UnknownSchemaError",
    # records
    "BATCH",
    "INTERACTIVE",
    "PRIORITIES",
    "InferenceCancel",
    "InferenceOptions",
    "InferenceRequest",
    "InferenceResponse",
    "InferenceToken",
    "Message",
    "ModelContext",
    "Tool",
    "ToolCall",
    "BAD_REQUEST",
    "CACHE_POLICIES",
    "MODEL_NOT_FOUND",
    "decode_cancel",
    "decode_request",
    "decode_response",
    "decode_token",
    "encode_cancel",
    "encode_request",
    "encode_response",
    "encode_token",
    "new_id",
    "utcnow",
    "WorkerReport",
    "QueueReport",
    # header names
    "headers",
]
