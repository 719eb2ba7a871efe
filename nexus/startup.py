"""Why a role could not start, said in one line: its port is taken, or Kafka does not answer.

The gateway and the worker raise :class:`StartError`; ``nexus`` prints it as ``nexus <role>: ...``
and exits 1, as ``nexus bridge`` does with its ``BridgeStartError``.
"""

from __future__ import annotations

import errno
import socket

from nexus.errors import NexusError


class StartError(NexusError):
    """A role cannot start: the port it listens on is taken, or no Kafka broker answered."""


def ensure_can_listen(host: str, port: int, setting: str) -> None:
    """Raise :class:`StartError` now if ``host:port`` cannot be listened on, before minutes of waiting
    for Kafka end in a traceback. ``setting`` names what chooses the port (``gateway.port``).

    Binds the way asyncio servers do (``SO_REUSEADDR``), so a port in TIME_WAIT still counts as free.
    """
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise StartError(f"cannot listen on {host}:{port} ({setting}): {exc}") from None
    for family, kind, proto, _, address in dict.fromkeys(addresses):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as asyncio binds: each family on its own
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:  # a family the machine lacks: asyncio skips it too
                    continue
                raise StartError(f"cannot listen on {host}:{port} ({setting}): {exc.strerror or exc}") from None
