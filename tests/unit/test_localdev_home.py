"""Where local development keeps the broker's jars and data, and the POM shipped as package data."""

from __future__ import annotations

import importlib.resources
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

import nexus.home
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
    assert nexus.home.worker_data_dir("nexus-worker", env) == Path("/srv/nexus/faust/nexus-worker")
    assert home.nexus_home is nexus.home.nexus_home  # one rule for the roles and the dev tooling
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
    lines: list[str] = []
    assert fetch_kafka(progress=lines.append) == libs
    assert lines == []  # a cached broker starts without a word about downloads


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
        f'echo "[INFO] Downloaded from central: {CENTRAL}/kafka_2.13/3.9.1/kafka_2.13-3.9.1.jar (6.5 MB at 3 MB/s)"\n'
        'printf "0123456789" > "$out/kafka_2.13-3.9.1.jar"\n'
    )
    fake_mvn.chmod(fake_mvn.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    lines: list[str] = []
    libs = fetch_kafka(tmp_path / "home" / "libs", progress=lines.append)
    assert seen.read_text(encoding="utf-8") == kafka_pom()
    assert sorted(p.name for p in libs.iterdir()) == [".fetch-complete", "kafka_2.13-3.9.1.jar"]
    assert sorted(p.name for p in libs.parent.iterdir()) == ["libs"]  # scratch dirs removed
    # What a first run shows: that a download starts and where to, then what it got.
    assert lines[0].startswith(f"nexus: fetching the Kafka {KAFKA_VERSION} broker jars")
    assert f"into {libs} (first run only)" in lines[0]
    assert lines[-1].startswith(f"nexus: Kafka {KAFKA_VERSION} jars ready in {libs}: 1 jars")
    assert "(1 files downloaded)" in lines[-1]


CENTRAL = "https://repo.maven.apache.org/maven2/org/apache/kafka"


def test_progress_lines_name_what_maven_downloaded_and_the_time_so_far() -> None:
    line = f"[INFO] Downloaded from central: {CENTRAL}/kafka-clients/3.9.1/kafka-clients-3.9.1.jar (10 MB at 2 MB/s)"
    assert broker.maven_download(line) == "kafka-clients-3.9.1.jar"
    assert broker.maven_download(f"[INFO] Downloading from central: {CENTRAL}/kafka-clients/3.9.1/x.pom") is None
    assert broker.maven_download("[INFO] BUILD SUCCESS") is None
    assert broker.fetch_progress_line(42.4, 17, "kafka-clients-3.9.1.jar") == (
        f"nexus: fetching Kafka {KAFKA_VERSION} jars: 42s, 17 files downloaded so far (last: kafka-clients-3.9.1.jar)"
    )
    assert "nothing downloaded yet" in broker.fetch_progress_line(10, 0, None)
    done = broker.fetch_done_line(Path("/h/kafka/3.9.1/libs"), 61.2, 80, 46_300_000, 0)
    assert done == (f"nexus: Kafka {KAFKA_VERSION} jars ready in /h/kafka/3.9.1/libs: 80 jars, 46 MB, "
                    "fetched in 61s (all from the local Maven repository ~/.m2)")


def test_the_readiness_timeout_starts_after_the_jars_are_fetched(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A first run's download may take minutes: the broker's start timeout counts from its launch."""
    clock = [1000.0]
    monkeypatch.setattr(broker, "time", SimpleNamespace(monotonic=lambda: clock[0]))  # broker's clock only

    def slow_fetch(libs_dir: Path | None = None) -> Path:
        clock[0] += 600  # ten minutes of downloading
        return tmp_path / "libs"

    class Launched:
        pid = 4242

        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def poll(self) -> None:
            return None

    deadlines: list[float] = []
    monkeypatch.setattr(broker, "fetch_kafka", slow_fetch)
    monkeypatch.setattr(broker, "_java_executable", lambda: "java")
    monkeypatch.setattr(broker.subprocess, "Popen", Launched)
    monkeypatch.setattr(LocalKafka, "_format", lambda self, java, classpath: None)
    monkeypatch.setattr(LocalKafka, "_wait_ready", lambda self, deadline, start: deadlines.append(deadline))
    monkeypatch.setattr(LocalKafka, "stop", lambda self, timeout=15: None)
    LocalKafka(port=broker.free_port(), data_dir=tmp_path / "data").start(timeout=60)
    assert deadlines == [1000.0 + 600 + 60]


def test_local_kafka_error_is_a_nexus_error_under_its_old_name_too() -> None:
    assert KafkaError is LocalKafkaError
    assert issubclass(LocalKafkaError, NexusError)
    with pytest.raises(LocalKafkaError, match="no TLS listener"):
        LocalKafka(port=19092, data_dir=Path("/nonexistent")).tls_bootstrap  # noqa: B018 (the property raises)
