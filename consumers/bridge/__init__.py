"""``nexus bridge``: results and streamed tokens pushed from Kafka to websocket clients.

The protocol and routing core (:class:`BridgeCore`, no I/O) and the errors load with the
package; the websocket/Kafka shell (:mod:`consumers.bridge.server`, which pulls in
websockets, aiokafka and the producer) loads on first use of one of its names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from consumers.bridge.core import Action, BridgeCore, Close, Peer, Produce, Replay
from consumers.bridge.errors import BridgeStartError, HistoryError

if TYPE_CHECKING:
    from consumers.bridge.server import Bridge, serve_bridge

__all__ = [
    # running a bridge (consumers.bridge.server)
    "serve_bridge", "Bridge",
    # the protocol and routing core
    "BridgeCore", "Peer", "Action", "Close", "Produce", "Replay",
    # errors
    "BridgeStartError", "HistoryError",
]

_SERVER_NAMES = frozenset({"serve_bridge", "Bridge"})


def __getattr__(name: str) -> Any:
    if name in _SERVER_NAMES:
        from consumers.bridge import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
