"""Which API keys a session's records were made with, as far as this bridge has seen. No I/O.

Lets the bridge refuse, with a clear error, a subscription to a session that belongs to
another key. It is only a courtesy: every record is filtered by its ``key_name`` anyway
(:meth:`nexus.access.AccessPolicy.may_see`), so a session this bridge has not seen (older
than its start, or evicted here) is subscribable but still shows only the client's own records.
"""

from __future__ import annotations

from collections import OrderedDict

DEFAULT_MAX_SESSIONS = 100_000


class SessionOwners:
    """Session id -> the key names seen on it; the least recently seen sessions are forgotten."""

    def __init__(self, max_sessions: int = DEFAULT_MAX_SESSIONS) -> None:
        self._max = max_sessions
        self._owners: OrderedDict[str, frozenset[str | None]] = OrderedDict()

    def saw(self, session_id: str, owner: str | None) -> None:
        known = self._owners.pop(session_id, frozenset())
        self._owners[session_id] = known if owner in known else known | {owner}
        if len(self._owners) > self._max:
            self._owners.popitem(last=False)

    def of(self, session_id: str) -> frozenset[str | None]:
        """The key names seen on ``session_id``; empty when unknown."""
        return self._owners.get(session_id, frozenset())

    def __len__(self) -> int:
        return len(self._owners)
