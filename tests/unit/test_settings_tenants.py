"""Settings of fair scheduling: the lane, cancel and queue topics, the read-ahead, and the tenants."""

from __future__ import annotations

from pathlib import Path

import pytest

from nexus.kafka.topics import nexus_topics, topic_names
from nexus.settings import ANY_TENANT, ConfigError, KafkaSettings, Settings, TenantSettings, load_settings


def _load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Settings:
    path = tmp_path / "nexus.toml"
    path.write_text(text)
    return load_settings(path, environ=environ or {})


def _error(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text, environ)
    return str(info.value).replace(str(tmp_path / "nexus.toml"), "<file>")


def test_the_new_topics_and_the_read_ahead_default() -> None:
    kafka = KafkaSettings()
    assert (kafka.batch_requests_topic, kafka.cancels_topic, kafka.queue_topic) == (
        "inference.requests.batch", "inference.cancels", "nexus.queue")
    assert kafka.lane_topic("batch") == "inference.requests.batch"
    assert kafka.lane_topic("interactive") == kafka.lane_topic("anything else") == "inference.requests"
    assert kafka.request_topics == ("inference.requests", "inference.requests.batch")
    assert Settings().worker.max_in_flight == 1024


def test_the_topics_can_be_renamed_from_the_file_and_the_environment(tmp_path: Path) -> None:
    settings = _load(tmp_path, '[kafka]\nbatch_requests_topic = "b"\ncancels_topic = "c"\n',
                     {"NEXUS_KAFKA_QUEUE_TOPIC": "q"})
    assert (settings.kafka.lane_topic("batch"), settings.kafka.cancels_topic, settings.kafka.queue_topic) == ("b", "c", "q")


def test_both_lanes_and_the_cancels_are_audit_topics_and_the_queue_is_compacted() -> None:
    kafka = KafkaSettings(replication_factor=3)
    assert topic_names(kafka) == ["inference.requests", "inference.requests.batch", "inference.responses",
                                  "inference.tokens", "inference.dlq", "inference.cancels"]
    specs = {spec.name: spec for spec in nexus_topics(kafka)}
    for name in ("inference.requests.batch", "inference.cancels"):
        assert specs[name].partitions == kafka.partitions
        assert specs[name].config["cleanup.policy"] == "delete"
        assert specs[name].config["retention.ms"] == str(kafka.retention_ms)
    queue, state = specs["nexus.queue"], specs["nexus.endpoint-state"]
    assert queue.partitions == 1 and queue.config == state.config == {"cleanup.policy": "compact",
                                                                      "min.insync.replicas": "2"}


def test_tenant_tables_and_the_default_table(tmp_path: Path) -> None:
    settings = _load(tmp_path, '[tenants."team-a"]\nweight = 2\nrequests_per_minute = 600\n'
                               'tokens_per_minute = 200000\nmax_concurrent = 32\n'
                               '[tenants."*"]\nmax_concurrent = 8\n')
    assert settings.tenant("team-a") == TenantSettings(2.0, 600, 200_000, 32)
    assert settings.tenant("someone") == settings.tenants[ANY_TENANT] == TenantSettings(max_concurrent=8)
    assert set(settings.tenants) == {"team-a", "*"}


def test_without_tenant_tables_every_tenant_has_weight_one_and_no_limits(tmp_path: Path) -> None:
    settings = _load(tmp_path, "")
    assert settings.tenants == {} and settings.tenant("anyone") == TenantSettings()
    assert TenantSettings() == TenantSettings(weight=1.0, requests_per_minute=0, tokens_per_minute=0, max_concurrent=0)
    assert _load(tmp_path, '[tenants."a"]\n').tenant("a") == TenantSettings()


def test_nexus_tenants_replaces_the_tables(tmp_path: Path) -> None:
    settings = _load(tmp_path, '[tenants."team-a"]\nweight = 5\n',
                     {"NEXUS_TENANTS": " team-b:weight=0.5, tokens_per_minute=100 ; *:max_concurrent=3 "})
    assert settings.tenants == {"team-b": TenantSettings(weight=0.5, tokens_per_minute=100),
                                "*": TenantSettings(max_concurrent=3)}
    assert _load(tmp_path, '[tenants."team-a"]\nweight = 5\n', {"NEXUS_TENANTS": " "}).tenant("team-a").weight == 5


@pytest.mark.parametrize("text, message", [
    ('[tenants."a"]\nweight = -1\n', '<file>: [tenants."a"] weight: must be a positive number'),
    ('[tenants."a"]\nweight = 0\n', '[tenants."a"] weight: must be a positive number'),
    ('[tenants."a"]\nweight = "heavy"\n', '[tenants."a"] weight: expected float'),
    ('[tenants."a"]\nrequests_per_minute = -5\n', '[tenants."a"] requests_per_minute: must be 0 (unlimited) or more'),
    ('[tenants."a"]\nmax_concurrent = 1.5\n', '[tenants."a"] max_concurrent: expected int'),
    ('[tenants."a"]\nwieght = 2\n', "[tenants.\"a\"]: unknown key 'wieght'; allowed: weight, requests_per_minute, "
                                    "tokens_per_minute, max_concurrent"),
    ('[tenants]\na = 3\n', '[tenants."a"]: must be a table'),
    ('tenants = 3\n', "[tenants] must be a table of tenant tables"),
    ('[tenants.""]\nweight = 1\n', "a tenant name must not be empty"),
])
def test_bad_tenant_settings_name_the_tenant_and_the_key(tmp_path: Path, text: str, message: str) -> None:
    assert message in _error(tmp_path, text)


@pytest.mark.parametrize("value, message", [
    ("team-a", "NEXUS_TENANTS entry 'team-a': expected name:key=value"),
    ("team-a:weight", "NEXUS_TENANTS 'team-a': 'weight' is not key=value"),
    ("team-a:weight=-2", "NEXUS_TENANTS 'team-a' weight: must be a positive number"),
    ("team-a:colour=red", "NEXUS_TENANTS 'team-a': unknown key 'colour'"),
])
def test_a_bad_nexus_tenants_is_named(tmp_path: Path, value: str, message: str) -> None:
    assert message in _error(tmp_path, "", {"NEXUS_TENANTS": value})
