"""The gateway's API-key check: an aiohttp middleware around :class:`nexus.access.AccessPolicy`.

With keys configured every route needs ``Authorization: Bearer <token>`` except the few
that must stay reachable without one (health probes, the page and its files, the OpenAPI
document, Ollama's version call). The caller's key is kept on the request for the handlers,
which check the model (403) and stamp the key's name on what they submit. Without keys this
middleware lets everything through and handlers see no key, exactly as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from nexus.access import AccessError, AccessPolicy, Forbidden, Unauthenticated
from nexus.settings import ApiKey

API_KEY = web.RequestKey("api_key", ApiKey)
POLICY = web.AppKey("access_policy", AccessPolicy)

# Reachable without a token: probes, the page (it asks for the token itself) and documentation.
OPEN_PATHS = frozenset({"/health", "/", "/config.json", "/openapi.json", "/api/version", "/favicon.ico"})
OPEN_PREFIXES = ("/static/",)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def key_of(request: web.Request) -> ApiKey | None:
    """The caller's key; None when access is open."""
    return request.get(API_KEY)


def policy_of(request: web.Request) -> AccessPolicy:
    return request.app[POLICY]


def authorize(request: web.Request, model_id: str) -> None:
    """Raise :class:`nexus.access.Forbidden` when the caller's key may not use ``model_id``."""
    policy_of(request).authorize(key_of(request), model_id)


def error_body(path: str, exc: AccessError) -> dict[str, object]:
    """Nexus's and Ollama's ``{"error": "..."}``, or OpenAI's error object under ``/v1/``."""
    if not path.startswith("/v1/"):
        return {"error": exc.reason}
    if isinstance(exc, Unauthenticated):
        kind, code = "invalid_request_error", ("invalid_api_key" if exc.invalid_token else "missing_api_key")
    else:
        kind, code = "permission_error", "model_not_allowed"
    return {"error": {"message": exc.reason, "type": kind, "param": None, "code": code}}


def access_response(path: str, exc: AccessError) -> web.Response:
    """401 with a ``WWW-Authenticate: Bearer`` challenge, or 403."""
    headers = {"WWW-Authenticate": exc.challenge} if isinstance(exc, Unauthenticated) else None
    return web.json_response(error_body(path, exc), status=exc.status, headers=headers)


def access_middleware(policy: AccessPolicy) -> Middleware:
    """Authenticate every call to a protected path; a :class:`Forbidden` raised by a handler becomes 403."""

    @web.middleware
    async def check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if policy.enabled and not is_open(request.path):
            try:
                key = policy.authenticate_header(request.headers.get("Authorization"))
            except Unauthenticated as exc:
                return access_response(request.path, exc)
            assert key is not None
            request[API_KEY] = key
        try:
            return await handler(request)
        except Forbidden as exc:
            return access_response(request.path, exc)

    return check_key


def install(app: web.Application, policy: AccessPolicy) -> None:
    app[POLICY] = policy
    app.middlewares.append(access_middleware(policy))
