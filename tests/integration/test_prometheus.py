"""Nexus as Prometheus sees it: the shipped alert rules pass promtool, and a real Prometheus server
scraping a running gateway, worker and bridge shows a request and loads the rules healthy.

promtool and the server come with Debian's ``prometheus`` package (``.ci/run`` installs it); when
they are missing these tests fail naming the package rather than skip.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from localdev.broker import free_port
from tests.eventually import eventually_sync
from tests.integration.support import Role

ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = ROOT / "deploy" / "prometheus"
INSTALL = "install Debian's `prometheus` package: apt-get install --no-install-recommends prometheus"


def _binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else None)
    if path is None:
        pytest.fail(f"{name} not found: {INSTALL}", pytrace=False)
    return path


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_binary("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=RULES_DIR)


def test_alert_rules_pass_promtool_check() -> None:
    result = _promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    rules = sum(len(g["rules"]) for g in yaml.safe_load((RULES_DIR / "alerts.yml").read_text())["groups"])
    assert f"SUCCESS: {rules} rules found" in result.stdout


def test_alert_rules_fire_and_stay_quiet_as_their_unit_tests_say() -> None:
    """``alerts_test.yml``: each alert fires on its failure and not on the look-alike that is fine."""
    result = _promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    tested = yaml.safe_load((RULES_DIR / "alerts_test.yml").read_text())["tests"]
    cases = [case for test in tested for case in test["alert_rule_test"]]
    alerts = {r["alert"] for g in yaml.safe_load((RULES_DIR / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    assert {c["alertname"] for c in cases if c["exp_alerts"]} == alerts, "every alert needs a case where it fires"
    assert {c["alertname"] for c in cases if not c["exp_alerts"]} == alerts, "every alert needs a quiet case"


class Prometheus:
    """A Prometheus server in ``workdir`` scraping ``targets`` ({job: host:port}) every second."""

    def __init__(self, workdir: Path, targets: dict[str, str], logs_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES_DIR / "alerts.yml")],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                               for job, target in targets.items()],
        }
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.data = workdir / "data"
        self.log_path = logs_dir / f"prometheus-{uuid.uuid4().hex[:6]}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [_binary("prometheus"), f"--config.file={self.config_path}", f"--storage.tsdb.path={self.data}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT,
            )
        eventually_sync(self._ready, "Prometheus is ready", timeout=60, interval=0.1, context=self.log_tail)
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}")
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-30:])

    def api(self, path: str, **params: str) -> Any:
        reply = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=5)
        reply.raise_for_status()
        body = reply.json()
        assert body["status"] == "success", body
        return body["data"]

    def value(self, query: str) -> float | None:
        """The query's single value now; None while it has no result."""
        result = self.api("query", query=query)["result"]
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=2)
        return True
    except httpx.HTTPError:
        return False


def _worker_log(logs_dir: Path) -> str:
    logs = sorted(logs_dir.glob("worker-*.log"), key=lambda p: p.stat().st_mtime)
    return "\n".join(logs[-1].read_text(errors="replace").splitlines()[-30:]) if logs else "(no worker log)"


@pytest.fixture()
def scraped(stack: dict[str, str], tmp_path: Path, logs_dir: Path) -> Iterator[tuple[Prometheus, dict[str, str]]]:
    """The shared gateway and worker plus a bridge, scraped by a fresh Prometheus."""
    bridge_port = free_port()
    bridge = Role("bridge", ["bridge"], {**stack, "NEXUS_BRIDGE_HOST": "127.0.0.1",
                                         "NEXUS_BRIDGE_PORT": str(bridge_port)}, logs_dir).start()
    prometheus: Prometheus | None = None
    try:
        bridge.wait_http(f"http://127.0.0.1:{bridge_port}/health")
        worker_url = f"http://127.0.0.1:{stack['NEXUS_WORKER_WEB_PORT']}"
        eventually_sync(lambda: _answers(f"{worker_url}/health"), "the worker serves its pages", timeout=90,
                        interval=0.2, context=lambda: _worker_log(logs_dir))
        gateway = stack["GATEWAY_URL"].removeprefix("http://")
        targets = {"gateway": gateway, "worker": f"127.0.0.1:{stack['NEXUS_WORKER_WEB_PORT']}",
                   "bridge": f"127.0.0.1:{bridge_port}"}
        prometheus = Prometheus(tmp_path, targets, logs_dir).start()
        yield prometheus, stack
    finally:
        if prometheus is not None:
            prometheus.stop()
        bridge.stop()


def test_prometheus_scrapes_the_stack_and_shows_a_request(scraped: tuple[Prometheus, dict[str, str]]) -> None:
    prometheus, stack = scraped

    def targets_up() -> bool:
        active = prometheus.api("targets")["activeTargets"]
        return {t["labels"]["job"] for t in active if t["health"] == "up"} == {"gateway", "worker", "bridge"}

    eventually_sync(targets_up, "Prometheus scrapes the gateway, the worker and the bridge", timeout=60,
                    interval=0.2, context=lambda: str(prometheus.api("targets")["activeTargets"]))
    for job in ("gateway", "worker", "bridge"):
        assert prometheus.value(f'process_cpu_seconds_total{{job="{job}"}}') is not None, job
        assert (prometheus.value(f'process_resident_memory_bytes{{job="{job}"}}') or 0) > 0, job

    accepted = 'sum(nexus_gateway_requests_total{job="gateway", model="mistral", code="202"})'
    answered = 'sum(nexus_worker_requests_total{job="worker", model="mistral", status="ok"})'
    before = (prometheus.value(accepted) or 0.0, prometheus.value(answered) or 0.0)
    reply = httpx.post(f"{stack['GATEWAY_URL']}/infer", json={"model_id": "mistral", "input": "scrape me"}, timeout=30)
    assert reply.status_code == 202, reply.text

    eventually_sync(lambda: (prometheus.value(accepted) or 0.0) >= before[0] + 1,
                    "Prometheus shows the gateway's count of the accepted request", timeout=30, interval=0.2,
                    context=lambda: f"{accepted} = {prometheus.value(accepted)}, before {before[0]}")
    eventually_sync(lambda: (prometheus.value(answered) or 0.0) >= before[1] + 1,
                    "Prometheus shows the worker's count of the answer", timeout=60, interval=0.2,
                    context=lambda: f"{answered} = {prometheus.value(answered)}, before {before[1]}")
    # The latency histogram the dashboard charts has the answer too.
    p95 = prometheus.value('histogram_quantile(0.95, sum by (le) '
                           '(nexus_worker_latency_seconds_bucket{job="worker", model="mistral"}))')
    assert p95 is not None and p95 > 0


def test_prometheus_loads_the_alert_rules_healthy(scraped: tuple[Prometheus, dict[str, str]]) -> None:
    prometheus, _ = scraped
    shipped = {r["alert"] for g in yaml.safe_load((RULES_DIR / "alerts.yml").read_text())["groups"] for r in g["rules"]}

    def rules() -> dict[str, dict[str, Any]]:
        return {r["name"]: r for g in prometheus.api("rules", type="alert")["groups"] for r in g["rules"]}

    def all_evaluated() -> bool:
        loaded = rules()
        return set(loaded) == shipped and all(r["health"] != "unknown" for r in loaded.values())

    eventually_sync(all_evaluated, "Prometheus evaluated every shipped alert rule", timeout=30, interval=0.2,
                    context=lambda: str({n: r["health"] for n, r in rules().items()}))
    unhealthy = {name: rule.get("lastError") for name, rule in rules().items() if rule["health"] != "ok"}
    assert not unhealthy, f"rules failed to evaluate: {unhealthy}"
    firing = {name for name, rule in rules().items() if rule["state"] == "firing"}
    assert not firing, f"a healthy stack raises alerts: {firing}"
