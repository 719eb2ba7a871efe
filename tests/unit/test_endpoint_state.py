"""Merging the workers' endpoint reports for GET /models (pure)."""

from __future__ import annotations

from nexus.settings import EndpointSettings, ModelSettings, Settings
from producers.gateway.models import STALE_AFTER_S, merge_states

SETTINGS = Settings(
    models=(
        ModelSettings("llama3.1", (EndpointSettings("http://a", max_concurrency=2), EndpointSettings("http://b"))),
    )
)


def report(worker: str, at: float, **endpoints: dict) -> dict:
    return {
        "worker": worker,
        "at": at,
        "models": {"llama3.1": [{"url": f"http://{name}", **state} for name, state in endpoints.items()]},
    }


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
