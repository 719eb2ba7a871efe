"""The pure parts of ``nexus replay``: times, spans, decoding, filters, join report, output."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta, UTC

import pytest

from consumers.replay.audit import (
    RecordFilter,
    ReplayError,
    ReplayRecord,
    Span,
    decode_record,
    optional_topics,
    parse_time,
    plan_span,
    read_windows,
    resubmission,
    topic_kinds,
)
from consumers.replay.join import Joiner, percentile
from consumers.replay.render import jsonl_line, progress_line, table_header, table_row
from nexus.settings import KafkaSettings
from schemas import Codec, InferenceRequest, InferenceResponse, ModelContext, encode_request, encode_response

CODEC = Codec.from_directory()
T0 = 1_700_000_000_000


def _request(i: str, model: str = "llama3.1", session: str = "s1", **kw: object) -> InferenceRequest:
    return InferenceRequest(id=i, model_id=model, input=f"q {i}", context=ModelContext(session), **kw)  # type: ignore[arg-type]


def _response(i: str, model: str = "llama3.1", session: str = "s1", latency: int = 10, status: str = "ok",
              output: str | None = None) -> InferenceResponse:
    return InferenceResponse(
        id=i, model_id=model, status=status, context=ModelContext(session), latency_ms=latency,  # type: ignore[arg-type]
        completed_at=datetime.fromtimestamp(T0 / 1000, UTC),
        output=f"a {i}" if output is None else output, error=None if status == "ok" else "boom",
    )


_offsets = iter(range(1_000_000))


def _rec(value: InferenceRequest | InferenceResponse, ts: int = T0, partition: int = 0) -> ReplayRecord:
    kind = "request" if isinstance(value, InferenceRequest) else "response"
    data = encode_request(CODEC, value) if kind == "request" else encode_response(CODEC, value)  # type: ignore[arg-type]
    return decode_record(CODEC, kind, topic=f"inference.{kind}s", partition=partition, offset=next(_offsets),
                         timestamp=ts, key=b"k", value=data)


# --- times and spans --------------------------------------------------------------------------


def test_parse_time_forms() -> None:
    assert parse_time("1700000000000") == T0
    assert parse_time("2023-11-14T22:13:20Z") == T0
    assert parse_time("2023-11-14T22:13:20+00:00") == T0
    assert parse_time("2023-11-14T23:13:20+01:00") == T0
    assert parse_time("2023-11-14T22:13:20") == T0  # no offset: UTC, not the machine's zone
    assert parse_time("2023-11-14T22:13:20.250Z") == T0 + 250
    now = datetime.fromtimestamp(T0 / 1000, UTC)
    assert parse_time("-1h", now) == T0 - 3_600_000
    assert parse_time("-90s", now) == T0 - 90_000
    assert parse_time("-2d", now) == T0 - 2 * 86_400_000
    assert parse_time("-1.5m", now) == T0 - 90_000


@pytest.mark.parametrize("text", ["yesterday", "", "-1w", "12:00pm", "2023-13-01"])
def test_parse_time_rejects_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(ReplayError, match="ISO-8601.*epoch milliseconds"):
        parse_time(text)


def test_filter_rejects_an_empty_range_and_unknown_status() -> None:
    with pytest.raises(ReplayError, match="--until .* must be after --since"):
        RecordFilter(since_ms=T0, until_ms=T0)
    with pytest.raises(ReplayError, match="use ok, error, expired, cancelled"):
        RecordFilter(statuses=frozenset({"fine"}))
    assert RecordFilter(statuses=frozenset({"expired", "cancelled"})).statuses == {"expired", "cancelled"}


@pytest.mark.parametrize(
    "since_offset, until_offset, bounded, expected",
    [
        (None, None, (False, False), Span(3, 10)),  # whole retained log, up to the snapshot end
        (5, None, (True, False), Span(5, 10)),
        (None, None, (True, False), Span(10, 10)),  # nothing at or after --since
        (5, 8, (True, True), Span(5, 8)),
        (5, None, (True, True), Span(5, 10)),  # nothing at or after --until: up to the end
        (1, 2, (True, True), Span(3, 3)),  # both before the log start (retention deleted them)
        (5, 12, (True, True), Span(5, 10)),  # never past the snapshot
    ],
)
def test_plan_span(since_offset: int | None, until_offset: int | None, bounded: tuple[bool, bool],
                   expected: Span) -> None:
    span = plan_span(3, 10, since_offset, until_offset, bounded_since=bounded[0], bounded_until=bounded[1])
    assert span == expected


def test_join_windows_widen_by_grace_in_the_right_direction() -> None:
    kinds = topic_kinds(KafkaSettings(), ("requests", "responses"))
    selection = RecordFilter(since_ms=T0, until_ms=T0 + 1000)
    assert read_windows(kinds, selection, join=False, grace_ms=50) == {
        "inference.requests": (T0, T0 + 1000), "inference.requests.batch": (T0, T0 + 1000),
        "inference.responses": (T0, T0 + 1000)}
    assert read_windows(kinds, selection, join=True, grace_ms=50) == {
        "inference.requests": (T0 - 50, T0 + 1000), "inference.requests.batch": (T0 - 50, T0 + 1000),
        "inference.responses": (T0, T0 + 1050)}
    assert read_windows(kinds, RecordFilter(), join=True, grace_ms=50) == {
        "inference.requests": (None, None), "inference.requests.batch": (None, None),
        "inference.responses": (None, None)}


def test_topic_kinds_names_the_choices() -> None:
    kafka = KafkaSettings(dlq_topic="x.dlq")
    assert topic_kinds(kafka, ("dlq", "tokens")) == {"x.dlq": "dead_letter", "inference.tokens": "token"}
    with pytest.raises(ReplayError, match="requests, responses, tokens, dlq, cancels"):
        topic_kinds(kafka, ("answers",))


def test_requests_are_both_lanes_and_cancels_a_topic_of_their_own() -> None:
    kafka = KafkaSettings(requests_topic="r.i", batch_requests_topic="r.b", cancels_topic="c")
    assert topic_kinds(kafka, ("requests",)) == {"r.i": "request", "r.b": "request"}
    assert topic_kinds(kafka, ("cancels",)) == {"c": "cancel"}
    assert optional_topics(kafka) == {"r.b", "c"}  # absent on a cluster only older roles ran on


# --- decoding and filters ----------------------------------------------------------------------


def test_undecodable_value_is_kept_with_the_reason() -> None:
    record = decode_record(CODEC, "request", topic="t", partition=1, offset=2, timestamp=T0, key=b"\xff\x00",
                           value=b"garbage!")
    assert record.value is None and record.raw == b"garbage!"
    assert "NotAvroError" in (record.error or "")
    line = json.loads(jsonl_line(record))
    assert line["value"] is None
    assert base64.b64decode(line["value_base64"]) == b"garbage!"
    assert line["key"] is None and base64.b64decode(line["key_base64"]) == b"\xff\x00"
    assert "single-object" in line["error"]


def test_dead_letter_shows_the_request_and_the_reason() -> None:
    data = encode_request(CODEC, _request("r1", model="nope"))
    record = decode_record(CODEC, "dead_letter", topic="inference.dlq", partition=0, offset=0, timestamp=T0,
                           key=b"nope", value=data, headers=[("nexus-error", b"unknown model 'nope'")])
    assert record.id == "r1" and record.status == "error" and record.error == "unknown model 'nope'"
    line = json.loads(jsonl_line(record))
    assert line["value"]["id"] == "r1" and line["headers"]["nexus-error"] == "unknown model 'nope'"


def test_filter_fields_and_range() -> None:
    req = _rec(_request("r1", model="mistral", session="s9"), ts=T0 + 5)
    ok = _rec(_response("r1", model="mistral", session="s9"), ts=T0 + 6)
    bad = _rec(_response("r2", status="error"), ts=T0 + 7)
    garbage = decode_record(CODEC, "request", topic="t", partition=0, offset=0, timestamp=T0 + 5, key=None,
                            value=b"x")
    everything = [req, ok, bad, garbage]
    assert [r for r in everything if RecordFilter().matches(r)] == everything
    assert [r for r in everything if RecordFilter(models=frozenset({"mistral"})).matches(r)] == [req, ok]
    assert [r for r in everything if RecordFilter(sessions=frozenset({"s9"})).matches(r)] == [req, ok]
    assert [r for r in everything if RecordFilter(request_ids=frozenset({"r2"})).matches(r)] == [bad]
    assert [r for r in everything if RecordFilter(statuses=frozenset({"error"})).matches(r)] == [bad]
    assert [r for r in everything if RecordFilter(statuses=frozenset({"ok"})).matches(r)] == [ok]
    assert [r for r in everything if RecordFilter(since_ms=T0 + 6, until_ms=T0 + 7).matches(r)] == [ok]
    assert [r for r in everything if RecordFilter(until_ms=T0 + 6).matches(r)] == [req, garbage]


def test_resubmission_links_back_and_skips_the_cache() -> None:
    original = _request("old", deadline=datetime.now(UTC) - timedelta(hours=1), reply_to="gw-1")
    copy = resubmission(original, "new")
    assert (copy.id, copy.original_id, copy.model_id, copy.input) == ("new", "old", "llama3.1", original.input)
    assert copy.context == original.context and copy.options == original.options
    assert copy.deadline is None and copy.reply_to is None and copy.cache == "no-cache"
    assert copy.created_at >= original.created_at
    assert resubmission(original, "new2", model_id="mistral").model_id == "mistral"


# --- join ----------------------------------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))
    assert (percentile(values, 50), percentile(values, 90), percentile(values, 99)) == (50, 90, 99)
    assert percentile([7], 99) == 7
    assert percentile([1, 2, 3, 4], 50) == 2 and percentile([1, 2, 3, 4], 90) == 4
    with pytest.raises(ValueError):
        percentile([], 50)


def test_join_report_is_exact() -> None:
    joiner = Joiner(since_ms=T0, until_ms=T0 + 1000)
    records = [
        # llama3.1: latencies 10..100, one answered twice, one unanswered, one error
        *(_rec(_request(f"l{i}"), ts=T0 + i) for i in range(1, 12)),
        *(_rec(_response(f"l{i}", latency=10 * i), ts=T0 + 100 + i) for i in range(1, 10)),
        _rec(_response("l10", latency=100, status="error"), ts=T0 + 110),
        _rec(_response("l3", latency=999), ts=T0 + 200, partition=3),  # the duplicate comes later
        # mistral: answered after --until, inside the grace period: still paired
        _rec(_request("m1", model="mistral"), ts=T0 + 999),
        _rec(_response("m1", model="mistral", latency=5), ts=T0 + 1500),
        # written twice with the same id
        _rec(_request("d1", model="mistral"), ts=T0 + 10),
        _rec(_request("d1", model="mistral"), ts=T0 + 11),
        _rec(_response("d1", model="mistral", latency=7), ts=T0 + 12),
        # a request from before the range answered inside it: paired, not counted, not an orphan
        _rec(_request("early"), ts=T0 - 5),
        _rec(_response("early", latency=1), ts=T0 + 1),
        # an answer whose request is nowhere
        _rec(_response("ghost"), ts=T0 + 20),
        # an answer after the range to a request not in it: ignored
        _rec(_response("later"), ts=T0 + 1200),
    ]
    for record in reversed(records):  # order does not matter
        joiner.add(record)
    report = joiner.report()
    assert report.requests == 13  # l1..l11, m1, d1
    assert report.answered == 12 and report.unanswered == ["l11"] and not report.complete
    assert report.responses == 14  # written inside the range: l1..l10, l3 again, d1, early, ghost
    assert report.responses_without_request == ["ghost"]
    assert report.duplicate_requests == {"d1": 2}
    assert report.duplicate_responses == {"l3": 2}
    assert report.statuses == {"ok": 11, "error": 1}
    llama, mistral = report.models
    assert (llama.model_id, llama.requests, llama.answered) == ("llama3.1", 11, 10)
    assert llama.latency_ms == {"p50": 50, "p90": 90, "p99": 100, "max": 100}  # the first answer of l3 counts
    assert llama.statuses == {"ok": 9, "error": 1}
    assert (mistral.requests, mistral.answered, mistral.latency_ms["p50"], mistral.latency_ms["p99"]) == (2, 2, 5, 7)
    text = report.to_text()
    assert "requests without a response: 1\n    l11" in text
    assert "d1 x2" in text and "l3 x2" in text and "ghost" in text
    assert json.loads(json.dumps(report.to_json()))["unanswered"] == ["l11"]


def test_join_compares_resubmissions_with_their_originals() -> None:
    joiner = Joiner()
    for record in [
        _rec(_request("o1")), _rec(_response("o1", output="same")),
        _rec(_request("o2")), _rec(_response("o2", output="before")),
        _rec(_request("n1", original_id="o1")), _rec(_response("n1", output="same")),
        _rec(_request("n2", original_id="o2")), _rec(_response("n2", output="after")),
        _rec(_request("n3", original_id="gone")), _rec(_response("n3")),
        _rec(_request("n4", original_id="o1")),
    ]:
        joiner.add(record)
    r = joiner.report().resubmissions
    assert (r.resubmitted, r.answered, r.compared, r.same_output, r.different_output) == (4, 3, 2, 1, 1)
    assert r.different_ids == ["n2"]


def test_empty_join_is_complete() -> None:
    report = Joiner().report()
    assert report.complete and report.requests == 0 and report.models == []
    assert "requests:  0" in report.to_text()


# --- output ----------------------------------------------------------------------------------------


def test_jsonl_line_has_position_key_and_value() -> None:
    record = _rec(_request("r1", session="s1"), ts=T0)
    line = json.loads(jsonl_line(record))
    assert {k: line[k] for k in ("topic", "partition", "timestamp", "kind", "key")} == {
        "topic": "inference.requests", "partition": 0, "timestamp": T0, "kind": "request", "key": "k"}
    assert line["time"] == "2023-11-14T22:13:20.000+00:00"
    assert line["value"]["id"] == "r1" and line["value"]["context"]["session_id"] == "s1"
    assert "value_base64" not in line and "error" not in line


def test_table_rows_line_up() -> None:
    rows = [table_header(), table_row(_rec(_request("r1"))), table_row(_rec(_response("r1", status="error")))]
    assert rows[1].index("r1") == rows[0].index("id") == rows[2].index("r1")
    assert "boom" in rows[2] and "error" in rows[2]
    long = table_row(_rec(_request("r2")), text_width=10)
    assert long.endswith("q r2")


def test_progress_line() -> None:
    assert progress_line(0, 0).startswith("[" + "#" * 30 + "]")
    assert progress_line(4200, 10_000) == "[#############-----------------]  42%  4,200/10,000 records"


def test_tokens_decode_and_filter_by_session() -> None:
    from schemas import InferenceToken, encode_token

    data = encode_token(CODEC, InferenceToken("r1", "mistral", "s7", 3, " world"))
    record = decode_record(CODEC, "token", topic="inference.tokens", partition=0, offset=0, timestamp=T0,
                           key=b"s7", value=data)
    assert (record.id, record.model_id, record.session_id, record.status) == ("r1", "mistral", "s7", None)
    assert RecordFilter(sessions=frozenset({"s7"})).matches(record)
    assert not RecordFilter(statuses=frozenset({"ok"})).matches(record)
    assert "#3 world" in table_row(record)  # whitespace is flattened in the table
    assert json.loads(jsonl_line(record))["value"]["seq"] == 3


# -- errors and exit codes ---------------------------------------------------------------


def test_replay_errors_are_nexus_errors_and_only_bad_input_is_a_value_error() -> None:
    from consumers.replay import ReplayArgumentError, ReplayKafkaError, ReplayStalledError
    from nexus.errors import NexusError

    assert issubclass(ReplayError, NexusError) and not issubclass(ReplayError, ValueError)
    assert issubclass(ReplayArgumentError, ReplayError) and issubclass(ReplayArgumentError, ValueError)
    assert issubclass(ReplayStalledError, ReplayKafkaError) and issubclass(ReplayKafkaError, ReplayError)
    assert not issubclass(ReplayKafkaError, ValueError)
    with pytest.raises(ValueError, match="not a time"):
        parse_time("yesterday-ish")


def _replay_args(*argv: str) -> object:
    from consumers.replay.cli import add_arguments
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_replay_command_exits_2_on_bad_arguments_and_3_when_kafka_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import io

    from consumers.replay import cli, reader
    from nexus.settings import Settings

    err = io.StringIO()
    assert cli.run(_replay_args("--since", "last tuesday"), Settings(), io.StringIO(), err) == cli.EXIT_USAGE
    assert err.getvalue().startswith("nexus replay: 'last tuesday' is not a time")

    async def unreachable(*args: object, **kwargs: object):  # an async generator that fails at once
        raise reader.ReplayKafkaError("cannot reach Kafka at nowhere:9092")
        yield

    monkeypatch.setattr(reader, "replay_records", unreachable)
    err = io.StringIO()
    assert cli.run(_replay_args("--format", "jsonl"), Settings(), io.StringIO(), err) == cli.EXIT_KAFKA
    assert "cannot reach Kafka at nowhere:9092" in err.getvalue()


# --- scheduling: the batch lane, expired and cancelled answers, cancels ----------------------------


def test_a_batch_request_is_joined_like_any_other_and_marked_in_the_table() -> None:
    batch = _request("b1", priority="batch", tenant="team-a")
    record = decode_record(CODEC, "request", topic="inference.requests.batch", partition=2, offset=0,
                           timestamp=T0, key=b"llama3.1", value=encode_request(CODEC, batch))
    assert record.value == batch and record.session_id == "s1"
    assert "[batch] q b1" in table_row(record)
    joiner = Joiner()
    for r in (record, _rec(_request("i1")), _rec(_response("b1")), _rec(_response("i1", status="expired"))):
        joiner.add(r)
    report = joiner.report()
    assert report.complete and report.requests == 2 and report.statuses == {"ok": 1, "expired": 1}


def test_resubmission_keeps_the_lane_and_the_tenant() -> None:
    copy = resubmission(_request("old", priority="batch", tenant="team-a"), "new")
    assert (copy.priority, copy.tenant) == ("batch", "team-a")


def test_expired_and_cancelled_answers_filter_by_status() -> None:
    expired, cancelled = _rec(_response("r1", status="expired")), _rec(_response("r2", status="cancelled"))
    assert RecordFilter(statuses=frozenset({"cancelled"})).matches(cancelled)
    assert not RecordFilter(statuses=frozenset({"error"})).matches(expired)
    assert "cancelled" in table_row(cancelled)


def test_a_cancel_decodes_and_shows_its_reason() -> None:
    from schemas import InferenceCancel, encode_cancel

    cancel = InferenceCancel("r1", datetime.fromtimestamp(T0 / 1000, UTC), "client disconnected", "team-a")
    record = decode_record(CODEC, "cancel", topic="inference.cancels", partition=0, offset=0, timestamp=T0,
                           key=b"r1", value=encode_cancel(CODEC, cancel))
    assert record.value == cancel
    assert (record.id, record.model_id, record.session_id, record.status) == ("r1", None, None, None)
    assert RecordFilter(request_ids=frozenset({"r1"})).matches(record)
    assert not RecordFilter(models=frozenset({"llama3.1"})).matches(record)
    assert "client disconnected (key team-a)" in table_row(record)
    assert json.loads(jsonl_line(record))["value"] == {
        "id": "r1", "requested_at": "2023-11-14T22:13:20+00:00", "reason": "client disconnected", "key_name": "team-a"}
    joiner = Joiner()
    joiner.add(record)  # a cancel is neither a request nor an answer
    assert joiner.report().requests == 0 and joiner.report().responses == 0
