"""The producer API and ``nexus submit`` with fair scheduling: lanes by priority, cancels, the flags."""

from __future__ import annotations

import argparse
import io
import json

import pytest

from nexus.settings import EndpointSettings, KafkaSettings, ModelSettings, Settings
from producers import submit as submit_command
from producers.client import RequestProducer, SubmitError, SyncRequestProducer
from schemas import Codec, InferenceRequest, InvalidValueError, ModelContext, decode_cancel, decode_request
from datetime import UTC

CODEC = Codec.from_directory()
MODELS = ("llama3.1", "mistral")


class _Recorder:
    """Stands in for aiokafka's producer: records (topic, key, value) of what would have been produced."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.fail = fail

    async def send_and_wait(self, topic: str, value: bytes, key: bytes, headers: object = None) -> None:
        if self.fail is not None:
            raise self.fail
        self.sent.append((topic, key, value))

    async def stop(self) -> None:
        pass


async def _producer(kafka: KafkaSettings | None = None, fail: Exception | None = None) -> tuple[RequestProducer, _Recorder]:
    producer = RequestProducer(kafka or KafkaSettings(produce_timeout_s=1.0))
    await producer._producer.stop()  # never started: nothing to close but the object itself
    recorder = producer._producer = _Recorder(fail)  # type: ignore[assignment]
    return producer, recorder


def _request(i: str, **fields: object) -> InferenceRequest:
    return InferenceRequest(i, "llama3.1", "hi", ModelContext("s"), **fields)  # type: ignore[arg-type]


async def test_submit_writes_each_request_to_its_priority_lane() -> None:
    producer, recorder = await _producer(KafkaSettings(requests_topic="lane.i", batch_requests_topic="lane.b"))
    ids = await producer.submit_many([_request("i1"), _request("b1", priority="batch", tenant="team-a"),
                                      _request("i2", priority="interactive")])
    assert ids == ["i1", "b1", "i2"]
    assert [(topic, key) for topic, key, _ in recorder.sent] == [
        ("lane.i", b"llama3.1"), ("lane.b", b"llama3.1"), ("lane.i", b"llama3.1")]
    batch = decode_request(CODEC, recorder.sent[1][2])
    assert (batch.priority, batch.tenant) == ("batch", "team-a")


async def test_an_unknown_priority_is_refused_before_it_is_produced() -> None:
    producer, recorder = await _producer()
    with pytest.raises(InvalidValueError, match="request x: priority 'urgent' is not one of interactive, batch"):
        await producer.submit(_request("x", priority="urgent"))
    assert recorder.sent == []


async def test_cancel_writes_an_inference_cancel_keyed_by_the_request_id() -> None:
    producer, recorder = await _producer(KafkaSettings(cancels_topic="c"))
    cancel = await producer.cancel("r1", reason="client disconnected", key_name="team-a")
    [(topic, key, value)] = recorder.sent
    assert (topic, key) == ("c", b"r1")
    assert decode_cancel(CODEC, value) == cancel
    assert (cancel.id, cancel.reason, cancel.key_name) == ("r1", "client disconnected", "team-a")
    plain = await producer.cancel("r2")
    assert (plain.reason, plain.key_name) == ("", None)


async def test_an_unacknowledged_cancel_is_a_submit_error_naming_it() -> None:
    from aiokafka.errors import KafkaTimeoutError

    producer, _ = await _producer(fail=KafkaTimeoutError())
    with pytest.raises(SubmitError, match="did not acknowledge the cancel of request r1"):
        await producer.cancel("r1")
    with pytest.raises(SubmitError, match="did not acknowledge request r2"):
        await producer.submit(_request("r2"))


def test_the_sync_producer_cancels_too() -> None:
    sync = SyncRequestProducer(KafkaSettings(cancels_topic="c"))
    try:
        async def make() -> RequestProducer:
            return (await _producer(KafkaSettings(cancels_topic="c")))[0]

        sync._producer = sync._call(make())
        cancel = sync.cancel("r1", "changed my mind")
        [(topic, key, value)] = sync._producer._producer.sent  # type: ignore[attr-defined]
        assert (topic, key, decode_cancel(CODEC, value)) == ("c", b"r1", cancel)
    finally:
        sync.close()


# --- nexus submit --------------------------------------------------------------------------------


def _args(**given: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    submit_command.add_arguments(parser)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in given.items() if k != "prompt"]
    return parser.parse_args([*argv, str(given.get("prompt", "-"))])


def test_the_flags_set_the_priority_and_the_tenant_of_a_prompt() -> None:
    body = submit_command.body_from_args(_args(model="llama3.1", priority="batch", tenant="team-a", prompt="hi"))
    assert (body["priority"], body["tenant"]) == ("batch", "team-a")
    assert "priority" not in submit_command.body_from_args(_args(model="llama3.1", prompt="hi"))


def test_a_bad_priority_flag_is_refused_by_argparse() -> None:
    with pytest.raises(SystemExit):
        _args(model="llama3.1", priority="urgent", prompt="hi")


def test_json_lines_give_their_own_priority_and_tenant_and_the_flags_are_the_defaults() -> None:
    lines = [json.dumps({"model_id": "llama3.1", "input": "a"}),
             json.dumps({"model_id": "llama3.1", "input": "b", "priority": "interactive", "tenant": "team-b"}),
             json.dumps({"model_id": "llama3.1", "input": "c", "context": {"session_id": "s9"}})]
    with_flags = submit_command.requests_from_lines(lines, MODELS, CODEC, _args(priority="batch", tenant="team-a"))
    assert [(r.priority, r.tenant) for r in with_flags] == [("batch", "team-a"), ("interactive", "team-b"),
                                                            ("batch", "team-a")]
    without = submit_command.requests_from_lines(lines, MODELS, CODEC)
    assert [(r.priority, r.tenant) for r in without] == [
        ("interactive", without[0].context.session_id), ("interactive", "team-b"), ("interactive", "s9")]


def test_a_bad_priority_on_a_line_names_the_line() -> None:
    lines = [json.dumps({"model_id": "llama3.1", "input": "a", "priority": "soon"})]
    with pytest.raises(submit_command.InvalidInputError, match="line 1: 'priority' must be one of interactive, batch"):
        submit_command.requests_from_lines(lines, MODELS, CODEC)


@pytest.mark.parametrize("status", ["expired", "cancelled"])
def test_an_expired_or_cancelled_answer_is_printed_as_such(monkeypatch: pytest.MonkeyPatch, status: str) -> None:
    from datetime import datetime

    import producers.client
    from schemas import InferenceResponse

    class FakeProducer:
        def __init__(self, kafka: KafkaSettings) -> None:
            pass

        async def __aenter__(self) -> FakeProducer:
            return self

        async def __aexit__(self, *exc: object) -> None:
            pass

        async def submit_many_and_wait(self, requests: list[InferenceRequest], timeout_s: float) -> list[InferenceResponse]:
            return [InferenceResponse(r.id, r.model_id, status, r.context, 1, datetime.now(UTC),  # type: ignore[arg-type]
                                      error=f"it was {status}") for r in requests]

        async def submit_and_wait(self, request: InferenceRequest, timeout_s: float) -> InferenceResponse:
            return (await self.submit_many_and_wait([request], timeout_s))[0]  # what nexus submit calls

    monkeypatch.setattr(producers.client, "RequestProducer", FakeProducer)
    settings = Settings(kafka=KafkaSettings(bootstrap="127.0.0.1:9"),
                        models=(ModelSettings("llama3.1", (EndpointSettings("http://127.0.0.1:9"),)),))
    err = io.StringIO()
    args = _args(model="llama3.1", priority="batch", prompt="hi")
    assert submit_command.run(args, settings, out=io.StringIO(), err=err) == submit_command.EXIT_ERROR
    assert err.getvalue() == f"nexus submit: llama3.1 answered {status}: it was {status}\n"
