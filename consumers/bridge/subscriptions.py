"""Who wants which record: the bridge's routing index. No I/O.

A record is routed by dictionary look-ups on its session id and request id,
never by scanning the connected clients, so delivering one result costs the
same with 5 clients or 5,000.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

from consumers.bridge.frames import Target
from nexus.errors import NexusError

C = TypeVar("C", bound=Hashable)

DEFAULT_MAX_PER_CLIENT = 10_000


class TooManySubscriptions(NexusError, ValueError):
    """A client asked for more subscriptions than one connection may hold."""


class SubscriptionIndex(Generic[C]):
    """Maps session ids, request ids and "all" to the clients subscribed to them."""

    def __init__(self, max_per_client: int = DEFAULT_MAX_PER_CLIENT) -> None:
        self._max = max_per_client
        self._by_session: dict[str, set[C]] = {}
        self._by_request: dict[str, set[C]] = {}
        self._all: set[C] = set()
        self._keys: dict[C, set[tuple[str, str]]] = {}

    def add(self, client: C, target: Target) -> None:
        """Subscribe ``client`` to ``target``; adding a subscription twice is a no-op."""
        keys = self._keys.setdefault(client, set())
        new = [k for k in _keys(target) if k not in keys]
        if len(keys) + len(new) > self._max:
            raise TooManySubscriptions(
                f"a connection may hold at most {self._max} subscriptions; "
                f"unsubscribe from finished requests or subscribe by session_id"
            )
        for key in new:
            keys.add(key)
            if key[0] == "a":
                self._all.add(client)
            else:
                self._table(key[0]).setdefault(key[1], set()).add(client)

    def remove(self, client: C, target: Target) -> None:
        keys = self._keys.get(client)
        if keys is None:
            return
        for key in _keys(target):
            if key in keys:
                keys.discard(key)
                self._unlink(client, key)
        if not keys:
            del self._keys[client]

    def drop(self, client: C) -> None:
        """Forget every subscription of ``client`` (it disconnected)."""
        for key in self._keys.pop(client, ()):
            self._unlink(client, key)

    def for_result(self, session_id: str, request_id: str) -> set[C]:
        """Clients that get a result of this session and request, each once."""
        out = set(self._all)
        out.update(self._by_session.get(session_id, ()))
        out.update(self._by_request.get(request_id, ()))
        return out

    def for_token(self, session_id: str, request_id: str) -> set[C]:
        """Clients that get a token: like results, but the "all" feed carries results only."""
        out = set(self._by_session.get(session_id, ()))
        out.update(self._by_request.get(request_id, ()))
        return out

    def subscriptions_of(self, client: C) -> int:
        return len(self._keys.get(client, ()))

    def __len__(self) -> int:
        """How many clients hold at least one subscription."""
        return len(self._keys)

    def _table(self, kind: str) -> dict[str, set[C]]:
        return self._by_session if kind == "s" else self._by_request

    def _unlink(self, client: C, key: tuple[str, str]) -> None:
        if key[0] == "a":
            self._all.discard(client)
            return
        table = self._table(key[0])
        clients = table.get(key[1])
        if clients is not None:
            clients.discard(client)
            if not clients:
                del table[key[1]]


def _keys(target: Target) -> list[tuple[str, str]]:
    if target.all:
        return [("a", "")]
    if target.session_id is not None:
        return [("s", target.session_id)]
    return [("r", request_id) for request_id in target.request_ids]
