"""Nexus's wire contract: Avro schemas, the single-object codec and typed records.

The worker and the edges share only this package and the Kafka topics.
"""

from schemas.codec import (
    Codec,
    InvalidValueError,
    MalformedRecordError,
    NotAvroError,
    SchemaError,
    UnknownSchemaError,
)
from schemas.records import (
    InferenceOptions,
    InferenceRequest,
    InferenceResponse,
    InferenceToken,
    ModelContext,
    CACHE_POLICIES,
    decode_request,
    decode_response,
    decode_token,
    encode_request,
    encode_response,
    encode_token,
    new_id,
    utcnow,
)

__all__ = [
    "Codec",
    "InvalidValueError",
    "MalformedRecordError",
    "NotAvroError",
    "SchemaError",
    "UnknownSchemaError",
    "InferenceOptions",
    "InferenceRequest",
    "InferenceResponse",
    "InferenceToken",
    "ModelContext",
    "CACHE_POLICIES",
    "decode_request",
    "decode_response",
    "decode_token",
    "encode_request",
    "encode_response",
    "encode_token",
    "new_id",
    "utcnow",
]
