"""The drop-in APIs' part of ``GET /openapi.json``: Ollama's ``/api/*`` and OpenAI's ``/v1/*``.

Kept next to the code it describes (:mod:`producers.gateway.dropin.ollama`, :mod:`producers.gateway.dropin.openai`);
:mod:`producers.gateway.openapi` merges it into the gateway's document. It describes what Nexus
accepts and answers, not all of Ollama's or OpenAI's APIs: fields Nexus refuses are named.
"""

from __future__ import annotations

from typing import Any

from schemas.limits import MAX_IMAGE_BYTES, MAX_RECORD_BYTES, MAX_SESSION_ID_LENGTH, MAX_TIMEOUT_MS

from producers.gateway.dropin.conversation import (
    CACHE_HEADER,
    IGNORED_HEADER,
    QUEUE_MS_HEADER,
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
                QUEUE_MS_HEADER: {"description": "Unstreamed answers: how long the request waited in the worker's "
                                  "schedule before its model call, in ms.", "schema": {"type": "integer"}},
            },
            "content": {JSON: {"schema": _ref(ok)}, stream_type: {"schema": {"type": "string"}}},
        },
        "400": _json(error, "The body is not JSON, or a field is invalid or not supported by Nexus; or the "
                            "backend refused the request (tools for a model without tool support, a bad schema...): "
                            "the error is then the backend's own message."),
        "404": _json(error, "The model is not one Nexus routes."),
        "413": _json(error, "The body is larger than the gateway's limit, the request's images total more than "
                            f"{MAX_IMAGE_BYTES} bytes decoded, or the encoded request is over {MAX_RECORD_BYTES} "
                            "bytes: a request must fit one Kafka record."),
        "429": {**_json(error, "Over one of the tenant's limits (requests or tokens per minute, requests waiting "
                                "or running); OpenAI's shape has `type: rate_limit_error`, `code: "
                                "rate_limit_exceeded`. Nothing was submitted."),
                "headers": {"Retry-After": {"description": "Whole seconds to wait before trying again.",
                                            "schema": {"type": "integer", "minimum": 1}}}},
        "500": _json(error, "The pipeline answered with an error (the endpoint failed, the deadline passed...)."),
        "503": _json(error, "Kafka did not acknowledge the request, or this gateway cannot read answers."),
        "504": _json(error, "No answer within the timeout; the request is still answered, into the audit log."),
        "default": _json(error, "Any other error."),
    }


def _headers() -> list[dict[str, str]]:
    names = ("NexusSession", "NexusTimeout", "NexusCache", "NexusPriority", "NexusTenant", "TraceParent", "TraceState")
    return [{"$ref": _PARAMS + name} for name in names]


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
            "description": "Streams unless `\"stream\": false`. A plain prompt goes to the backend's generate "
                           "API; with `system` or `images` the call is the conversation `[system, user(prompt, "
                           "images)]`, sent to the backend's chat API (the model's template applies, `system` in "
                           "place of the model's own). `format`, `options` and `keep_alive` pass through. An empty "
                           "prompt without images is Ollama's load call, answered at once with `done_reason: load`.",
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref("OllamaGenerateRequest")}}},
            "responses": _answers("OllamaGenerateResponse", "application/x-ndjson", ndjson, "Error"),
        }},
        "/api/chat": {"post": {
            "operationId": "ollamaChat", "tags": tags, "parameters": _headers(),
            "summary": "Ollama's chat, answered through Kafka",
            "description": "The conversation passes through to the backend's chat API, so the model's chat "
                           "template sees the roles: messages (images, tool calls, tool results), `tools`, "
                           "`format`, `options` and `keep_alive`. The answer's `message` carries the model's "
                           "`tool_calls` (arguments as objects), streamed whole as they come.",
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
            "description": "The messages (text and `data:` URL images, tool calls, tool results), `tools`, "
                           "`tool_choice`, `response_format` and the sampling fields pass through to the backend's "
                           "chat API. Tool calls come back in `message.tool_calls` (`finish_reason: tool_calls`), "
                           "streamed in `delta.tool_calls` by index. Automatic retries of a 504 are refused with "
                           "`x-should-retry: false`: the request is still being answered.",
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
    any_number = {"type": "number"}
    options = {
        "type": "object",
        "description": "All of Ollama's options reach the backend: these in the request's own fields "
                       "(`num_predict` <= 0: no limit), any other (`mirostat`, `repeat_last_n`, ...) as given.",
        "properties": {"temperature": {"type": "number", "minimum": 0},
                       "num_predict": {"type": "integer", "minimum": -2, "maximum": 2**31 - 1},
                       "seed": {"type": "integer"}, "top_p": {"type": "number", "minimum": 0, "maximum": 1},
                       "top_k": {"type": "integer", "minimum": 0}, "min_p": {"type": "number", "minimum": 0,
                                                                           "maximum": 1},
                       "stop": {"type": ["string", "array"], "items": {"type": "string"}},
                       "num_ctx": {"type": "integer", "minimum": 1}, "repeat_penalty": any_number,
                       "presence_penalty": any_number, "frequency_penalty": any_number},
        "additionalProperties": True,
    }
    stats = {name: {"type": "integer", "minimum": 0} for name in (
        "total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
        "eval_duration")}
    final = {"model": {"type": "string"}, "created_at": {"type": "string"}, "done": {"type": "boolean"},
             "done_reason": {"type": "string"}, **stats}
    images = {"type": "array", "items": {"type": "string", "contentEncoding": "base64"},
              "description": f"Base64 image files; {MAX_IMAGE_BYTES} bytes per request in total, decoded."}
    ollama_tool_call = {"type": "object", "required": ["function"], "properties": {
        "id": {"type": "string"},
        "function": {"type": "object", "required": ["name", "arguments"],
                     "properties": {"index": {"type": "integer"}, "name": {"type": "string"},
                                    "arguments": {"type": "object"}}}}}
    message = {"type": "object", "required": ["role"],
               "properties": {"role": {"enum": ["system", "user", "assistant", "tool"]},
                              "content": {"type": ["string", "null"]}, "images": images,
                              "tool_calls": {"type": "array", "items": ollama_tool_call},
                              "tool_name": {"type": "string", "description": "A tool turn: the function's name."}}}
    answer_message = {"type": "object", "required": ["role", "content"],
                      "properties": {"role": {"const": "assistant"}, "content": {"type": "string"},
                                     "tool_calls": {"type": "array", "items": ollama_tool_call}}}
    function_tool = {"type": "object", "required": ["function"], "properties": {
        "type": {"const": "function"},
        "function": {"type": "object", "required": ["name"],
                     "properties": {"name": {"type": "string", "minLength": 1}, "description": {"type": "string"},
                                    "parameters": {"type": "object", "description": "A JSON schema."}}}}}
    ollama_format = {"description": "`\"json\"`, or a JSON schema the answer must match.",
                     "oneOf": [{"const": "json"}, {"const": ""}, {"type": "object"}]}
    keep_alive = {"type": ["string", "number"],
                  "description": "How long the backend keeps the model loaded (`\"5m\"`, `0`; a number is seconds)."}
    openai_tool_call = {"type": "object", "required": ["id", "type", "function"], "properties": {
        "id": {"type": "string"}, "type": {"const": "function"},
        "function": {"type": "object", "required": ["name", "arguments"],
                     "properties": {"name": {"type": "string"},
                                    "arguments": {"type": "string", "description": "A JSON object, as text."}}}}}
    openai_message = {"type": "object", "required": ["role"],
                      "properties": {"role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
                                     "content": {"type": ["string", "array", "null"],
                                                 "description": "A string or parts: `text`, and `image_url` "
                                                                "with a `data:<type>;base64,...` URL (Nexus "
                                                                "fetches no http(s) images)."},
                                     "tool_calls": {"type": "array", "items": openai_tool_call},
                                     "tool_call_id": {"type": "string", "description": "A tool message: the "
                                                                                       "call it answers."}}}
    sampling = {
        "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
        "max_tokens": {"type": ["integer", "null"], "minimum": 1},
        "seed": {"type": ["integer", "null"]},
        "top_p": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "stop": {"type": ["string", "array", "null"], "items": {"type": "string"}},
        "presence_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
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
            "description": "Unknown fields are ignored, as by Ollama. Refused (400) when set: raw, suffix, "
                           "template, context (Nexus uses the model's own template), think, logprobs.",
            "properties": {"model": {"type": "string", "minLength": 1}, "prompt": {"type": "string"},
                           "system": {"type": "string", "description": "In place of the model's system prompt."},
                           "images": images, "format": ollama_format,
                           "stream": {"type": "boolean", "default": True}, "options": options,
                           "keep_alive": keep_alive},
        },
        "OllamaChatRequest": {
            "type": "object", "required": ["model"],
            "description": "Refused (400) when set: think, logprobs. A message's `thinking` is not carried "
                           "(named in X-Nexus-Ignored).",
            "properties": {"model": {"type": "string", "minLength": 1},
                           "messages": {"type": "array", "items": message},
                           "tools": {"type": "array", "items": function_tool}, "format": ollama_format,
                           "stream": {"type": "boolean", "default": True}, "options": options,
                           "keep_alive": keep_alive},
        },
        "OllamaGenerateResponse": {"type": "object", "required": ["model", "created_at", "response", "done"],
                                   "properties": {**final, "response": {"type": "string"}}},
        "OllamaChatResponse": {"type": "object", "required": ["model", "created_at", "message", "done"],
                               "properties": {**final, "message": answer_message}},
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
            "description": "Refused (400): functions and function_call (use tools), audio, http(s) image URLs, "
                           "logprobs, n > 1. Accepted but not carried (named in X-Nexus-Ignored): logit_bias, "
                           "store, metadata, service_tier, parallel_tool_calls, reasoning_effort, prediction.",
            "properties": {"model": {"type": "string"}, "messages": {"type": "array", "minItems": 1,
                                                                     "items": openai_message},
                           "tools": {"type": "array", "items": function_tool},
                           "tool_choice": {"oneOf": [{"enum": ["auto", "none", "required"]}, {
                               "type": "object", "required": ["type", "function"],
                               "properties": {"type": {"const": "function"},
                                              "function": {"type": "object", "required": ["name"],
                                                           "properties": {"name": {"type": "string"}}}}}]},
                           "response_format": {"type": ["object", "null"], "required": ["type"], "properties": {
                               "type": {"enum": ["text", "json_object", "json_schema"]},
                               "json_schema": {"type": "object", "required": ["schema"],
                                               "properties": {"name": {"type": "string"},
                                                              "schema": {"type": "object"}}}}},
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
                    "properties": {"index": {"type": "integer"},
                                   "finish_reason": {"enum": ["stop", "length", "tool_calls"]},
                                   "message": {"type": "object", "required": ["role", "content"],
                                               "properties": {"role": {"const": "assistant"},
                                                              "content": {"type": ["string", "null"],
                                                                          "description": "null beside tool "
                                                                                         "calls without text"},
                                                              "tool_calls": {"type": "array",
                                                                             "items": openai_tool_call}}}}}},
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
