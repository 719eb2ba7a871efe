"""Which brokers a Kafka node lists as live: one hand-written Metadata v1 round trip.

Why by hand: the local broker and cluster ask this while starting, from sync code and
from inside a running event loop alike, where an aiokafka client cannot be used. Only
registered, unfenced brokers are listed, so a non-empty answer means "ready".

The wire format (Kafka protocol, Metadata API key 3, version 1)::

    request:  size int32 | api_key int16 = 3 | api_version int16 = 1 | correlation_id int32
              | client_id string (int16 length) | topics array int32 = -1 (null: all topics)
    response: size int32 | correlation_id int32 | brokers array int32 of
              [node_id int32, host string, port int32, rack nullable string] | ...
"""

from __future__ import annotations

import socket
import struct

_API_KEY = 3
_API_VERSION = 1
_CORRELATION_ID = 1
DEFAULT_CLIENT_ID = "nexus-localkafka"


def metadata_request(client_id: str = DEFAULT_CLIENT_ID, correlation_id: int = _CORRELATION_ID) -> bytes:
    """The size-prefixed bytes of a Metadata v1 request for all topics."""
    name = client_id.encode()
    body = struct.pack(">hhih", _API_KEY, _API_VERSION, correlation_id, len(name)) + name + struct.pack(">i", -1)
    return struct.pack(">i", len(body)) + body


def parse_broker_ids(payload: bytes, correlation_id: int = _CORRELATION_ID) -> set[int]:
    """Node ids from a Metadata v1 response body (after its size); empty if it is not our answer
    or is cut short."""
    try:
        answered_id, count = struct.unpack_from(">ii", payload, 0)
        if answered_id != correlation_id:
            return set()
        ids, pos = set(), 8
        for _ in range(count):
            (node_id,) = struct.unpack_from(">i", payload, pos)
            (host_len,) = struct.unpack_from(">h", payload, pos + 4)
            pos += 6 + host_len + 4  # node_id, host length and host, port
            (rack_len,) = struct.unpack_from(">h", payload, pos)
            pos += 2 + max(rack_len, 0)  # -1: a null rack
            ids.add(node_id)
    except struct.error:
        return set()
    return ids


def broker_ids(host: str, port: int, timeout: float, client_id: str = DEFAULT_CLIENT_ID) -> set[int]:
    """Node ids of the live (registered, unfenced) brokers as ``host:port`` sees them; empty if
    it does not answer (yet). Plain blocking sockets, bounded by ``timeout`` per operation."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(metadata_request(client_id))
            (size,) = struct.unpack(">i", recv_exact(sock, 4))
            payload = recv_exact(sock, size)
    except OSError:
        return set()
    return parse_broker_ids(payload)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from ``sock``; ConnectionError (an OSError) if it closes first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        buf.extend(chunk)
    return bytes(buf)
