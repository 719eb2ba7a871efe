"""Kafka with SASL/SCRAM and TLS, on a real broker: every role connects through the settings.

One broker for the module: a SASL_PLAINTEXT listener (SCRAM-SHA-256/512, PLAIN) and a
SASL_SSL listener whose certificate a throwaway CA signed, which also requires a client
certificate (mutual TLS). Both reach the same cluster, so a worker on one listener
answers requests produced on the other.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from nexus.kafka.clients import KafkaAccessError, client_options
from localdev.broker import LocalKafka, free_port
from nexus.settings import ConfigError, KafkaSettings, load_settings
from nexus.kafka.topics import ensure_topics
from producers.client import RequestProducer, SubmitError
from tests.eventually import eventually
from schemas import InferenceRequest, ModelContext
from tests.integration.support import REPO, Role, TopicReader, stack_env, start_gateway, wait_for_responses

USER = "nexus-svc"
# Unique, so finding it in any output means it leaked.
PASSWORD = f"pw-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    kafka = LocalKafka(
        port=free_port(), data_dir=tmp_path_factory.mktemp("kafka-sasl"),
        sasl_users={USER: PASSWORD}, tls_port=free_port(), tls_client_auth=True,
    )
    kafka.start()
    try:
        yield kafka
    finally:
        kafka.stop()


def scram(broker: LocalKafka, mechanism: str = "SCRAM-SHA-256", password: str = PASSWORD) -> KafkaSettings:
    """Settings for the SASL_PLAINTEXT listener."""
    return KafkaSettings(
        bootstrap=broker.bootstrap, security_protocol="SASL_PLAINTEXT",
        sasl_mechanism=mechanism, sasl_username=USER, sasl_password=password,
    )


def scram_tls(broker: LocalKafka, cafile: str | None = None, client_cert: bool = True) -> KafkaSettings:
    """Settings for the SASL_SSL listener, trusting the broker's CA unless told otherwise."""
    return KafkaSettings(
        bootstrap=broker.tls_bootstrap, security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512", sasl_username=USER, sasl_password=PASSWORD,
        ssl_cafile=str(broker.ca_file) if cafile is None else cafile,
        ssl_certfile=str(broker.client_certfile) if client_cert else "",
        ssl_keyfile=str(broker.client_keyfile) if client_cert else "",
    )


def role_env(kafka: KafkaSettings, simulator: str) -> dict[str, str]:
    """What a user exports to run a role against ``kafka``: the NEXUS_KAFKA_* variables."""
    security = {
        f"NEXUS_KAFKA_{key.upper()}": str(getattr(kafka, key))
        for key in ("security_protocol", "sasl_mechanism", "sasl_username", "sasl_password",
                    "ssl_cafile", "ssl_certfile", "ssl_keyfile")
        if getattr(kafka, key)
    }
    return stack_env(kafka.bootstrap, simulator, **security)


def _workers_reporting(reply: httpx.Response) -> int:
    return sum(e["live"]["workers_reporting"] for m in reply.json()["models"] for e in m["endpoints"])


def leaks(roles: list[Role]) -> list[str]:
    return [role.name for role in roles if PASSWORD in role.log_path.read_text(errors="replace")]


# --------------------------------------------------------------------------- settings


def test_security_settings_come_from_the_environment_and_the_password_is_never_shown(tmp_path: Path) -> None:
    settings = load_settings(environ={
        "NEXUS_CONFIG": str(_toml(tmp_path, "")),
        "NEXUS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "NEXUS_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "NEXUS_KAFKA_SASL_USERNAME": USER,
        "NEXUS_KAFKA_SASL_PASSWORD": PASSWORD,
        "NEXUS_KAFKA_SSL_CAFILE": str(_toml(tmp_path, "not read here", "ca.pem")),
    })
    assert (settings.kafka.security_protocol, settings.kafka.sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
    assert settings.kafka.sasl_password == PASSWORD
    assert PASSWORD not in repr(settings) and PASSWORD not in str(settings.kafka)
    assert "sasl_username='nexus-svc'" in repr(settings.kafka)

    # A wrong type is reported without echoing the value.
    path = _toml(tmp_path, "[kafka]\nsecurity_protocol = \"SASL_SSL\"\nsasl_password = 1234567\n")
    with pytest.raises(ConfigError, match="sasl_password: expected str") as info:
        load_settings(path, environ={})
    assert "1234567" not in str(info.value)


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"NEXUS_KAFKA_SECURITY_PROTOCOL": "SASL_TLS"},
         "security_protocol .*expected one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL, got 'SASL_TLS'"),
        ({"NEXUS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "NEXUS_KAFKA_SASL_PASSWORD": "x"},
         "sasl_username .*required with security_protocol = 'SASL_SSL'"),
        ({"NEXUS_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "NEXUS_KAFKA_SASL_USERNAME": "u"},
         "sasl_password .*NEXUS_KAFKA_SASL_PASSWORD.*required"),
        ({"NEXUS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "NEXUS_KAFKA_SASL_USERNAME": "u",
          "NEXUS_KAFKA_SASL_PASSWORD": "x", "NEXUS_KAFKA_SASL_MECHANISM": "GSSAPI"},
         "sasl_mechanism .*expected one of SCRAM-SHA-256, SCRAM-SHA-512, PLAIN, got 'GSSAPI'"),
        ({"NEXUS_KAFKA_SASL_USERNAME": "u", "NEXUS_KAFKA_SASL_PASSWORD": "x"},
         "SASL credentials are set but security_protocol is 'PLAINTEXT'"),
        ({"NEXUS_KAFKA_SECURITY_PROTOCOL": "SSL", "NEXUS_KAFKA_SSL_CAFILE": "/nonexistent/ca.pem"},
         "ssl_cafile .*file not found: /nonexistent/ca.pem"),
        ({"NEXUS_KAFKA_SSL_CAFILE": __file__}, "ssl_cafile .*security_protocol is 'PLAINTEXT'.*use SSL or SASL_SSL"),
        ({"NEXUS_KAFKA_SECURITY_PROTOCOL": "SSL", "NEXUS_KAFKA_SSL_KEYFILE": __file__},
         "ssl_keyfile .*needs ssl_certfile"),
    ],
)
def test_unusable_security_settings_stop_the_load_with_what_to_change(
    tmp_path: Path, environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_settings(_toml(tmp_path, ""), environ=environ)
    assert "'x'" not in str(info.value)  # the password "x" is never quoted


def test_a_ca_file_that_is_not_pem_is_a_configuration_error_naming_it() -> None:
    kafka = KafkaSettings(security_protocol="SSL", ssl_cafile=__file__)
    with pytest.raises(ConfigError, match=rf"cannot load the TLS files \(ssl_cafile = {__file__}\).*must be PEM"):
        client_options(kafka)


@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"])
def test_faust_gets_the_same_connection_options_as_every_other_client(protocol: str) -> None:
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    from streams.app import faust_credentials

    sasl = {"sasl_username": USER, "sasl_password": PASSWORD} if protocol.startswith("SASL_") else {}
    kafka = KafkaSettings(security_protocol=protocol, sasl_mechanism="SCRAM-SHA-512", **sasl)
    ours = client_options(kafka)
    del ours["bootstrap_servers"]
    faust_options = credentials_to_aiokafka_auth(faust_credentials(kafka))  # what Faust gives aiokafka
    faust_options = {k: v for k, v in faust_options.items() if v is not None}
    assert faust_options.keys() == ours.keys()
    for key, value in ours.items():
        assert faust_options[key] == value or type(faust_options[key]) is type(value), key


def _toml(tmp_path: Path, text: str, name: str = "nexus.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- the roles, end to end


def test_gateway_worker_and_bridge_work_over_scram_and_tls_and_never_log_the_password(
    broker: LocalKafka, simulator: str, logs_dir: Path
) -> None:
    tls = scram_tls(broker)
    env = role_env(tls, simulator)
    worker = Role("worker", ["worker"], env, logs_dir).start()
    bridge_port = free_port()
    bridge = Role("bridge", ["bridge"], {**env, "NEXUS_BRIDGE_HOST": "127.0.0.1",
                                         "NEXUS_BRIDGE_PORT": str(bridge_port)}, logs_dir).start()
    roles = [worker, bridge]
    try:
        gateway = start_gateway(env, logs_dir)
        roles.append(gateway)

        async def answered() -> None:
            async with TopicReader(tls, tls.responses_topic) as responses:
                async with httpx.AsyncClient(timeout=10) as http:
                    reply = await http.post(f"{gateway.url}/infer", json={
                        "id": "sasl-1", "model_id": "llama3.1", "input": "over SCRAM and TLS",
                        "context": {"session_id": "s-sasl", "metadata": {}},
                    })
                    assert reply.status_code == 202, reply.text
                    health = (await http.get(f"{gateway.url}/health")).json()
                assert health["checks"]["kafka"]["status"] == "ok", health
                answers = await wait_for_responses(responses, {"sasl-1"}, timeout=90)
            [response] = answers.by_id["sasl-1"]
            assert response.status == "ok"
            assert response.output == "[simulated llama3.1] You said: over SCRAM and TLS"

            async with httpx.AsyncClient(timeout=60) as http:
                # Ollama's API: answered through the gateway's reply reader.
                generated = await http.post(f"{gateway.url}/api/generate",
                                            json={"model": "llama3.1", "prompt": "drop-in", "stream": False})
                assert generated.status_code == 200, generated.text
                assert generated.json()["response"] == "[simulated llama3.1] You said: drop-in"
                # GET /models: the worker's endpoint state, read back from its compacted topic.
                async def reporting() -> bool:
                    return _workers_reporting(await http.get(f"{gateway.url}/models"))

                await eventually(reporting, "worker state on GET /models", timeout=30, interval=0.2)

            # The producer API on the other listener (SASL_PLAINTEXT, SCRAM-SHA-256): same cluster.
            async with RequestProducer(scram(broker)) as producer:
                request = InferenceRequest(id="sasl-2", model_id="mistral", input="plain SASL",
                                           context=ModelContext("s-sasl", {}))
                answer = await producer.submit_and_wait(request, timeout_s=60)
            assert answer.output == "[simulated mistral] You said: plain SASL"

        asyncio.run(answered())
        bridge.wait_http(f"http://127.0.0.1:{bridge_port}/", timeout=60)  # listens once its readers started

        replay = subprocess.run(
            [sys.executable, "-m", "nexus", "replay", "--request-id", "sasl-1", "--format", "jsonl",
             "--no-progress"],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
        )
        assert replay.returncode == 0, replay.stderr
        assert '"sasl-1"' in replay.stdout
        assert PASSWORD not in replay.stdout + replay.stderr
    finally:
        for role in reversed(roles):
            role.stop()
    assert leaks(roles) == []
    assert "could not measure consumer lag" not in worker.log_path.read_text()  # its admin client too


def test_a_wrong_password_stops_every_role_at_once_saying_authentication_failed(
    broker: LocalKafka, simulator: str, logs_dir: Path
) -> None:
    wrong = f"wrong-{uuid.uuid4().hex}"
    env = role_env(scram(broker, password=wrong), simulator)
    roles = [Role(name, [name], env, logs_dir) for name in ("gateway", "worker", "bridge")]
    roles.append(Role("replay", ["replay", "--no-progress"], env, logs_dir))
    started = time.monotonic()
    for role in roles:
        role.start()
    try:
        codes = {role.name: role.proc.wait(timeout=60) for role in roles if role.proc is not None}
    finally:
        for role in roles:
            role.stop()
    elapsed = time.monotonic() - started
    print(f"4 roles started together with a wrong password all exited after {elapsed:.1f}s")
    # Replay's own code for "Kafka unreachable or refused" is 3; the long-running roles treat
    # a refusal as the configuration error it is.
    assert codes == {"gateway": 2, "worker": 2, "bridge": 2, "replay": 3}
    for role in roles:
        log = role.log_path.read_text()
        assert f"rejected user '{USER}' with SCRAM-SHA-256: authentication failed" in log, log
        assert "NEXUS_KAFKA_SASL_PASSWORD" in log
        assert wrong not in log and PASSWORD not in log
    assert elapsed < 30, f"took {elapsed:.1f}s to give up"


# --------------------------------------------------------------------------- TLS and mechanisms


async def test_a_client_with_the_ca_produces_and_consumes_over_tls_one_without_is_told_what_to_set(
    broker: LocalKafka,
) -> None:
    tls = scram_tls(broker)
    topic = f"tls-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(**client_options(tls))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(**client_options(tls), acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"over TLS")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(**client_options(tls), group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        record = await asyncio.wait_for(consumer.getone(), 30)
    finally:
        await consumer.stop()
    assert record.value == b"over TLS"

    untrusted = scram_tls(broker, cafile="")  # the system's CAs do not know this broker's
    with pytest.raises(KafkaAccessError, match=r"certificate is not trusted .*set kafka.ssl_cafile"):
        await asyncio.wait_for(ensure_topics(untrusted), 10)
    with pytest.raises(SubmitError, match="certificate is not trusted"):
        await asyncio.wait_for(RequestProducer(untrusted).start(), 10)

    # The listener requires a client certificate: without one, TLS itself is refused.
    anonymous = scram_tls(broker, client_cert=False)
    with pytest.raises(KafkaAccessError, match=r"ended TLS with .*set kafka.ssl_certfile and kafka.ssl_keyfile"):
        await asyncio.wait_for(ensure_topics(anonymous), 10)


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "PLAIN"])
async def test_each_mechanism_authenticates(broker: LocalKafka, mechanism: str) -> None:
    async with RequestProducer(scram(broker, mechanism)) as producer:
        await producer.ping(10)


async def test_the_producer_api_with_a_wrong_password_says_authentication_failed(broker: LocalKafka) -> None:
    wrong = dataclasses.replace(scram(broker), sasl_password="not-it")
    with pytest.raises(SubmitError, match="authentication failed") as info:
        await asyncio.wait_for(RequestProducer(wrong).start(), 10)
    assert "not-it" not in str(info.value)


def test_nexus_up_refuses_security_settings_its_plaintext_broker_cannot_honour(simulator: str) -> None:
    env = role_env(KafkaSettings(security_protocol="SASL_SSL", sasl_username=USER, sasl_password=PASSWORD),
                   simulator)
    up = subprocess.run([sys.executable, "-m", "nexus", "up"], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=60, check=False)
    assert up.returncode == 2
    assert "runs a PLAINTEXT broker, but kafka.security_protocol is 'SASL_SSL': pass --bootstrap" in up.stderr
