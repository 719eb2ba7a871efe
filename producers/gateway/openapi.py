"""``GET /openapi.json``: the gateway's HTTP API as an OpenAPI 3.1 document.

Built from code, not kept as a static file, so the limits in it are the ones the gateway
enforces (:mod:`schemas.limits`, ``gateway.max_body_bytes``) and the model list is
this gateway's. ``tests/integration/test_openapi.py`` checks the document against the OpenAPI 3.1
schema and validates the running gateway's real answers against it.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from nexus.settings import Settings
from schemas import CACHE_POLICIES, INTERACTIVE, PRIORITIES
from schemas.limits import (
    MAX_ID_LENGTH,
    MAX_IMAGE_BYTES,
    MAX_RECORD_BYTES,
    MAX_SEED,
    MAX_SESSION_ID_LENGTH,
    MAX_TENANT_LENGTH,
    MAX_TIMEOUT_MS,
    MAX_TOKENS,
    MIN_SEED,
)
from schemas.headers import PRIORITY_HEADER, TENANT_HEADER, TRACEPARENT, TRACESTATE
from schemas.validation import OPTION_FIELDS, ROLES, TOOL_CHOICES

from producers.gateway.access import is_open
from producers.gateway.dropin import dropin_parameters, dropin_paths, dropin_schemas

JSON = "application/json"
PROMETHEUS = "text/plain"  # the exposition format's media type; its version is a parameter
_REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _json(schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": _ref(schema)}}}


def _error(description: str) -> dict[str, Any]:
    return _json("Error", description)


RETRY_AFTER = {"Retry-After": {"description": "Whole seconds to wait before trying again.",
                               "schema": {"type": "integer", "minimum": 1}}}


def _rate_limited(schema: str, description: str) -> dict[str, Any]:
    return {**_json(schema, description), "headers": RETRY_AFTER}


def _request_id_parameter() -> dict[str, Any]:
    return {"name": "id", "in": "path", "required": True,
            "schema": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH},
            "description": "The request's id (`POST /infer` answered it; the drop-in APIs' `X-Nexus-Request-Id`)."}


def build_spec(settings: Settings) -> dict[str, Any]:
    """The OpenAPI document for a gateway running with ``settings``."""
    models = list(settings.model_ids)
    max_body = settings.gateway.max_body_bytes
    spec = {
        "openapi": "3.1.0",
        "info": {
            "title": "Nexus gateway",
            "version": "1",
            "summary": "Submit LLM inference requests to Kafka; answers appear on inference.responses.",
            "description": (
                "`POST /infer` answers `202` once Kafka acknowledged the request (acks=all): it will be "
                "answered, on the Kafka topic `inference.responses` keyed by the request's session id. "
                "Every error body is `{\"error\": \"...\"}`."
            ),
        },
        "paths": {
            "/infer": {
                "post": {
                    "operationId": "submitInference",
                    "summary": "Submit one inference request",
                    "parameters": [{"$ref": "#/components/parameters/NexusPriority"},
                                   {"$ref": "#/components/parameters/NexusTenant"},
                                   {"$ref": "#/components/parameters/TraceParent"},
                                   {"$ref": "#/components/parameters/TraceState"}],
                    "requestBody": {
                        "required": True,
                        "description": f"At most {max_body} bytes.",
                        "content": {JSON: {"schema": _ref("InferRequest")}},
                    },
                    "responses": {
                        "202": _json("Submitted", "Kafka acknowledged the request; it will be answered."),
                        "400": _error("The body is not JSON, or a field is missing, unknown or invalid."),
                        "404": _error(f"Unknown `model_id`; this gateway routes {', '.join(models) or 'none'}."),
                        "413": _error(f"The body is larger than {max_body} bytes, the images of the request "
                                      f"total more than {MAX_IMAGE_BYTES} bytes (decoded), or the encoded request "
                                      f"is over {MAX_RECORD_BYTES} bytes: a request must fit one Kafka record. "
                                      "Nothing was written."),
                        "429": _rate_limited("RateLimited", "Over one of the tenant's limits (requests or "
                                             "tokens per minute, requests waiting or running), or `timeout_ms` is "
                                             "shorter than the model queue's estimated wait. Nothing was written."),
                        "503": _error("Kafka did not acknowledge the request in time; it may not be written."),
                        "default": _error("Any other error, e.g. 405 for another method."),
                    },
                }
            },
            "/infer/{id}": {
                "get": {
                    "operationId": "inferenceStatus",
                    "parameters": [_request_id_parameter()],
                    "summary": "Where a request stands: its position and estimated start, or that it runs",
                    "description": "From the workers' latest queue reports (`nexus.queue`). A request answered "
                                   "already, or not read by a worker yet, is 404 `unknown`: read its answer on "
                                   "inference.responses. With API keys, a key sees only its own requests.",
                    "responses": {
                        "200": _json("QueueStatus", "It waits (`queued`) or its model call runs (`running`)."),
                        "400": _error("The id is empty or too long."),
                        "404": _json("QueueUnknown", "No worker reports it as waiting or running."),
                        "default": _error("Any other error."),
                    },
                },
                "delete": {
                    "operationId": "cancelInference",
                    "parameters": [_request_id_parameter()],
                    "summary": "Cancel a request",
                    "description": "Writes a cancel to `inference.cancels`: the worker holding the request drops "
                                   "it if it still waits, or aborts its model call; it is answered with status "
                                   "`cancelled`. A request answered already is not changed. With API keys, only "
                                   "the key that submitted it can cancel it.",
                    "responses": {
                        "202": _json("Cancelling", "The cancel is written; the answer says `cancelled`."),
                        "400": _error("The id is empty or too long."),
                        "503": _error("Kafka did not acknowledge the cancel."),
                        "default": _error("Any other error."),
                    },
                },
            },
            "/health": {
                "get": {
                    "operationId": "health",
                    "summary": "Whether Kafka and at least one endpoint of every model answer",
                    "responses": {
                        "200": _json("Health", "Everything answers."),
                        "503": _json("Health", "A check failed; its entry says why."),
                        "default": _error("Any other error."),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics of this gateway (nexus_gateway_*)",
                    "responses": {
                        "200": {
                            "description": "Prometheus text exposition format.",
                            "content": {PROMETHEUS: {"schema": {"type": "string"}}},
                        },
                        "default": _error("Any other error."),
                    },
                }
            },
            "/models": {
                "get": {
                    "operationId": "models",
                    "summary": "The models this gateway routes, with their endpoints",
                    "responses": {
                        "200": _json("Models", "The configured models."),
                        "default": _error("Any other error."),
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "responses": {
                        "200": {"description": "OpenAPI 3.1.", "content": {JSON: {"schema": {"type": "object"}}}},
                        "default": _error("Any other error."),
                    },
                }
            },
            **dropin_paths(),  # Ollama's /api/* and OpenAI's /v1/* (docs/drop-in.md)
        },
        "components": {
            "schemas": _merged(_schemas(models), dropin_schemas()),
            "parameters": {**dropin_parameters(), **scheduling_parameters()},
            "securitySchemes": {BEARER_SCHEME: {
                "type": "http", "scheme": "bearer",
                "description": "An API key's token, when the gateway has keys configured (docs/security.md); "
                               "the OpenAI and Ollama clients send it as their api key / Authorization header.",
            }},
        },
    }
    return _with_security(spec, settings.access.enabled)


BEARER_SCHEME = "bearerAuth"


def _with_security(spec: dict[str, Any], required: bool) -> dict[str, Any]:
    """Every path but the open ones (health, page, docs) answers 401 without a valid key, and the
    calls that submit 403 for a model outside the key's list. The requirement is stated only when
    this gateway has keys; the answers are documented always, as they depend on its configuration."""
    for path, operations in spec["paths"].items():
        if is_open(path):
            continue
        error = "OpenAIError" if path.startswith("/v1/") else "Error"
        for method, operation in operations.items():
            if required:
                operation["security"] = [{BEARER_SCHEME: []}]
            responses = operation["responses"]
            responses["401"] = _json(error, "With API keys configured: no `Authorization: Bearer <token>`, or "
                                            "not a valid key's token. Comes with `WWW-Authenticate: Bearer`.")
            if method == "post" and path != "/infer/{id}":
                responses["403"] = _json(error, "With API keys configured: the key may not use this model.")
    return spec


def _schemas(models: list[str]) -> dict[str, Any]:
    nullable_string = {"type": ["string", "null"]}
    return {
        "InferRequest": {
            "type": "object",
            "additionalProperties": False,
            "required": ["model_id"],
            "anyOf": [  # a prompt, or a conversation
                {"required": ["input"], "properties": {"input": {"type": "string"}, "messages": {"maxItems": 0}}},
                {"required": ["messages"], "properties": {"messages": {"type": "array", "minItems": 1},
                                                          "input": {"type": ["null", "string"], "maxLength": 0}}},
            ],
            "description": "A prompt (`input`) or a conversation (`messages`), not both.",
            "properties": {
                "id": {"type": ["string", "null"], "minLength": 1, "maxLength": MAX_ID_LENGTH,
                       "description": "Request id; generated when absent. The response carries it."},
                "model_id": {"type": "string", "minLength": 1, "examples": models,
                             "description": "One of the models of `GET /models`; others are answered 404."},
                "input": {"type": ["string", "null"],
                          "description": "The prompt, sent to the model untouched (the backend's generate API). "
                          "Required unless `messages` is given; with `messages`, absent, null or \"\"."},
                "messages": {"type": ["array", "null"], "items": _ref("InferMessage"),
                             "description": "A conversation, oldest turn first, sent to the backend's chat API so "
                             "the model's chat template sees the roles. The request's `input` (audit trail) is "
                             f"then the last user turn's text. All its images together: at most {MAX_IMAGE_BYTES} "
                             "bytes decoded (413). `[]` is the same as absent."},
                "tools": {"type": ["array", "null"], "items": _ref("InferTool"),
                          "description": "Functions the model may call (with `messages` only); names are unique."},
                "tool_choice": {
                    "anyOf": [
                        {"type": "string", "minLength": 1,
                         "description": f"One of {list(TOOL_CHOICES)} or one tool's name."},
                        {"type": "object", "additionalProperties": False, "required": ["function"],
                         "properties": {"type": {"const": "function"},
                                        "function": {"type": "object", "additionalProperties": False,
                                                     "required": ["name"],
                                                     "properties": {"name": {"type": "string", "minLength": 1}}}},
                         "description": "OpenAI's form of one tool's name."},
                        {"type": "null"},
                    ],
                    "description": "Which tools the model may call; only with `tools`. Absent: the backend's default.",
                },
                "format": {
                    "anyOf": [{"const": "json"}, {"const": ""}, {"type": "object"}, {"type": "null"}],
                    "description": "The answer's form: `\"json\"` (any JSON value) or a JSON schema object the answer "
                    "must match (Ollama enforces it by constrained decoding); absent: free text.",
                },
                "keep_alive": {
                    "anyOf": [{"type": "string", "maxLength": 64}, {"type": "number"}, {"type": "null"}],
                    "description": "How long the backend keeps the model loaded after this request, as Ollama "
                    "takes it: a duration (`\"5m\"`, `\"1h30m\"`, `\"0\"` unloads at once, negative keeps it "
                    "loaded) or a number of seconds.",
                },
                "context": {
                    "type": ["object", "null"],
                    "additionalProperties": False,
                    "description": "The model context, echoed in the response; a fresh session when absent.",
                    "properties": {
                        "session_id": {"type": ["string", "null"], "minLength": 1,
                                       "maxLength": MAX_SESSION_ID_LENGTH,
                                       "description": "Generated when absent; the response's Kafka key."},
                        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                    },
                },
                "options": _ref("InferOptions"),
                "stream": {"type": "boolean", "default": False,
                           "description": "Also publish the answer's chunks on inference.tokens."},
                "cache": {"enum": list(CACHE_POLICIES), "default": "default",
                          "description": "default: deterministic requests (temperature 0 or a seed) may be "
                          "answered from the response cache; no-cache: skip the lookup; no-store: do not "
                          "keep this answer."},
                "timeout_ms": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_TIMEOUT_MS,
                               "description": "The request's deadline, from now; unanswered by then, it is "
                               "answered as expired. Shorter than its model queue's estimated wait: 429."},
                "priority": {"enum": [*PRIORITIES, None], "default": INTERACTIVE,
                             "description": "The scheduling class: interactive requests are dispatched before "
                             "batch ones. Wins over the `X-Nexus-Priority` header."},
                "tenant": {"type": ["string", "null"], "minLength": 1, "maxLength": MAX_TENANT_LENGTH,
                           "description": "Who the request counts against (fair share, limits). Wins over the "
                           "`X-Nexus-Tenant` header; with API keys the key's name is the tenant and this is "
                           "ignored; absent: the session."},
            },
        },
        "InferOptions": {
            "type": ["object", "null"],
            "additionalProperties": False,
            "description": "How the model samples, as Ollama's `options` and OpenAI's body fields of the same "
            "names say; absent keys are the backend's defaults. Any other key is refused (400): give other "
            "backend options in `extra`.",
            "properties": {
                "temperature": {"type": ["number", "null"], "minimum": 0},
                "max_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_TOKENS,
                               "description": "Ollama's num_predict; OpenAI's max_tokens."},
                "seed": {"type": ["integer", "null"], "minimum": MIN_SEED, "maximum": MAX_SEED},
                "top_p": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                "top_k": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_TOKENS},
                "min_p": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                "stop": {"anyOf": [{"type": "string", "minLength": 1},
                                   {"type": "array", "items": {"type": "string", "minLength": 1}},
                                   {"type": "null"}],
                         "description": "Stop sequences: one string or a list."},
                "num_ctx": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_TOKENS,
                            "description": "The context window (Ollama)."},
                "repeat_penalty": {"type": ["number", "null"], "minimum": 0},
                "presence_penalty": {"type": ["number", "null"]},
                "frequency_penalty": {"type": ["number", "null"]},
                "extra": {"type": ["object", "null"],
                          "description": "Any other backend option (Ollama's `mirostat`, `num_gpu`...; an "
                          "OpenAI-compatible server's extra body fields), passed on as given. Its keys may not "
                          f"be the options above ({', '.join(OPTION_FIELDS[:-1])})."},
            },
        },
        "InferMessage": {
            "type": "object",
            "additionalProperties": False,
            "required": ["role"],
            "description": "One turn of a conversation (Ollama's message shape). The `message` of an answer "
            "can be appended as it is.",
            "properties": {
                "role": {"enum": list(ROLES)},
                "content": {"type": ["string", "null"], "description": "The turn's text; null or absent is \"\"."},
                "images": {"type": ["array", "null"], "items": {"type": "string", "contentEncoding": "base64"},
                           "description": "Image files, base64 (a `data:...;base64,` URL too)."},
                "tool_calls": {"type": ["array", "null"], "items": _ref("InferToolCall"),
                               "description": "An assistant turn's calls."},
                "tool_name": {"type": ["string", "null"],
                              "description": "A tool turn: the function whose result `content` is."},
                "tool_call_id": {"type": ["string", "null"],
                                 "description": "A tool turn: the id of the call it answers (OpenAI backends)."},
            },
        },
        "InferToolCall": {
            "description": "A call an assistant turn made: `{id?, name, arguments}` (the shape answers have) or "
            "Ollama's and OpenAI's `{id?, type?, function: {name, arguments}}`. `arguments` is an object, or "
            "a JSON object's text as OpenAI sends it; absent, `{}`.",
            "anyOf": [
                {"type": "object", "additionalProperties": False, "required": ["name"],
                 "properties": {"id": {"type": ["string", "null"], "minLength": 1, "maxLength": MAX_ID_LENGTH},
                                "type": {"const": "function"},
                                "name": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH},
                                "arguments": {"type": ["object", "string", "null"]}}},
                {"type": "object", "additionalProperties": False, "required": ["function"],
                 "properties": {"id": {"type": ["string", "null"], "minLength": 1, "maxLength": MAX_ID_LENGTH},
                                "type": {"const": "function"},
                                "function": {"type": "object", "additionalProperties": False, "required": ["name"],
                                             "properties": {
                                                 "name": {"type": "string", "minLength": 1,
                                                          "maxLength": MAX_ID_LENGTH},
                                                 "arguments": {"type": ["object", "string", "null"]},
                                                 "index": {"type": ["integer", "null"]}}}}},
            ],
        },
        "InferTool": {
            "description": "A function the model may call: `{name, description?, parameters?}` or OpenAI's and "
            "Ollama's `{type: \"function\", function: {name, description?, parameters?}}`; `parameters` is a JSON "
            "schema object (absent: `{}`).",
            "anyOf": [
                {"type": "object", "additionalProperties": False, "required": ["name"],
                 "properties": {"type": {"const": "function"}, **_function_properties()}},
                {"type": "object", "additionalProperties": False, "required": ["function"],
                 "properties": {"type": {"const": "function"},
                                "function": {"type": "object", "additionalProperties": False, "required": ["name"],
                                             "properties": _function_properties()}}},
            ],
        },
        "AnswerToolCall": {
            "type": "object",
            "required": ["id", "name", "arguments"],
            "description": "A function the model asks the caller to run.",
            "properties": {
                "id": {"type": ["string", "null"], "description": "The backend's id (OpenAI); null from Ollama."},
                "name": {"type": "string"},
                "arguments": {"description": "An object (a JSON object's text if the model wrote something else)."},
            },
        },
        "AnswerMessage": {
            "type": "object",
            "required": ["role", "content"],
            "description": "The answer as a conversation turn: append it to `messages` for the next turn.",
            "properties": {
                "role": {"const": "assistant"},
                "content": {"type": "string"},
                "tool_calls": {"type": "array", "items": _ref("AnswerToolCall"), "description": "Absent when none."},
            },
        },
        "InferenceResponse": {
            "type": "object",
            "required": ["id", "model_id", "status", "context", "output", "tool_calls", "message"],
            "description": "An answer as JSON, as the bridge's `result` frames, `nexus submit --json` and "
            "`nexus replay` show it (the Avro record on inference.responses has the same fields, less "
            "`message`). Further fields may be added.",
            "properties": {
                "id": {"type": "string"},
                "model_id": {"type": "string"},
                "status": {"enum": ["ok", "error", "expired", "cancelled"],
                           "description": "`expired`: its deadline passed while it waited; `cancelled`: the client "
                           "cancelled it (`output` may hold what was streamed before)."},
                "queue_ms": {"type": "integer", "description": "How long it waited in the worker's schedule."},
                "priority": {"type": "string"},
                "tenant": {"type": ["string", "null"]},
                "context": {"type": "object"},
                "output": {"type": "string", "description": "The answer's text (may be \"\" with tool calls)."},
                "tool_calls": {"type": "array", "items": _ref("AnswerToolCall")},
                "message": _ref("AnswerMessage"),
                "error": {"type": ["string", "null"]},
                "error_kind": {"type": ["string", "null"],
                               "description": "`model_not_found`, `bad_request` (the backend refused the request, "
                               "e.g. tools for a model without tool support; `error` is its message)..."},
                "done_reason": {"type": ["string", "null"]},
            },
        },
        "InferenceToken": {
            "type": "object",
            "required": ["id", "seq", "text"],
            "description": "A streamed chunk, as the bridge's `token` frames show it: `tool_calls` (each call "
            "whole) only when the chunk carries some; `text` may then be \"\".",
            "properties": {
                "id": {"type": "string"},
                "seq": {"type": "integer"},
                "text": {"type": "string"},
                "tool_calls": {"type": "array", "items": _ref("AnswerToolCall")},
            },
        },
        "RateLimited": {
            "type": "object",
            "additionalProperties": False,
            "required": ["error", "retry_after_s"],
            "properties": {"error": {"type": "string", "description": "Which limit, and when to retry."},
                           "retry_after_s": {"type": "integer", "minimum": 1,
                                             "description": "As the `Retry-After` header."}},
        },
        "QueueStatus": {
            "type": "object",
            "required": ["id", "state", "model", "priority", "worker"],
            "properties": {
                "id": {"type": "string"},
                "state": {"enum": ["queued", "running"]},
                "model": {"type": "string"},
                "priority": {"type": "string"},
                "tenant": {"type": ["string", "null"]},
                "position": {"type": "integer", "minimum": 0, "description": "Queued: 0 starts next."},
                "eta_ms": {"type": "integer", "minimum": 0,
                           "description": "Queued: estimated milliseconds from now until it starts, from the "
                           "measured dispatch rate."},
                "waited_ms": {"type": "integer", "minimum": 0, "description": "Queued: how long it has waited."},
                "running_ms": {"type": "integer", "minimum": 0, "description": "Running: for how long."},
                "worker": {"type": "string", "description": "The worker holding it."},
            },
        },
        "QueueUnknown": {
            "type": "object",
            "additionalProperties": False,
            "required": ["id", "state", "error"],
            "properties": {"id": {"type": "string"}, "state": {"const": "unknown"}, "error": {"type": "string"}},
        },
        "Cancelling": {
            "type": "object",
            "additionalProperties": False,
            "required": ["id", "status"],
            "properties": {"id": {"type": "string"}, "status": {"const": "cancelling"}},
        },
        "Submitted": {
            "type": "object",
            "additionalProperties": False,
            "required": ["id", "status"],
            "properties": {"id": {"type": "string"}, "status": {"const": "submitted"}},
        },
        "Error": {
            "type": "object",
            "additionalProperties": False,
            "required": ["error"],
            "properties": {"error": {"type": "string", "description": "What was wrong, in words."}},
        },
        "Health": {
            "type": "object",
            "required": ["status", "checks"],
            "properties": {
                "status": {"enum": ["ok", "unavailable"]},
                "checks": {
                    "type": "object",
                    "description": "`kafka`, `model:<id>` for every model (ok when an endpoint answers and lists the model) and `reader:<name>` for each background reader.",
                    "required": ["kafka"],
                    "additionalProperties": {
                        "type": "object",
                        "required": ["status"],
                        "properties": {
                            "status": {"enum": ["ok", "down"]},
                            "reason": {"type": "string", "description": "Why it is down."},
                        },
                    },
                },
            },
        },
        "Models": {
            "type": "object",
            "required": ["models"],
            "properties": {"models": {"type": "array", "items": _ref("Model")}},
        },
        "Model": {
            "type": "object",
            "required": ["id", "endpoints", "timeout_s"],
            "description": "Further fields may be added; clients should ignore those they do not know.",
            "properties": {
                "id": {"type": "string"},
                "endpoints": {"type": "array", "items": _ref("Endpoint")},
                "timeout_s": {"type": "number", "exclusiveMinimum": 0},
                "fallback": nullable_string,
                "cache": {"type": "string"},
                "queue": {
                    "type": "object",
                    "description": "The workers' schedules for this model, from their latest queue reports.",
                    "required": ["waiting", "running", "rate_per_s"],
                    "properties": {
                        "waiting": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0},
                                    "description": "Requests waiting, per priority."},
                        "waiting_total": {"type": "integer", "minimum": 0},
                        "running": {"type": "integer", "minimum": 0, "description": "Model calls running."},
                        "rate_per_s": {"type": "number", "minimum": 0,
                                       "description": "Measured dispatches per second (0: not known yet)."},
                        "workers_reporting": {"type": "integer", "minimum": 0},
                    },
                },
            },
        },
        "Endpoint": {
            "type": "object",
            "required": ["url"],
            "properties": {
                "url": {"type": "string", "description": "An Ollama server."},
                "weight": {"type": "number"},
                "max_concurrency": {"type": "integer"},
                "max_rps": {"type": ["number", "null"]},
            },
        },
    }


def scheduling_parameters() -> dict[str, Any]:
    """The ``X-Nexus-Priority``, ``X-Nexus-Tenant`` and W3C trace-context headers of ``POST /infer``
    and the drop-in APIs."""
    return {
        "NexusPriority": {
            "name": PRIORITY_HEADER, "in": "header", "required": False,
            "schema": {"enum": list(PRIORITIES), "default": INTERACTIVE},
            "description": "The scheduling class: interactive requests are dispatched before batch ones.",
        },
        "NexusTenant": {
            "name": TENANT_HEADER, "in": "header", "required": False,
            "schema": {"type": "string", "minLength": 1, "maxLength": MAX_TENANT_LENGTH},
            "description": "Who the request counts against (fair share, limits); with API keys the key's name "
                           "is the tenant and this header is ignored; absent: the session.",
        },
        "TraceParent": {
            "name": TRACEPARENT, "in": "header", "required": False, "schema": {"type": "string"},
            "description": "W3C trace context: the request, its token chunks and its response are in this trace "
                           "(a new one when absent or invalid); docs/observability.md, Traces.",
        },
        "TraceState": {
            "name": TRACESTATE, "in": "header", "required": False, "schema": {"type": "string"},
            "description": "W3C trace context: vendors' entries, passed on unchanged with `traceparent`.",
        },
    }


def _merged(own: dict[str, Any], dropin: dict[str, Any]) -> dict[str, Any]:
    """The components of both; a name defined twice would silently lose one, so it is an error."""
    both = sorted(set(own) & set(dropin))
    if both:
        raise ValueError(f"OpenAPI component schemas defined twice: {both}")
    return {**own, **dropin}


def _function_properties() -> dict[str, Any]:
    return {
        "name": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH},
        "description": {"type": ["string", "null"]},
        "parameters": {"type": ["object", "null"], "description": "A JSON schema of the arguments."},
    }


def add_openapi_route(app: web.Application, settings: Settings) -> None:
    """Serve the document at ``GET /openapi.json``."""
    spec = build_spec(settings)

    async def openapi(request: web.Request) -> web.Response:
        return web.json_response(spec)

    app.router.add_get("/openapi.json", openapi)
