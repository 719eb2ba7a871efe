"""GET /models: merging the workers' endpoint reports (pure), and reading their records."""

from __future__ import annotations

import logging

import pytest

from nexus.settings import EndpointSettings, ModelSettings, Settings
from producers.gateway.models import STALE_AFTER_S, EndpointStateReader, merge_states
from schemas import WorkerReport

SETTINGS = Settings(
    models=(
        ModelSettings("llama3.1", (EndpointSettings("http://a", max_concurrency=2), EndpointSettings("http://b"))),
    )
)


def report(worker: str, at: float, **endpoints: dict) -> WorkerReport:
    return WorkerReport(
        worker=worker,
        at=at,
        models={"llama3.1": [{"url": f"http://{name}", **state} for name, state in endpoints.items()]},
    )


def test_reports_of_several_workers_add_up_and_the_worst_circuit_wins() -> None:
    reports = {
        "w1": report("w1", 100.0, a={"in_flight": 1, "served": 5, "circuit": "closed", "ewma_seconds_per_request": 0.2}),
        "w2": report("w2", 101.0, a={"in_flight": 2, "served": 7, "circuit": "open", "last_error": "boom",
                                      "ewma_seconds_per_request": 0.4}),
    }
    [model] = merge_states(SETTINGS, reports, now=102.0)
    a, b = model["endpoints"]
    assert a["url"] == "http://a" and a["max_concurrency"] == 2
    assert a["live"]["workers_reporting"] == 2
    assert (a["live"]["in_flight"], a["live"]["served"]) == (3, 12)
    assert a["live"]["circuit"] == "open" and a["live"]["healthy"] is False
    assert a["live"]["last_error"] == "boom"
    assert abs(a["live"]["ewma_seconds_per_request"] - 0.3) < 1e-9
    assert b["live"] == {"workers_reporting": 0}


def test_stale_reports_of_stopped_workers_are_ignored() -> None:
    reports = {"gone": report("gone", 0.0, a={"in_flight": 9, "circuit": "open"})}
    [model] = merge_states(SETTINGS, reports, now=STALE_AFTER_S + 1)
    assert model["endpoints"][0]["live"] == {"workers_reporting": 0}


def test_misshapen_endpoint_lists_count_as_no_report() -> None:
    reports = {
        "w1": WorkerReport("w1", 100.0, {"llama3.1": "not a list"}),
        "w2": WorkerReport("w2", 100.0, {"llama3.1": [7, {"url": "http://a", "in_flight": 1}]}),
    }
    [model] = merge_states(SETTINGS, reports, now=100.0)
    assert model["endpoints"][0]["live"]["workers_reporting"] == 1


def test_the_reader_keeps_each_workers_latest_record_and_skips_malformed_ones(caplog: pytest.LogCaptureFixture) -> None:
    reader = EndpointStateReader(SETTINGS)
    assert reader.ingest(report("w1", 100.0, a={"in_flight": 1}).to_bytes())
    assert reader.ingest(report("w1", 101.0, a={"in_flight": 4}).to_bytes())  # the latest wins
    with caplog.at_level(logging.WARNING, logger="producers.gateway.models"):
        for value in (b"{not json", b'{"worker": 1, "at": 2}', b'{"at": 2}', None):
            assert not reader.ingest(value)
    assert len([r for r in caplog.records if "malformed endpoint-state record" in r.getMessage()]) == 4
    assert list(reader.reports) == ["w1"] and reader.reports["w1"].at == 101.0
    [model] = merge_states(SETTINGS, reader.reports, now=101.0)
    assert model["endpoints"][0]["live"]["in_flight"] == 4
    assert reader.state is None  # not started: nothing to report to /health
