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
from schemas import CACHE_POLICIES
from schemas.limits import MAX_ID_LENGTH, MAX_SEED, MAX_SESSION_ID_LENGTH, MAX_TIMEOUT_MS, MAX_TOKENS, MIN_SEED

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
                    "requestBody": {
                        "required": True,
                        "description": f"At most {max_body} bytes.",
                        "content": {JSON: {"schema": _ref("InferRequest")}},
                    },
                    "responses": {
                        "202": _json("Submitted", "Kafka acknowledged the request; it will be answered."),
                        "400": _error("The body is not JSON, or a field is missing, unknown or invalid."),
                        "404": _error(f"Unknown `model_id`; this gateway routes {', '.join(models) or 'none'}."),
                        "413": _error(f"The body is larger than {max_body} bytes."),
                        "503": _error("Kafka did not acknowledge the request in time; it may not be written."),
                        "default": _error("Any other error, e.g. 405 for another method."),
                    },
                }
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
            "schemas": {**_schemas(models), **dropin_schemas()},
            "parameters": dropin_parameters(),
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
            if method == "post":
                responses["403"] = _json(error, "With API keys configured: the key may not use this model.")
    return spec


def _schemas(models: list[str]) -> dict[str, Any]:
    nullable_string = {"type": ["string", "null"]}
    return {
        "InferRequest": {
            "type": "object",
            "additionalProperties": False,
            "required": ["model_id", "input"],
            "properties": {
                "id": {"type": ["string", "null"], "minLength": 1, "maxLength": MAX_ID_LENGTH,
                       "description": "Request id; generated when absent. The response carries it."},
                "model_id": {"type": "string", "minLength": 1, "examples": models,
                             "description": "One of the models of `GET /models`; others are answered 404."},
                "input": {"type": "string", "description": "The prompt, sent to the model untouched."},
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
                "options": {
                    "type": ["object", "null"],
                    "additionalProperties": False,
                    "properties": {
                        "temperature": {"type": ["number", "null"], "minimum": 0},
                        "max_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_TOKENS},
                        "seed": {"type": ["integer", "null"], "minimum": MIN_SEED, "maximum": MAX_SEED},
                    },
                },
                "stream": {"type": "boolean", "default": False,
                           "description": "Also publish the answer's chunks on inference.tokens."},
                "cache": {"enum": list(CACHE_POLICIES), "default": "default",
                          "description": "default: deterministic requests (temperature 0 or a seed) may be "
                          "answered from the response cache; no-cache: skip the lookup; no-store: do not "
                          "keep this answer."},
                "timeout_ms": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_TIMEOUT_MS,
                               "description": "The request's deadline, from now; unanswered by then, it is "
                               "answered as expired."},
            },
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


def add_openapi_route(app: web.Application, settings: Settings) -> None:
    """Serve the document at ``GET /openapi.json``."""
    spec = build_spec(settings)

    async def openapi(request: web.Request) -> web.Response:
        return web.json_response(spec)

    app.router.add_get("/openapi.json", openapi)
