"""The drop-in APIs' part of ``GET /openapi.json``: Ollama's ``/api/*`` and OpenAI's ``/v1/*``.

Kept next to the code it describes (:mod:`producers.gateway.dropin.ollama`, :mod:`producers.gateway.dropin.openai`);
:mod:`producers.gateway.openapi` merges it into the gateway's document. It describes what Nexus
accepts and answers, not all of Ollama's or OpenAI's APIs: fields Nexus refuses are named.
"""

from __future__ import annotations

from typing import Any

from schemas.limits import MAX_SESSION_ID_LENGTH, MAX_TIMEOUT_MS

from producers.gateway.dropin.conversation import (
    CACHE_HEADER,
    IGNORED_HEADER,
    REQUEST_ID_HEADER,
    SESSION_HEADER,
    TIMEOUT_HEADER,
)

JSON = "application/json"
_REF = "#/components/schemas/"
_PARAMS = "#/components/parameters/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _json(schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": _ref(schema)}}}


def _answers(ok: str, stream_type: str, stream_text: str, error: str) -> dict[str, Any]:
    """The statuses every generate-like call answers, in one error shape."""
    return {
        "200": {
            "description": "The answer; with streaming, " + stream_text,
            "headers": {
                REQUEST_ID_HEADER: {"description": "The request's id in Kafka (inference.requests).",
                                    "schema": {"type": "string"}},
                IGNORED_HEADER: {"description": "Fields and options accepted but not carried to the model.",
                                 "schema": {"type": "string"}},
            },
            "content": {JSON: {"schema": _ref(ok)}, stream_type: {"schema": {"type": "string"}}},
        },
        "400": _json(error, "The body is not JSON, or a field is invalid or not supported by Nexus."),
        "404": _json(error, "The model is not one Nexus routes."),
        "413": _json(error, "The body is larger than the gateway's limit."),
        "500": _json(error, "The pipeline answered with an error (the endpoint failed, the deadline passed...)."),
        "503": _json(error, "Kafka did not acknowledge the request, or this gateway cannot read answers."),
        "504": _json(error, "No answer within the timeout; the request is still answered, into the audit log."),
        "default": _json(error, "Any other error."),
    }


def _headers() -> list[dict[str, str]]:
    return [{"$ref": _PARAMS + name} for name in ("NexusSession", "NexusTimeout", "NexusCache")]


def dropin_paths() -> dict[str, Any]:
    ndjson = ("`application/x-ndjson`: chunks (`done: false`), then the final object with the statistics; "
              "a `{\"error\"}` line if it fails mid-stream.")
    sse = ("`text/event-stream`: `data: <chunk>` events, the last chunk with `finish_reason` (then one with "
           "`usage` when `stream_options.include_usage`), then `data: [DONE]`; a `data: {\"error\"}` event "
           "if it fails mid-stream.")
    tags = ["Ollama API"]
    openai = ["OpenAI API"]
    return {
        "/api/generate": {"post": {
            "operationId": "ollamaGenerate", "tags": tags, "parameters": _headers(),
            "summary": "Ollama's generate, answered through Kafka",
            "description": "Streams unless `\"stream\": false`. A `system` prompt is folded into the input "
                           "with the prompt as a two-turn transcript (docs/drop-in.md). An empty prompt is "
                           "Ollama's load call, answered at once with `done_reason: load`.",
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref("OllamaGenerateRequest")}}},
            "responses": _answers("OllamaGenerateResponse", "application/x-ndjson", ndjson, "Error"),
        }},
        "/api/chat": {"post": {
            "operationId": "ollamaChat", "tags": tags, "parameters": _headers(),
            "summary": "Ollama's chat, answered through Kafka",
            "description": "The conversation becomes one input: a single user message verbatim, otherwise a "
                           "transcript, one `role: \"content\"` line per message (docs/drop-in.md).",
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref("OllamaChatRequest")}}},
            "responses": _answers("OllamaChatResponse", "application/x-ndjson", ndjson, "Error"),
        }},
        "/api/tags": {"get": {
            "operationId": "ollamaTags", "tags": tags, "summary": "The models Nexus routes, in Ollama's shape",
            "responses": {"200": _json("OllamaTags", "Every configured model; sizes and digests are unknown "
                                                     "to Nexus (0 and \"\")."),
                          "default": _json("Error", "Any other error.")},
        }},
        "/api/version": {"get": {
            "operationId": "ollamaVersion", "tags": tags, "summary": "Nexus's version, where Ollama's would be",
            "responses": {"200": _json("OllamaVersion", "The version."),
                          "default": _json("Error", "Any other error.")},
        }},
        "/v1/chat/completions": {"post": {
            "operationId": "openaiChatCompletions", "tags": openai, "parameters": _headers(),
            "summary": "OpenAI's chat completions, answered through Kafka",
            "description": "Messages become one input as for `/api/chat`. Automatic retries of a 504 are "
                           "refused with `x-should-retry: false`: the request is still being answered.",
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref("ChatCompletionRequest")}}},
            "responses": _answers("ChatCompletion", "text/event-stream", sse, "OpenAIError"),
        }},
        "/v1/completions": {"post": {
            "operationId": "openaiCompletions", "tags": openai, "parameters": _headers(),
            "summary": "OpenAI's (legacy) completions, answered through Kafka",
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref("CompletionRequest")}}},
            "responses": _answers("Completion", "text/event-stream", sse, "OpenAIError"),
        }},
        "/v1/models": {"get": {
            "operationId": "openaiModels", "tags": openai, "summary": "The models Nexus routes, in OpenAI's shape",
            "description": "`GET /v1/models/{id}` answers one of them, or 404 `model_not_found`.",
            "responses": {"200": _json("OpenAIModelList", "Every configured model."),
                          "default": _json("OpenAIError", "Any other error.")},
        }},
    }


def dropin_parameters() -> dict[str, Any]:
    return {
        "NexusSession": {
            "name": SESSION_HEADER, "in": "header", "required": False,
            "schema": {"type": "string", "minLength": 1, "maxLength": MAX_SESSION_ID_LENGTH},
            "description": "The model context's session id (fresh when absent). Metadata comes from "
                           "`X-Nexus-Meta-<key>` headers, keys lower-cased.",
        },
        "NexusTimeout": {
            "name": TIMEOUT_HEADER, "in": "header", "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_TIMEOUT_MS},
            "description": "How long to wait for the answer before 504 (default `gateway.reply_timeout_s`).",
        },
        "NexusCache": {
            "name": CACHE_HEADER, "in": "header", "required": False,
            "schema": {"enum": ["default", "no-cache", "no-store"]},
            "description": "The response cache policy, as `cache` of `POST /infer`.",
        },
    }


def dropin_schemas() -> dict[str, Any]:
    options = {
        "type": "object",
        "description": "`temperature`, `num_predict` (<= 0: no limit) and `seed` reach the model; other "
                       "options are ignored and named in `X-Nexus-Ignored`.",
        "properties": {"temperature": {"type": "number", "minimum": 0},
                       "num_predict": {"type": "integer", "minimum": -2, "maximum": 2**31 - 1},
                       "seed": {"type": "integer"}},
    }
    stats = {name: {"type": "integer", "minimum": 0} for name in (
        "total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
        "eval_duration")}
    final = {"model": {"type": "string"}, "created_at": {"type": "string"}, "done": {"type": "boolean"},
             "done_reason": {"type": "string"}, **stats}
    message = {"type": "object", "required": ["role"],
               "properties": {"role": {"enum": ["system", "user", "assistant"]},
                              "content": {"type": ["string", "null"]}}}
    openai_message = {"type": "object", "required": ["role"],
                      "properties": {"role": {"enum": ["system", "developer", "user", "assistant"]},
                                     "content": {"type": ["string", "array", "null"],
                                                 "description": "A string or text parts."}}}
    sampling = {
        "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
        "max_tokens": {"type": ["integer", "null"], "minimum": 1},
        "seed": {"type": ["integer", "null"]},
        "n": {"const": 1},
        "stream": {"type": ["boolean", "null"], "default": False},
        "stream_options": {"type": ["object", "null"], "properties": {"include_usage": {"type": "boolean"}}},
        "user": {"type": ["string", "null"], "description": "Metadata `user` unless X-Nexus-Meta-User is given."},
    }
    usage = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
             "properties": {k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
    return {
        "OllamaGenerateRequest": {
            "type": "object", "required": ["model"],
            "description": "Unknown fields are ignored, as by Ollama. Refused (400) when set: suffix, template, "
                           "context, images, format, raw, think, logprobs.",
            "properties": {"model": {"type": "string", "minLength": 1}, "prompt": {"type": "string"},
                           "system": {"type": "string"}, "stream": {"type": "boolean", "default": True},
                           "options": options, "keep_alive": {"description": "Ignored."}},
        },
        "OllamaChatRequest": {
            "type": "object", "required": ["model"],
            "description": "Refused (400) when set: tools, format, think, logprobs, message images and tool calls.",
            "properties": {"model": {"type": "string", "minLength": 1},
                           "messages": {"type": "array", "items": message},
                           "stream": {"type": "boolean", "default": True}, "options": options},
        },
        "OllamaGenerateResponse": {"type": "object", "required": ["model", "created_at", "response", "done"],
                                   "properties": {**final, "response": {"type": "string"}}},
        "OllamaChatResponse": {"type": "object", "required": ["model", "created_at", "message", "done"],
                               "properties": {**final, "message": message}},
        "OllamaTags": {
            "type": "object", "required": ["models"],
            "properties": {"models": {"type": "array", "items": {
                "type": "object", "required": ["name", "model"],
                "properties": {"name": {"type": "string"}, "model": {"type": "string"},
                               "modified_at": {"type": "string"}, "size": {"type": "integer"},
                               "digest": {"type": "string"}, "details": {"type": "object"}}}}},
        },
        "OllamaVersion": {"type": "object", "required": ["version"], "properties": {"version": {"type": "string"}}},
        "ChatCompletionRequest": {
            "type": "object", "required": ["model", "messages"],
            "description": "Refused (400): tools, functions, audio, non-text content parts or response_format, "
                           "logprobs, n > 1. Accepted but ignored (named in X-Nexus-Ignored): top_p, penalties, "
                           "stop, logit_bias, store, metadata...",
            "properties": {"model": {"type": "string"}, "messages": {"type": "array", "minItems": 1,
                                                                     "items": openai_message},
                           "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1}, **sampling},
        },
        "CompletionRequest": {
            "type": "object", "required": ["model", "prompt"],
            "description": "Refused (400): echo, suffix, logprobs, best_of > 1, several prompts.",
            "properties": {"model": {"type": "string"},
                           "prompt": {"oneOf": [{"type": "string"},
                                                {"type": "array", "items": {"type": "string"}, "minItems": 1,
                                                 "maxItems": 1}]},
                           **sampling},
        },
        "ChatCompletion": {
            "type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
            "properties": {
                "id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": {"type": "integer"},
                "model": {"type": "string"}, "usage": usage,
                "choices": {"type": "array", "items": {
                    "type": "object", "required": ["index", "message", "finish_reason"],
                    "properties": {"index": {"type": "integer"}, "finish_reason": {"enum": ["stop", "length"]},
                                   "message": {"type": "object", "required": ["role", "content"],
                                               "properties": {"role": {"const": "assistant"},
                                                              "content": {"type": "string"}}}}}},
            },
        },
        "Completion": {
            "type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
            "properties": {
                "id": {"type": "string"}, "object": {"const": "text_completion"}, "created": {"type": "integer"},
                "model": {"type": "string"}, "usage": usage,
                "choices": {"type": "array", "items": {
                    "type": "object", "required": ["index", "text", "finish_reason"],
                    "properties": {"index": {"type": "integer"}, "text": {"type": "string"},
                                   "finish_reason": {"enum": ["stop", "length"]}}}},
            },
        },
        "OpenAIModelList": {
            "type": "object", "required": ["object", "data"],
            "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
                "type": "object", "required": ["id", "object", "created", "owned_by"],
                "properties": {"id": {"type": "string"}, "object": {"const": "model"},
                               "created": {"type": "integer"}, "owned_by": {"type": "string"}}}}},
        },
        "OpenAIError": {
            "type": "object", "required": ["error"],
            "properties": {"error": {
                "type": "object", "required": ["message", "type", "param", "code"],
                "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                               "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
        },
    }
