"""`nexus config` shows every effective setting and where it came from, secrets hidden; `nexus --version`."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from nexus import cli
from nexus.cli import main
from nexus.config_report import HIDDEN, describe, is_secret
from nexus.logs import NOISY_LOGGERS, LogSettings
from nexus.settings import load_settings

SECRET = "s3cret-passw0rd"
TOKEN_HASH = hashlib.sha256(b"a token").hexdigest()


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """main() configures the process's logging, as a role does; put pytest's back after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, old in levels.items():
        logging.getLogger(name).setLevel(old)
    logging.captureWarnings(False)


@pytest.fixture()
def environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A clean environment and a settings file in a directory of its own."""
    for name in list(os.environ):
        if name.startswith(("NEXUS_", "OLLAMA_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "site.toml"
    path.write_text(
        '[kafka]\npartitions = 3\nsecurity_protocol = "SASL_PLAINTEXT"\nsasl_username = "nexus"\n'
        '[gateway]\nport = 3999\n'
        '[models."llama3.1"]\nendpoints = ["gpu1", { url = "gpu2:11434", weight = 2.0 }]\ntimeout_s = 30\n'
        '[[access.keys]]\nname = "team-a"\nsha256 = "' + TOKEN_HASH + '"\n'
        '[tenants."team-a"]\nweight = 3\n'
    )
    monkeypatch.setenv("NEXUS_KAFKA_SASL_PASSWORD", SECRET)
    monkeypatch.setenv("NEXUS_WORKER_MAX_BATCH", "7")
    monkeypatch.setenv("OLLAMA_HOST", "0.0.0.0")
    return path


def _report(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, dict[str, object]]:
    assert main(["config", *args, "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out)["settings"]


def test_each_value_says_where_it_came_from(environment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = _report(capsys, "--config", str(environment), "--bootstrap", "broker:9093", "--log-level", "debug")
    where = str(environment)
    expected = {
        "kafka.bootstrap": ("broker:9093", "--bootstrap"),
        "kafka.partitions": (3, where),
        "kafka.sasl_username": ("nexus", where),
        "kafka.sasl_password": (HIDDEN, "env NEXUS_KAFKA_SASL_PASSWORD"),
        "kafka.tokens_topic": ("inference.tokens", "default"),  # a topic name is not a token
        "kafka.connect_timeout_s": (60.0, "default"),
        "gateway.port": (3999, where),
        "worker.max_batch": (7, "env NEXUS_WORKER_MAX_BATCH"),
        "bridge.port": (8765, "default"),
        "ollama_host": ("http://0.0.0.0:11434", "env OLLAMA_HOST"),
        'models."llama3.1".timeout_s': (30.0, where),
        'models."llama3.1".retries': (2, "default"),
        'models."llama3.1".endpoints[0].url': ("http://gpu1:11434", where),
        'models."llama3.1".endpoints[0].weight': (1.0, "default"),
        'models."llama3.1".endpoints[1].weight': (2.0, where),
        "access.keys[0].name": ("team-a", where),
        "access.keys[0].sha256": (HIDDEN, where),
        'tenants."team-a".weight': (3.0, where),
        'tenants."team-a".max_concurrent': (0, "default"),
        "log.level": ("debug", "--log-level"),
        "log.format": ("text", "default"),
    }
    assert {key: (settings[key]["value"], settings[key]["source"]) for key in expected} == expected


def test_every_setting_is_shown(environment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = _report(capsys, "--config", str(environment))
    loaded = load_settings(environment)
    for section in ("kafka", "gateway", "worker", "bridge"):
        for name in vars(getattr(loaded, section)):
            assert f"{section}.{name}" in settings, f"{section}.{name} missing from nexus config"


def test_secrets_never_print(environment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--config", str(environment)]) == 0
    text = capsys.readouterr().out
    assert SECRET not in text and TOKEN_HASH not in text
    line = next(x for x in text.splitlines() if x.startswith("kafka.sasl_password"))
    assert f'"{HIDDEN}"' in line and line.rstrip().endswith("# env NEXUS_KAFKA_SASL_PASSWORD")
    assert text.splitlines()[0].startswith("# nexus config")
    assert all(is_secret(name) for name in ("sasl_password", "ssl_key_password", "api_token", "sha256", "otlp_headers"))
    assert not any(is_secret(name) for name in ("tokens_topic", "max_tokens", "sasl_username", "ssl_keyfile"))


def test_environment_lists_and_defaults_are_attributed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    environ = {"NEXUS_MODELS": "phi3", "NEXUS_TENANTS": "b:weight=2", "NEXUS_API_KEYS": f"k:{TOKEN_HASH}",
               "NEXUS_LOG_FORMAT": "json"}
    monkeypatch.chdir(tmp_path)  # no configs/nexus.toml here
    settings = load_settings(environ=environ)
    log = LogSettings("info", "json", "default", "env NEXUS_LOG_FORMAT")
    rows = {r.key: (r.value, r.source) for r in describe(settings, {}, environ, "configs/nexus.toml", None, log)}
    assert rows['models."phi3".id'] == ("phi3", "env NEXUS_MODELS")
    assert rows['models."phi3".endpoints[0].url'] == ("http://127.0.0.1:11434", "default")
    assert rows['tenants."b".weight'] == (2.0, "env NEXUS_TENANTS")
    assert rows['tenants."b".requests_per_minute'] == (0, "default")
    assert rows["access.keys[0].sha256"] == (HIDDEN, "env NEXUS_API_KEYS")
    assert rows["kafka.bootstrap"] == ("localhost:9092", "default")
    assert rows["log.format"] == ("json", "env NEXUS_LOG_FORMAT")


def test_a_bad_setting_fails_the_command_as_it_would_a_role(environment: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NEXUS_GATEWAY_PORT", "many")
    assert main(["config", "--config", str(environment)]) == 2
    assert "NEXUS_GATEWAY_PORT: expected int" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"nexus {version('nexus-inference')}\n"
    # Run from a checkout that was never installed: still an answer.
    monkeypatch.setattr(cli, "DISTRIBUTION", "no-such-distribution-installed")
    assert cli.package_version().startswith("0+unknown")


def test_tracing_shows_the_otel_variables_set_with_headers_hidden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    off = {r.key: (r.value, r.source) for r in describe(load_settings(environ={}), {}, {}, "configs/nexus.toml")}
    assert off["tracing.export"] == ("off (no OTEL_EXPORTER_OTLP_ENDPOINT)", "default")
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
               "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer abc"}
    rows = {r.key: (r.value, r.source) for r in describe(load_settings(environ=environ), {}, environ, "x.toml")}
    assert rows["tracing.OTEL_EXPORTER_OTLP_ENDPOINT"] == ("http://collector:4318", "env OTEL_EXPORTER_OTLP_ENDPOINT")
    assert rows["tracing.OTEL_EXPORTER_OTLP_HEADERS"] == (HIDDEN, "env OTEL_EXPORTER_OTLP_HEADERS")
    assert "tracing.export" not in rows
