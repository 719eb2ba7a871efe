"""Where local development keeps the broker's jars and data, and the POM shipped as package data."""

from __future__ import annotations

import importlib.resources
import os
import stat
from pathlib import Path

import pytest

from localdev import broker, home
from localdev.broker import KAFKA_VERSION, KafkaError, LocalKafka, LocalKafkaError, fetch_kafka, kafka_pom
from nexus.errors import NexusError


def test_nexus_home_prefers_nexus_home_then_xdg_then_user_cache() -> None:
    env = {"NEXUS_HOME": "/srv/nexus", "XDG_CACHE_HOME": "/xdg", "HOME": "/home/dev"}
    assert home.nexus_home(env) == Path("/srv/nexus")
    del env["NEXUS_HOME"]
    assert home.nexus_home(env) == Path("/xdg/nexus")
    del env["XDG_CACHE_HOME"]
    assert home.nexus_home(env) == Path("/home/dev/.cache/nexus")


def test_empty_values_count_as_unset_and_a_relative_xdg_dir_is_ignored() -> None:
    env = {"NEXUS_HOME": "", "XDG_CACHE_HOME": "relative/cache", "HOME": "/home/dev"}
    assert home.nexus_home(env) == Path("/home/dev/.cache/nexus")
    assert home.nexus_home({"NEXUS_HOME": "~/nx", "HOME": "/home/dev"}) == Path("~/nx").expanduser()


def test_layout_under_the_home() -> None:
    env = {"NEXUS_HOME": "/srv/nexus"}
    assert home.kafka_libs_dir("3.9.1", env) == Path("/srv/nexus/kafka/3.9.1/libs")
    assert home.kafka_data_dir(9092, env) == Path("/srv/nexus/kafka-data/9092")


def test_broker_defaults_follow_nexus_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NEXUS_HOME", str(tmp_path))
    assert broker.default_libs_dir() == tmp_path / "kafka" / KAFKA_VERSION / "libs"
    assert broker.default_data_dir(19092) == tmp_path / "kafka-data" / "19092"
    assert LocalKafka(port=19092).data_dir == tmp_path / "kafka-data" / "19092"


def test_fetch_reuses_a_complete_cache_without_maven(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NEXUS_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", "")  # mvn would not be found: nothing may be downloaded
    libs = tmp_path / "kafka" / KAFKA_VERSION / "libs"
    libs.mkdir(parents=True)
    (libs / "kafka_2.13-3.9.1.jar").write_bytes(b"")
    (libs / ".fetch-complete").write_text(f"{KAFKA_VERSION}\nkafka_2.13-3.9.1.jar\n")
    assert fetch_kafka() == libs


def test_fetch_without_maven_names_the_cache_under_nexus_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("NEXUS_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", "")
    with pytest.raises(LocalKafkaError, match=str(tmp_path / "kafka" / KAFKA_VERSION / "libs")):
        fetch_kafka()
    assert not (tmp_path / "kafka").exists()  # gave up before creating anything


def test_pom_is_package_data_pinned_to_the_broker_version() -> None:
    resource = importlib.resources.files("localdev").joinpath("kafka_pom.xml")
    assert resource.is_file()
    assert kafka_pom() == resource.read_text(encoding="utf-8")
    assert f"<kafka.version>{KAFKA_VERSION}</kafka.version>" in kafka_pom()


def test_fetch_hands_maven_a_copy_of_the_pom(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A fake ``mvn`` records the POM it was given and 'downloads' one jar: the package dir may be read-only."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    seen = tmp_path / "seen-pom.xml"
    fake_mvn = bin_dir / "mvn"
    fake_mvn.write_text(
        "#!/bin/sh\n"
        'pom=""; out=""\n'
        'while [ $# -gt 0 ]; do\n'
        '  case "$1" in -f) pom="$2"; shift;; -DoutputDirectory=*) out="${1#-DoutputDirectory=}";; esac\n'
        "  shift\n"
        "done\n"
        f'cp "$pom" "{seen}"\n'
        ': > "$out/kafka_2.13-3.9.1.jar"\n'
    )
    fake_mvn.chmod(fake_mvn.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    libs = fetch_kafka(tmp_path / "home" / "libs")
    assert seen.read_text(encoding="utf-8") == kafka_pom()
    assert sorted(p.name for p in libs.iterdir()) == [".fetch-complete", "kafka_2.13-3.9.1.jar"]
    assert sorted(p.name for p in libs.parent.iterdir()) == ["libs"]  # scratch dirs removed


def test_local_kafka_error_is_a_nexus_error_under_its_old_name_too() -> None:
    assert KafkaError is LocalKafkaError
    assert issubclass(LocalKafkaError, NexusError)
    with pytest.raises(LocalKafkaError, match="no TLS listener"):
        LocalKafka(port=19092, data_dir=Path("/nonexistent")).tls_bootstrap
