"""The container files: docker-compose.yml is valid and wires the stack as documented.

There is no Docker engine where these tests run; a compose client (``docker
compose`` v2 or the Python ``docker-compose`` v1) validates the file offline when
one is installed, and the structure is checked with PyYAML when it is importable.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def _compose_cli() -> list[str] | None:
    """The compose client to validate with: ``docker compose`` first, then ``docker-compose``."""
    candidates: list[list[str]] = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for cli in candidates:
        try:
            probe = subprocess.run(
                [*cli, "version"], capture_output=True, text=True, timeout=30, cwd=ROOT
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return cli
    return None


def test_compose_config_is_valid() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip(
            "no compose client is installed (neither `docker compose` nor `docker-compose`); "
            "e.g. `apt-get install docker-compose` provides one that validates offline"
        )
    result = subprocess.run(
        [*cli, "-f", str(COMPOSE_FILE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, (
        f"`{' '.join(cli)} config -q` rejected docker-compose.yml:\n{result.stdout}{result.stderr}"
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    yaml = pytest.importorskip(
        "yaml", reason="PyYAML is not installed: cannot parse docker-compose.yml"
    )
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict), "docker-compose.yml must be a mapping"
    return data


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict, whether written as a mapping or a list."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def _interpolated(value: str) -> str:
    """``${VAR:-default}`` and ``${VAR-default}`` as compose expands them with VAR unset."""
    return re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", value)


def _listeners(value: str) -> dict[str, tuple[str, int]]:
    """Kafka's ``NAME://host:port,...`` as {NAME: (host, port)}."""
    out = {}
    for item in _interpolated(value).split(","):
        name, _, address = item.strip().partition("://")
        host, _, port = address.rpartition(":")
        out[name] = (host, int(port))
    return out


def _healthcheck_url(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    found = re.findall(r"https?://[^'\" ]+", " ".join(test) if isinstance(test, list) else test)
    assert len(found) == 1, f"expected one URL in the healthcheck, got {test!r}"
    return found[0]


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    return command.split() if isinstance(command, str) else list(command or [])


def _published(service: dict[str, Any]) -> dict[int, int]:
    """Published host port -> container port, from short ("3000:3000") or long syntax."""
    out: dict[int, int] = {}
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            if port.get("published") is not None:
                out[int(port["published"])] = int(port["target"])
            continue
        spec = str(port).split("/", 1)[0]
        parts = spec.split(":")
        if len(parts) >= 2:  # [ip:]host:container
            out[int(parts[-2])] = int(parts[-1])
    return out


def test_services_exist(compose: dict[str, Any]) -> None:
    services = compose.get("services") or {}
    for name in ("kafka", "ollama", "worker", "gateway", "bridge"):
        assert name in services, f"service {name!r} missing from docker-compose.yml"


@pytest.mark.parametrize("role", ["worker", "gateway", "bridge"])
def test_roles_build_this_repo_and_run_their_command(compose: dict[str, Any], role: str) -> None:
    service = compose["services"][role]
    build = service.get("build")
    context = build.get("context") if isinstance(build, dict) else build
    assert context in (".", "./"), f"{role} must be built from this repo (build: .), got {build!r}"
    assert _command(service) == [role], f"{role} must run `nexus {role}`, got {service.get('command')!r}"


@pytest.mark.parametrize("role", ["worker", "gateway", "bridge"])
def test_roles_reach_kafka_and_ollama_by_service_name(compose: dict[str, Any], role: str) -> None:
    service = compose["services"][role]
    env = _environment(service)
    bootstrap = env.get("NEXUS_KAFKA_BOOTSTRAP", "")
    hosts = [server.strip().split(":")[0] for server in bootstrap.split(",") if server.strip()]
    assert hosts and all(h == "kafka" for h in hosts), (
        f"{role}: NEXUS_KAFKA_BOOTSTRAP must point at the kafka service, got {bootstrap!r}"
    )
    assert env.get("OLLAMA_HOST", "").rstrip("/") == "http://ollama:11434"
    depends = service.get("depends_on") or {}
    assert "kafka" in depends, f"{role} must depend on kafka"
    if isinstance(depends, dict):
        assert depends["kafka"].get("condition") == "service_healthy"


def test_gateway_publishes_3000(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    assert _published(gateway).get(3000) == 3000, f"gateway must publish 3000:3000, got {gateway.get('ports')!r}"


def test_bridge_publishes_8765_and_is_health_checked(compose: dict[str, Any]) -> None:
    bridge = compose["services"]["bridge"]
    assert _published(bridge).get(8765) == 8765, f"bridge must publish 8765:8765, got {bridge.get('ports')!r}"
    assert _environment(bridge).get("NEXUS_BRIDGE_PORT") == "8765"
    assert "8765/health" in str(bridge["healthcheck"]["test"])


def test_worker_publishes_metrics_port(compose: dict[str, Any]) -> None:
    assert _published(compose["services"]["worker"]).get(6066) == 6066


def test_kafka_is_single_node_kraft_advertising_its_service_name(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    env = _environment(kafka)
    assert str(kafka["image"]).startswith("apache/kafka:")
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    # The roles' listener; the host's is checked below.
    assert _listeners(env["KAFKA_ADVERTISED_LISTENERS"])["PLAINTEXT"] == ("kafka", 9092)
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] == "PLAINTEXT"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    # Nexus creates its topics with the configured partitions; auto-creation would hide mistakes.
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"].lower() == "false"
    assert "kafka-broker-api-versions.sh" in str(kafka["healthcheck"]["test"])
    assert any(str(v).endswith(":/var/lib/kafka/data") for v in kafka.get("volumes", []))


def test_kafka_has_a_listener_the_host_can_reach(compose: dict[str, Any]) -> None:
    """``nexus submit/replay --bootstrap localhost:9094`` from the host: a listener published on the
    host's port and advertised as an address the host resolves (not ``kafka``, which only the
    compose network knows)."""
    kafka = compose["services"]["kafka"]
    env = _environment(kafka)
    listeners = _listeners(env["KAFKA_LISTENERS"])
    advertised = _listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(advertised) <= set(listeners) <= set(protocols), (listeners, advertised, protocols)
    assert "EXTERNAL" in advertised, "no EXTERNAL listener for clients on the host"
    host, port = advertised["EXTERNAL"]
    assert host == "localhost" and port == 9094
    assert "${KAFKA_EXTERNAL_HOST" in env["KAFKA_ADVERTISED_LISTENERS"], "the advertised host must be settable"
    assert _published(kafka).get(9094) == listeners["EXTERNAL"][1], (
        f"the host's port 9094 must reach the EXTERNAL listener, got {kafka.get('ports')!r}")
    assert protocols["EXTERNAL"] == "PLAINTEXT"
    # Kafka refuses two listeners on one port; the controller's is not advertised.
    ports = [port for _, port in listeners.values()]
    assert len(ports) == len(set(ports)), listeners
    assert "CONTROLLER" not in advertised


def test_the_documented_host_commands_use_the_external_listener() -> None:
    text = COMPOSE_FILE.read_text()
    assert "nexus submit --bootstrap localhost:9094" in text and "nexus replay --bootstrap localhost:9094" in text


def test_third_party_images_are_pinned_to_exact_versions(compose: dict[str, Any]) -> None:
    """An exact tag (``3.9.1``, ``v2.53.1``), never ``latest`` or none: a re-pull gets the same image."""
    for name, service in compose["services"].items():
        if "build" in service:
            assert service["image"] == "nexus:local", name  # this repo, built from the Dockerfile
            continue
        image = str(service["image"])
        repository, _, tag = image.rpartition(":")
        assert repository and re.fullmatch(r"v?\d+\.\d+\.\d+", tag), (
            f"{name}: image {image!r} must name an exact version tag")


@pytest.mark.parametrize("role, port", [("worker", 6066), ("gateway", 3000), ("bridge", 8765)])
def test_healthchecks_ask_health_which_needs_no_api_key(compose: dict[str, Any], role: str, port: int) -> None:
    """With API keys on, /metrics and /models answer 401 without a key; /health stays open
    (docs/security.md; run against keyed roles in test_api_keys.py)."""
    from producers.gateway.access import OPEN_PATHS

    assert _healthcheck_url(compose["services"][role]) == f"http://localhost:{port}/health"
    assert "/health" in OPEN_PATHS


def test_monitoring_is_opt_in_and_ships_the_rules_and_the_dashboard(compose: dict[str, Any]) -> None:
    services = compose["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert prometheus.get("profiles") == ["monitoring"] and grafana.get("profiles") == ["monitoring"]
    mounts = {str(v).split(":")[0]: str(v).split(":")[1] for s in (prometheus, grafana) for v in s["volumes"]
              if str(v).startswith("./")}
    for source in mounts:
        assert (ROOT / source).exists(), f"{source} is mounted but missing"
    assert mounts["./deploy/prometheus/alerts.yml"] == "/etc/prometheus/alerts.yml"
    assert mounts["./deploy/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert mounts["./deploy/grafana/nexus-dashboard.json"].startswith("/etc/grafana/dashboards/")
    yaml = pytest.importorskip("yaml")
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/nexus.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
    # Prometheus scrapes each role at the port its service listens on.
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    scraped: set[str] = set()
    for job in config["scrape_configs"]:
        scraped.update(target for static in job.get("static_configs", []) for target in static["targets"])
        scraped.update(f"{name}:{dns['port']}" for dns in job.get("dns_sd_configs", []) for name in dns["names"])
    assert scraped == {"gateway:3000", "worker:6066", "bridge:8765"}


def test_no_two_services_publish_the_same_host_port(compose: dict[str, Any]) -> None:
    published = [port for service in compose["services"].values() for port in _published(service)]
    assert len(published) == len(set(published)), sorted(published)


def test_ollama_pull_is_opt_in_and_targets_the_ollama_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert str(services["ollama"]["image"]).startswith("ollama/ollama")
    pull = services.get("ollama-pull")
    assert pull is not None, "the documented `docker compose run --rm ollama-pull` needs the service"
    assert pull.get("profiles"), "ollama-pull must not start with a plain `docker compose up`"
    assert _environment(pull).get("OLLAMA_HOST") == "ollama:11434"
    assert "ollama pull" in " ".join(_command(pull) + list(pull.get("entrypoint") or []))


def test_dockerfile_runs_nexus_as_non_root() -> None:
    text = DOCKERFILE.read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert re.fullmatch(r"FROM python:3\.11\.\d+-slim-\w+", lines[0]), f"the base image must be an exact version: {lines[0]}"
    assert 'ENTRYPOINT ["nexus"]' in lines
    assert 'CMD ["gateway"]' in lines
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    exposed = {port for line in lines if line.startswith("EXPOSE ") for port in line.split()[1:]}
    assert {"3000", "6066", "8765"} <= exposed


def test_image_installs_the_tested_dependency_versions() -> None:
    """The image's dependencies are the constraints file's exact versions, as CI's are."""
    text = DOCKERFILE.read_text()
    assert re.search(r"^COPY pyproject\.toml constraints\.txt \./$", text, re.M), "constraints.txt must be copied"
    assert "-c constraints.txt" in text
    pins = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[^=\s]+", line) for line in pins), pins


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    patterns = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (".git", ".venv", ".cache", "tests"):
        assert required in patterns, f".dockerignore must exclude {required}"
    assert "**/__pycache__" in patterns or "__pycache__" in patterns


def test_image_install_ships_the_avro_schemas() -> None:
    """The image installs the project non-editable, so the .avsc files must be package data.

    ``Codec.from_directory()`` reads ``schemas/avro`` next to the installed module;
    a pattern that misses them yields an empty codec (the Dockerfile's build check
    then fails). setuptools expands package-data patterns like ``Path.glob``.
    """
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject.get("tool", {}).get("setuptools", {}).get("package-data", {}).get("schemas", [])
    package = ROOT / "schemas"
    shipped = {path for pattern in patterns for path in package.glob(pattern)}
    schemas = sorted((package / "avro").glob("*.avsc"))
    assert schemas, "no schemas found under schemas/avro"
    missing = [str(path.relative_to(package)) for path in schemas if path not in shipped]
    assert not missing, (
        f"pyproject.toml [tool.setuptools.package-data] schemas = {patterns!r} does not ship "
        f"{missing}; use \"avro/*.avsc\""
    )


@pytest.mark.parametrize("package, data", [("producers.gateway", "static"), ("localdev", "kafka_pom.xml")])
def test_image_install_ships_the_package_data(package: str, data: str) -> None:
    """An installed package finds its files: the page's static files, the broker's POM (package data)."""
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject.get("tool", {}).get("setuptools", {}).get("package-data", {}).get(package, [])
    folder = ROOT / package.replace(".", "/")
    shipped = {path for pattern in patterns for path in folder.glob(pattern)}
    target = folder / data
    files = sorted(p for p in target.iterdir() if p.is_file()) if target.is_dir() else [target]
    assert files and all(f.is_file() for f in files), f"no files at {target}"
    missing = [str(path.relative_to(folder)) for path in files if path not in shipped]
    assert not missing, f"pyproject.toml package-data {package} = {patterns!r} does not ship {missing}"
