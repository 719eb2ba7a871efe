"""OpenAI's HTTP API on Nexus: OpenAI clients use ``<gateway>/v1`` as their base URL.

``POST /v1/chat/completions`` and ``POST /v1/completions`` (``stream: true`` as server-sent
events ending with ``data: [DONE]``; ``usage`` in the answer, and in the stream with
``stream_options.include_usage``), ``GET /v1/models`` and ``GET /v1/models/{id}``. Errors
have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

Like the Ollama API (:mod:`producers.gateway.dropin.ollama`), every call is an ordinary request on
``inference.requests`` answered through :mod:`producers.gateway.replies`. Body rules and answer
shapes are plain functions; the aiohttp handlers are at the bottom.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from nexus.access import AccessPolicy, Forbidden
from schemas import InferenceOptions, InferenceRequest, InferenceResponse, new_id

from producers.gateway import access as access_http
from producers.client import SubmitError
from producers.gateway.dropin.conversation import (
    IGNORED_HEADER,
    REQUEST_ID_HEADER,
    CallContext,
    DropInError,
    call_context,
    flag,
    integer,
    number,
    render_conversation,
    require_model,
    unsupported,
)
from producers.gateway.replies import ReplyError, ReplyTimeoutError

if TYPE_CHECKING:
    from producers.gateway.dropin.call import DropIn

SSE = "text/event-stream"
MODEL_MISSING = "you must provide a model parameter"
MODEL_NOT_FOUND = "The model `{model}` does not exist or you do not have access to it."  # OpenAI's words
# Accepted, but not carried to the model by Nexus's pipeline: named in X-Nexus-Ignored.
_IGNORED = (
    "top_p", "frequency_penalty", "presence_penalty", "stop", "logit_bias", "store", "metadata",
    "service_tier", "parallel_tool_calls", "reasoning_effort", "prediction", "top_logprobs",
)
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
                500: "server_error", 503: "service_unavailable", 504: "timeout_error"}


@dataclass(frozen=True)
class OpenAICall:
    model: str  # as the client spelled it
    chat: bool
    stream: bool
    include_usage: bool
    request: InferenceRequest
    ignored: tuple[str, ...] = ()


def parse_chat_completion(body: Any, known: Collection[str], call: CallContext) -> OpenAICall:
    """``POST /v1/chat/completions``: messages -> one input (:func:`render_conversation`)."""
    body = _object(body)
    model, model_id = require_model(body, known, "model", MODEL_MISSING, MODEL_NOT_FOUND)
    for key in ("tools", "functions", "audio"):
        if body.get(key):
            raise unsupported(key, "Nexus answers with text only")
    for key in ("tool_choice", "function_call"):
        if body.get(key) not in (None, "none"):
            raise unsupported(key, "Nexus answers with text only")
    if body.get("logprobs"):
        raise unsupported("logprobs")
    if body.get("modalities") not in (None, ["text"]):
        raise unsupported("modalities", "Nexus answers with text only")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise unsupported("response_format", "only {\"type\": \"text\"}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DropInError(400, "'messages' must be a non-empty array", param="messages")
    turns = [_turn(i, m) for i, m in enumerate(messages)]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return _call(body, model, model_id, True, render_conversation(turns), max_tokens, name, call)


def parse_completion(body: Any, known: Collection[str], call: CallContext) -> OpenAICall:
    """``POST /v1/completions``: one prompt string (or a list holding one) is the input."""
    body = _object(body)
    model, model_id = require_model(body, known, "model", MODEL_MISSING, MODEL_NOT_FOUND)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise DropInError(400, "'prompt' must be a string (or an array of exactly one string)", param="prompt")
    if body.get("echo"):
        raise unsupported("echo")
    if body.get("suffix"):
        raise unsupported("suffix")
    if body.get("logprobs") is not None:
        raise unsupported("logprobs")
    if body.get("best_of") not in (None, 1):
        raise unsupported("best_of")
    return _call(body, model, model_id, False, prompt, body.get("max_tokens"), "max_tokens", call)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise DropInError(400, "the request body must be a JSON object")
    return body


def _turn(i: int, message: Any) -> tuple[str, str]:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise DropInError(400, f"{where} must be an object", param=where)
    role = _ROLES.get(message.get("role"))  # type: ignore[arg-type]
    if role is None:
        raise DropInError(
            400, f"{where}.role must be system, developer, user or assistant (tools are not supported)",
            param=f"{where}.role",
        )
    if message.get("tool_calls") or message.get("function_call"):
        raise unsupported(f"{where}.tool_calls")
    content = message.get("content")
    if content is None:
        return role, ""
    if isinstance(content, str):
        return role, content
    if isinstance(content, list):  # content parts: text only; several are joined by line breaks
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise unsupported(f"{where}.content", "only text parts")
            texts.append(part["text"])
        return role, "\n".join(texts)
    raise DropInError(400, f"{where}.content must be a string or an array of text parts", param=f"{where}.content")


def _call(
    body: dict[str, Any], model: str, model_id: str, chat: bool, text: str,
    max_tokens: Any, max_tokens_name: str, call: CallContext,
) -> OpenAICall:
    if body.get("n") not in (None, 1):
        raise unsupported("n", "one choice per request")
    stream = flag(body.get("stream"), "stream", False)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise DropInError(400, "'stream_options' must be an object", param="stream_options")
    include_usage = flag(stream_options.get("include_usage"), "stream_options.include_usage", False)
    options = InferenceOptions(
        temperature=number(body.get("temperature"), "temperature", 0, 2),
        max_tokens=integer(max_tokens, max_tokens_name, 1, 2**31 - 1),
        seed=integer(body.get("seed"), "seed"),
    )
    context = call.context
    user = body.get("user")
    if user is not None:
        if not isinstance(user, str):
            raise DropInError(400, "'user' must be a string", param="user")
        if "user" not in context.metadata:  # an X-Nexus-Meta-User header wins
            context = type(context)(context.session_id, {**context.metadata, "user": user})
    request = InferenceRequest(
        id=new_id(), model_id=model_id, input=text, context=context, options=options,
        stream=stream, cache=call.cache,  # type: ignore[arg-type]
    )
    ignored = tuple(k for k in _IGNORED if body.get(k) is not None)
    return OpenAICall(model, chat, stream, include_usage, request, ignored)


# --------------------------------------------------------------------------- answers


def error_object(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "invalid_request_error"
                                                                        if status < 500 else "server_error"),
                      "param": param, "code": code}}


def finish_reason(response: InferenceResponse) -> str:
    return "length" if response.done_reason == "length" else "stop"


def usage(response: InferenceResponse) -> dict[str, int]:
    return {
        "prompt_tokens": response.prompt_tokens,
        "completion_tokens": response.completion_tokens,
        "total_tokens": response.prompt_tokens + response.completion_tokens,
    }


def completion_id(call: OpenAICall) -> str:
    return ("chatcmpl-" if call.chat else "cmpl-") + call.request.id


def _head(call: OpenAICall, chunk: bool) -> dict[str, Any]:
    kind = ("chat.completion" + (".chunk" if chunk else "")) if call.chat else "text_completion"
    return {
        "id": completion_id(call),
        "object": kind,
        "created": int(call.request.created_at.timestamp()),
        "model": call.model,
        "system_fingerprint": None,
    }


def completion_object(call: OpenAICall, response: InferenceResponse) -> dict[str, Any]:
    """The whole answer of a non-streamed call."""
    if call.chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": response.output, "refusal": None},
            "logprobs": None,
            "finish_reason": finish_reason(response),
        }
    else:
        choice = {"index": 0, "text": response.output, "logprobs": None, "finish_reason": finish_reason(response)}
    return {**_head(call, False), "choices": [choice], "usage": usage(response)}


def chunk_object(call: OpenAICall, text: str | None, finish: str | None = None, first: bool = False) -> dict[str, Any]:
    """One streamed chunk; the first chat chunk carries the role, the last the finish reason."""
    if call.chat:
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    out = {**_head(call, True), "choices": [choice]}
    if call.include_usage:
        out["usage"] = None
    return out


def usage_chunk(call: OpenAICall, response: InferenceResponse) -> dict[str, Any]:
    """With ``stream_options.include_usage``: the last chunk, no choices, the usage."""
    return {**_head(call, True), "choices": [], "usage": usage(response)}


def models_object(model_ids: Collection[str], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(m, created) for m in model_ids]}


def model_object(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "nexus"}


# --------------------------------------------------------------------------- HTTP


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    headers = dict(headers or {})
    if status == 504:
        # The request is still queued and will be answered; an automatic retry would add a
        # second one to a pipeline that is already behind.
        headers["x-should-retry"] = "false"
    return web.json_response(error_object(status, message, param, code), status=status, headers=headers)


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def add_openai_routes(app: web.Application, dropin: "DropIn") -> None:
    """Register ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models`` and ``/v1/models/{id}``."""
    known = dropin.settings.model_ids
    created = int(time.time())

    async def answer(request: web.Request, chat: bool) -> web.StreamResponse:
        route = "chat.completions" if chat else "completions"
        try:
            try:
                body = json.loads(await request.read())
            except (ValueError, UnicodeDecodeError) as exc:
                raise DropInError(400, f"the body is not valid JSON: {exc}") from None
            context = call_context(request.headers.items(), dropin.settings.gateway.reply_timeout_s)
            call = (parse_chat_completion if chat else parse_completion)(body, known, context)
        except DropInError as exc:
            dropin.metrics.count("openai", route, "", exc.status)
            return error_response(exc.status, exc.message, param=exc.param, code=exc.code)
        try:
            access_http.authorize(request, call.request.model_id)
        except Forbidden:
            dropin.metrics.count("openai", route, call.request.model_id, 403)
            raise  # the access middleware answers 403 in OpenAI's shape
        call = dataclasses.replace(
            call, request=dataclasses.replace(call.request, key_name=AccessPolicy.owner(access_http.key_of(request)))
        )
        headers = {REQUEST_ID_HEADER: call.request.id, "x-request-id": call.request.id}
        if call.ignored:
            headers[IGNORED_HEADER] = ",".join(call.ignored)
        response = await _exchange(request, dropin, call, context, headers)
        dropin.metrics.count("openai", route, call.request.model_id, response.status)
        return response

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        return await answer(request, chat=True)

    async def completions(request: web.Request) -> web.StreamResponse:
        return await answer(request, chat=False)

    def allowed(request: web.Request) -> list[str]:
        return access_http.policy_of(request).models_for(access_http.key_of(request), known)

    async def models(request: web.Request) -> web.Response:
        return web.json_response(models_object(allowed(request), created))

    async def model(request: web.Request) -> web.Response:
        model_id = request.match_info["model"]
        if model_id not in allowed(request):  # OpenAI answers 404 for a model the key may not use
            return error_response(404, MODEL_NOT_FOUND.format(model=model_id), param="model", code="model_not_found")
        return web.json_response(model_object(model_id, created))

    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", model)


async def _exchange(
    http: web.Request, dropin: "DropIn", call: OpenAICall, context: CallContext, headers: dict[str, str]
) -> web.StreamResponse:
    """Submit, wait, answer: one completion object, or SSE chunks then ``data: [DONE]``."""
    exchange = dropin.exchange
    try:
        waiter = await exchange.submit(call.request)
    except (SubmitError, ReplyError) as exc:
        return error_response(503, str(exc), headers=headers)
    clock = dropin.clock
    t0 = clock()
    deadline = t0 + context.timeout_s
    try:
        if not call.stream:
            response = await exchange.response(waiter, deadline, context.timeout_s)
            dropin.metrics.answered("openai", clock() - t0)
            if response.status != "ok":
                return error_response(500, response.error or "the request failed", headers=headers)
            return web.json_response(completion_object(call, response), headers=headers)

        # The status line waits for the first event, so an early failure still gets its status.
        event = await exchange.next_event(waiter, deadline, context.timeout_s)
        if isinstance(event, InferenceResponse) and event.status != "ok":
            dropin.metrics.answered("openai", clock() - t0)
            return error_response(500, event.error or "the request failed", headers=headers)
        stream = web.StreamResponse(headers={"Content-Type": SSE, "Cache-Control": "no-cache", **headers})
        await stream.prepare(http)
        try:
            try:
                if call.chat:
                    await stream.write(_sse(chunk_object(call, "", first=True)))
                while True:
                    if isinstance(event, str):
                        await stream.write(_sse(chunk_object(call, event)))
                    else:
                        dropin.metrics.answered("openai", clock() - t0)
                        if event.status != "ok":
                            await stream.write(_sse(error_object(500, event.error or "the request failed")))
                            break
                        await stream.write(_sse(chunk_object(call, None, finish_reason(event))))
                        if call.include_usage:
                            await stream.write(_sse(usage_chunk(call, event)))
                        await stream.write(b"data: [DONE]\n\n")
                        break
                    event = await exchange.next_event(waiter, deadline, context.timeout_s)
            except ReplyError as exc:
                timeout = isinstance(exc, ReplyTimeoutError)
                if timeout:
                    dropin.metrics.timeouts.labels(api="openai").inc()
                await stream.write(_sse(error_object(504 if timeout else 503, str(exc),
                                                     code="timeout" if timeout else None)))
            await stream.write_eof()
        except ConnectionResetError:
            pass  # the client went away; its answer still lands in the audit log
        return stream
    except ReplyTimeoutError as exc:
        dropin.metrics.timeouts.labels(api="openai").inc()
        return error_response(504, str(exc), code="timeout", headers=headers)
    except ReplyError as exc:
        return error_response(503, str(exc), headers=headers)
    finally:
        exchange.release(waiter)
