"""The worker's HTTP session to its endpoints, and a second one on the same connections that
tells when a call went on the wire.

Only a rate-limited endpoint needs that moment (``max_rps`` counts a start from when the
endpoint can see it: :meth:`~streams.answering.routing.ModelRouter.sent`). aiohttp's tracing
costs every request made through a session that has it (a trace object and six signals per
call, ~2 % of the worker's CPU), so the calls to other endpoints go through a session without.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import aiohttp

from streams.backends.base import OnSent

__all__ = ["Sessions", "new_session"]


def new_session() -> aiohttp.ClientSession:
    """The worker's one HTTP session to every endpoint; the router bounds the calls, not the pool."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


class Sessions:
    """``http`` for calls, and for a call with ``on_sent`` a session on ``http``'s connections
    that calls it (its ``trace_request_ctx``) once the request's headers are sent."""

    def __init__(self, http: aiohttp.ClientSession) -> None:
        self.http = http
        self._reporting: aiohttp.ClientSession | None = None

    def for_call(self, on_sent: OnSent | None) -> aiohttp.ClientSession:
        if on_sent is None:
            return self.http
        if self._reporting is None:  # made in the loop, at the first call that needs it
            trace = aiohttp.TraceConfig()
            trace.on_request_headers_sent.append(_headers_sent)
            # Not its connector's owner: closing ``http`` closes both.
            self._reporting = aiohttp.ClientSession(
                connector=self.http.connector, connector_owner=False, trace_configs=[trace])
        return self._reporting


async def _headers_sent(session: Any, context: SimpleNamespace, params: Any) -> None:
    on_sent = context.trace_request_ctx
    if callable(on_sent):
        on_sent()
