"""The producers package's public names: what they are, and what importing them loads."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import producers
import producers.client
import producers.gateway
from nexus.errors import NexusError

if TYPE_CHECKING:  # imported lazily below: the tests check what importing loads
    from schemas import InferenceRequest

REPO = Path(__file__).resolve().parents[2]


def loaded_after(statement: str) -> list[str]:
    """The modules a fresh interpreter has loaded after running ``statement``."""
    script = textwrap.dedent(f"""
        import json, sys
        {statement}
        print(json.dumps(sorted(sys.modules)))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_every_public_name_is_the_producer_apis_own() -> None:
    assert producers.__all__ == [
        "RequestProducer", "SyncRequestProducer",
        "ProducerError", "SubmitError", "RequestTooLarge", "ResponseTimeoutError", "ResponsesUnavailableError",
        "ProducerClosedError",
    ]
    for name in producers.__all__:
        assert getattr(producers, name) is getattr(producers.client, name)
    assert set(producers.__all__) <= set(dir(producers))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        producers.Nope  # noqa: B018


def test_the_errors_keep_their_bases_and_share_the_nexus_root() -> None:
    assert issubclass(producers.ProducerError, NexusError) and issubclass(producers.ProducerError, RuntimeError)
    for error in (producers.SubmitError, producers.ResponseTimeoutError, producers.ResponsesUnavailableError,
                  producers.ProducerClosedError):
        assert issubclass(error, producers.ProducerError)
    assert issubclass(producers.ResponseTimeoutError, TimeoutError)
    assert issubclass(producers.RequestTooLarge, producers.SubmitError)  # callers catching SubmitError still do


def test_the_gateway_names_are_the_apps() -> None:
    from producers.gateway import app

    for name in producers.gateway.__all__:
        assert getattr(producers.gateway, name) is getattr(app, name)


def test_importing_the_package_loads_nothing_heavy() -> None:
    """``nexus`` parses its command line with this package loaded: no Kafka client, no web server."""
    modules = loaded_after("import producers, producers.submit")
    assert not [m for m in modules if m.split(".")[0] in ("aiokafka", "aiohttp", "websockets", "faust", "streams")]


def test_the_producer_api_does_not_load_the_gateway() -> None:
    modules = loaded_after("from producers import RequestProducer, SyncRequestProducer, SubmitError")
    assert "aiokafka" in modules and "producers.client" in modules
    assert "producers.replies" in modules  # the reply reader, shared with the gateway's drop-in APIs
    gateway = [m for m in modules if m == "producers.gateway" or m.startswith("producers.gateway.")]
    assert not gateway, gateway
    assert not [m for m in modules if m.split(".")[0] in ("aiohttp", "websockets", "httpx", "consumers", "streams")]


class _Recorder:
    """Stands in for aiokafka's producer: records what would have been produced."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send_and_wait(self, topic: str, value: bytes, key: bytes, headers: object = None) -> None:
        self.sent.append(value)


def _request(**fields: object) -> InferenceRequest:
    from schemas import InferenceRequest, ModelContext

    return InferenceRequest("r-big", "llama3.1", "hi", ModelContext("s"), **fields)  # type: ignore[arg-type]


async def test_a_request_over_the_record_limit_is_refused_before_it_is_produced() -> None:
    from nexus.settings import KafkaSettings
    from schemas import Message, encode_request
    from schemas.limits import MAX_RECORD_BYTES

    producer = producers.RequestProducer(KafkaSettings())
    await producer._producer.stop()  # never started: nothing to close but the object itself
    recorder = producer._producer = _Recorder()  # type: ignore[assignment]
    big = _request(messages=(Message("user", "look", images=(b"\x89PNG" * (MAX_RECORD_BYTES // 4),)),))
    size = len(encode_request(producer._codec, big))
    with pytest.raises(producers.RequestTooLarge) as info:
        await producer.submit(big)
    assert recorder.sent == []
    assert (info.value.request_id, info.value.size, info.value.limit) == ("r-big", size, MAX_RECORD_BYTES)
    assert str(info.value).startswith(f"request r-big is {size} bytes encoded; the limit is {MAX_RECORD_BYTES} ")
    assert "one Kafka record" in str(info.value)

    # Just under the limit is produced, with everything the conversation carries.
    small = _request(messages=(Message("user", "look", images=(b"x" * 1000,)),), format="json", keep_alive="5m")
    assert await producer.submit(small) == "r-big"
    from schemas import Codec, decode_request

    assert decode_request(Codec.from_directory(), recorder.sent[0]) == small
