"""What an operator scrapes and charts: every role's /metrics carries the standard process metrics,
and the shipped dashboard and alert rules name only series Nexus really exports.

The exported names come from the roles' own registries (the gateway's with its drop-in metrics,
the worker's, the bridge's), so a metric renamed in the code fails here, not silently on a
dashboard. ``tests/integration/test_prometheus.py`` runs promtool and a real Prometheus.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.server import serve

from consumers.bridge.metrics import BridgeMetrics
from consumers.bridge.server import Bridge
from nexus.settings import AccessSettings, ApiKey, Settings
from producers.gateway.app import GatewayMetrics, create_app
from streams.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "nexus-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

# The series names of each metric type in the Prometheus text format (suffixes of the family name).
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}
# PromQL words that are not metric names.
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
             "unless", "inf", "nan"}


def gateway_registry() -> CollectorRegistry:
    """The gateway's registry as ``create_app`` fills it (its own metrics and the drop-in APIs')."""
    metrics = GatewayMetrics()
    create_app(Settings(), metrics)
    return metrics.registry


def registries() -> dict[str, CollectorRegistry]:
    return {
        "gateway": gateway_registry(),
        "worker": WorkerMetrics().registry,
        "bridge": BridgeMetrics(lambda: {"clients": 0, "subscribed": 0}).registry,
    }


def exported_names(registry: CollectorRegistry) -> set[str]:
    """Every series name the registry can expose, including labelled metrics not observed yet."""
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def all_exported() -> set[str]:
    return set().union(*(exported_names(r) for r in registries().values()))


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels, keywords and Grafana's
    ``$variables`` left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)
    found = re.findall(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", text)
    return {name for name in found if name.lower() not in _KEYWORDS}


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold theirs


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable's metric."""
    dashboard = _dashboard()
    queries = [(f"panel {p['title']!r} {t['refId']}", t["expr"])
               for p in _panels(dashboard) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
        assert match, f"variable {variable['name']}: expected label_values(<series>, <label>), got {query!r}"
        queries.append((f"variable ${variable['name']}", match.group(1)))
    return queries


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


# -- the standard process metrics --------------------------------------------------------------


async def _gateway_page() -> str:
    app = create_app(Settings())
    request = make_mocked_request("GET", "/metrics", app=app)
    match = await app.router.resolve(request)
    response = await match.handler(request)
    assert isinstance(response, web.Response) and isinstance(response.body, bytes), response
    return response.body.decode()


async def _worker_page() -> str:
    return generate_latest(WorkerMetrics().registry).decode()  # what streams/app.py's /metrics serves


async def _bridge_page() -> str:
    bridge = Bridge(Settings())
    async with serve(lambda ws: ws.close(), "127.0.0.1", 0, process_request=bridge._process_request) as server:
        port = server.sockets[0].getsockname()[1]
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST  # as the gateway and the worker serve it
    return response.text


@pytest.mark.parametrize("page", [_gateway_page, _worker_page, _bridge_page], ids=["gateway", "worker", "bridge"])
async def test_every_role_exports_the_standard_process_metrics(page: Any) -> None:
    families = {f.name: f for f in text_string_to_metric_families(await page())}
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds",
                 "process_start_time_seconds", "python_gc_collections", "python_info"):
        assert name in families, f"{name} missing from /metrics; got {sorted(families)}"
    assert families["process_cpu_seconds"].samples[0].name == "process_cpu_seconds_total"
    assert families["process_resident_memory_bytes"].samples[0].value > 0


async def test_bridge_metrics_need_a_key_when_keys_are_configured() -> None:
    token = "bridge-metrics-token"
    key = ApiKey("ops", hashlib.sha256(token.encode()).digest())
    bridge = Bridge(Settings(access=AccessSettings((key,))))
    async with serve(lambda ws: ws.close(), "127.0.0.1", 0, process_request=bridge._process_request) as server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/metrics"
        async with httpx.AsyncClient() as client:
            refused = await client.get(url)
            wrong = await client.get(url, headers={"Authorization": "Bearer nope"})
            allowed = await client.get(url, headers={"Authorization": f"Bearer {token}"})
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
    assert wrong.status_code == 401
    assert allowed.status_code == 200 and "nexus_bridge_clients 0.0" in allowed.text
    assert token not in allowed.text


def test_dead_letter_kinds_are_exported_before_the_first_one() -> None:
    """``rate``/``increase`` cannot count the first increment of a series that did not exist."""
    samples = {(s.name, s.labels.get("kind")): s.value
               for f in WorkerMetrics().registry.collect() if f.name == "nexus_worker_dead_letters" for s in f.samples}
    assert samples[("nexus_worker_dead_letters_total", "failed")] == 0
    assert samples[("nexus_worker_dead_letters_total", "undecodable")] == 0


# -- the dashboard and the alert rules ------------------------------------------------------------


def test_metric_names_reads_selectors_not_functions_labels_or_variables() -> None:
    expr = ('histogram_quantile(0.95, sum by (model, le) (rate(nexus_worker_latency_seconds_bucket'
            '{model=~"$model", status!="a b"}[$__rate_interval]))) / on (model) group_left '
            'max without (instance) (up offset 5m) > bool 1e3 and process_open_fds')
    assert metric_names(expr) == {"nexus_worker_latency_seconds_bucket", "up", "process_open_fds"}


def test_dashboard_queries_name_only_series_nexus_exports() -> None:
    exported = all_exported()
    queries = dashboard_queries()
    assert len(queries) > 30
    unknown = {where: sorted(metric_names(expr) - exported) for where, expr in queries
               if metric_names(expr) - exported}
    assert not unknown, f"the dashboard queries series no role exports: {unknown}"
    # Each query selects something.
    assert all(metric_names(expr) for _, expr in queries)


def test_dashboard_charts_the_main_series() -> None:
    used = set().union(*(metric_names(expr) for _, expr in dashboard_queries()))
    for name in ("nexus_gateway_requests_total", "nexus_worker_requests_total", "nexus_worker_latency_seconds_bucket",
                 "nexus_worker_schedule_wait_seconds_bucket", "nexus_worker_queue_wait_seconds_bucket",
                 "nexus_worker_consumer_lag_records", "nexus_worker_circuit_state", "nexus_worker_dead_letters_total",
                 "nexus_worker_cache_lookups_total", "process_cpu_seconds_total", "process_resident_memory_bytes"):
        assert name in used, f"the dashboard has no panel for {name}"


def test_dashboard_is_importable_into_grafana() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = list(_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, f"{panel['title']!r} is wider than the grid"
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and panel.get("description"), panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_alert_rules_name_only_series_nexus_exports() -> None:
    exported = all_exported()
    rules = alert_rules()
    unknown = {r["alert"]: sorted(metric_names(r["expr"]) - exported) for r in rules if metric_names(r["expr"]) - exported}
    assert not unknown, f"alert rules query series no role exports: {unknown}"


def test_alert_rules_cover_the_operational_failures_and_tell_what_to_check() -> None:
    rules = {r["alert"]: r for r in alert_rules()}
    assert {"NexusConsumerLagGrowing", "NexusCircuitOpen", "NexusDeadLetterRate", "NexusErrorRatioHigh",
            "NexusScheduleWaitHigh"} <= set(rules)
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and len(rule["annotations"]["description"]) > 100, name
        assert "job" not in rule["expr"] and "instance" not in rule["expr"], f"{name} must not assume scrape job names"
