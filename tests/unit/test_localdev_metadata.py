"""The hand-written Kafka Metadata v1 round trip the local broker and cluster wait on."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from localdev import cluster
from localdev.broker import free_port
from localdev.metadata import broker_ids, metadata_request, parse_broker_ids


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">h", len(data)) + data


def _response(brokers: list[tuple[int, str, int, str | None]], correlation_id: int = 1) -> bytes:
    """A Metadata v1 response body: correlation id, brokers, then a controller id and no topics."""
    out = struct.pack(">ii", correlation_id, len(brokers))
    for node_id, host, port, rack in brokers:
        out += struct.pack(">i", node_id) + _string(host) + struct.pack(">i", port)
        out += struct.pack(">h", -1) if rack is None else _string(rack)
    return out + struct.pack(">ii", brokers[0][0] if brokers else -1, 0)


def test_request_is_metadata_v1_for_all_topics() -> None:
    request = metadata_request("nexus-test")
    (size,) = struct.unpack_from(">i", request)
    assert size == len(request) - 4
    api_key, version, correlation_id, name_len = struct.unpack_from(">hhih", request, 4)
    assert (api_key, version, correlation_id) == (3, 1, 1)
    assert request[14:14 + name_len] == b"nexus-test"
    assert struct.unpack_from(">i", request, 14 + name_len) == (-1,)  # null array: every topic
    assert len(request) == 14 + name_len + 4


def test_parse_reads_every_broker_with_or_without_a_rack() -> None:
    payload = _response([(1, "127.0.0.1", 9092, None), (2, "broker-two.local", 9093, "rack-b"), (3, "h", 1, "")])
    assert parse_broker_ids(payload) == {1, 2, 3}


def test_parse_answers_nothing_for_no_brokers_another_request_or_a_cut_answer() -> None:
    assert parse_broker_ids(_response([])) == set()
    assert parse_broker_ids(_response([(1, "127.0.0.1", 9092, None)], correlation_id=7)) == set()
    whole = _response([(1, "127.0.0.1", 9092, None), (2, "127.0.0.1", 9093, None)])
    assert parse_broker_ids(whole[:20]) == set()
    assert parse_broker_ids(b"") == set()


@pytest.fixture
def fake_broker() -> Iterator[tuple[int, list[bytes]]]:
    """One-shot listener: reads one request, answers with two brokers; yields (port, requests seen)."""
    server = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            (size,) = struct.unpack(">i", conn.recv(4, socket.MSG_WAITALL))
            seen.append(conn.recv(size, socket.MSG_WAITALL))
            body = _response([(4, "127.0.0.1", 1, None), (5, "127.0.0.1", 2, None)])
            conn.sendall(struct.pack(">i", len(body)) + body)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], seen
    finally:
        server.close()
        thread.join(timeout=5)


def test_broker_ids_round_trip(fake_broker: tuple[int, list[bytes]]) -> None:
    port, seen = fake_broker
    assert broker_ids("127.0.0.1", port, timeout=5, client_id="nexus-test") == {4, 5}
    assert seen == [metadata_request("nexus-test")[4:]]


def test_broker_ids_is_empty_when_nothing_listens() -> None:
    assert broker_ids("127.0.0.1", free_port(), timeout=1) == set()


def test_cluster_uses_the_shared_request() -> None:
    assert cluster.broker_ids is broker_ids
