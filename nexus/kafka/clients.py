"""How every Nexus Kafka client connects: one place turns :class:`KafkaSettings` into options.

Why one place: a client built with only a bootstrap address silently ignores the
cluster's SASL and TLS settings, and then fails with "Unable to bootstrap". Every
``AIOKafkaProducer``/``AIOKafkaConsumer``/``AIOKafkaAdminClient`` is built with
``**client_options(kafka)``; the worker hands the same context and credentials to Faust.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from typing import Any

from aiokafka.conn import create_conn
from aiokafka.errors import SaslAuthenticationFailed, UnsupportedSaslMechanismError
from aiokafka.helpers import create_ssl_context

from nexus.settings import ConfigError, KafkaSettings


class KafkaAccessError(ConfigError):
    """Kafka refused Nexus's credentials or the TLS handshake failed: retrying will not help.

    A :class:`ConfigError` because the fix is in the settings; the message names which one.
    """


def uses_tls(kafka: KafkaSettings) -> bool:
    return kafka.security_protocol in ("SSL", "SASL_SSL")


def ssl_context(kafka: KafkaSettings) -> ssl.SSLContext | None:
    """The TLS context of ``kafka``'s brokers, or None when the protocol does not use TLS.

    Hostnames are verified: the brokers' certificates must name the advertised hosts.
    """
    if not uses_tls(kafka):
        return None
    try:
        return create_ssl_context(
            cafile=kafka.ssl_cafile or None,
            certfile=kafka.ssl_certfile or None,
            keyfile=kafka.ssl_keyfile or None,
        )
    except (ssl.SSLError, OSError) as exc:
        files = ", ".join(
            f"{key} = {path}"
            for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile")
            if (path := getattr(kafka, key))
        )
        raise ConfigError(f"[kafka] cannot load the TLS files ({files}): {exc}; they must be PEM") from None


def client_options(kafka: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments for any aiokafka client: the brokers, and how to authenticate to them."""
    options: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap,
        "security_protocol": kafka.security_protocol,
    }
    context = ssl_context(kafka)
    if context is not None:
        options["ssl_context"] = context
    if kafka.security_protocol.startswith("SASL_"):
        options.update(
            sasl_mechanism=kafka.sasl_mechanism,
            sasl_plain_username=kafka.sasl_username,
            sasl_plain_password=kafka.sasl_password,
        )
    return options


async def refusal(kafka: KafkaSettings, timeout_s: float = 10.0) -> KafkaAccessError | None:
    """Why the first bootstrap broker refuses Nexus, if it is for a reason retrying cannot fix.

    aiokafka only logs the cause of a failed bootstrap and raises "Unable to bootstrap";
    this opens one connection the way the clients do, to name it: wrong credentials,
    an unsupported mechanism or an untrusted certificate. None when the broker is just
    unreachable (or lets us in), which is worth retrying.
    """
    host, _, port = kafka.bootstrap.split(",")[0].strip().rpartition(":")
    options = client_options(kafka)
    del options["bootstrap_servers"]
    where = f"Kafka at {host}:{port} ({kafka.security_protocol})"
    try:
        conn = await asyncio.wait_for(create_conn(host, int(port), **options), timeout_s)
    except SaslAuthenticationFailed as exc:
        return KafkaAccessError(
            f"{where} rejected user {kafka.sasl_username!r} with {kafka.sasl_mechanism}: authentication "
            f"failed ({exc}); check kafka.sasl_username, NEXUS_KAFKA_SASL_PASSWORD and kafka.sasl_mechanism"
        )
    except UnsupportedSaslMechanismError as exc:
        return KafkaAccessError(
            f"{where}: {exc}; set kafka.sasl_mechanism to one it enables, or check security_protocol "
            "matches the listener"
        )
    except ssl.SSLCertVerificationError as exc:
        if "mismatch" in str(exc.verify_message).lower():  # "Hostname mismatch", "IP address mismatch"
            return KafkaAccessError(
                f"{where}: the broker's TLS certificate does not name {host!r} ({exc.verify_message}); "
                "connect with (and have the brokers advertise) a name or address their certificates list"
            )
        return KafkaAccessError(
            f"{where}: the broker's TLS certificate is not trusted ({exc.verify_message}); set "
            "kafka.ssl_cafile to the CA that signed it"
        )
    except ssl.SSLError as exc:
        return KafkaAccessError(
            f"{where}: TLS handshake failed ({exc}); check that the listener speaks TLS and that "
            "security_protocol matches it"
        )
    except Exception:  # unreachable, or a cause retrying may fix: the caller's own error stands
        context = options.get("ssl_context")
        alert = await _tls_alert(host, int(port), context, timeout_s) if context is not None else None
        if alert is None:
            return None
        return KafkaAccessError(
            f"{where}: the broker ended TLS with {alert.reason or alert}; if it requires client "
            "certificates (mutual TLS), set kafka.ssl_certfile and kafka.ssl_keyfile to one its CA signed"
        )
    conn.close()
    return None


async def _tls_alert(host: str, port: int, context: ssl.SSLContext, timeout_s: float) -> ssl.SSLError | None:
    """The TLS alert a broker answers a first request with, if any.

    A broker that requires a client certificate completes the (TLS 1.3) handshake and only
    then sends "certificate required"; aiokafka reports that as "connection closed".
    """
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=context), timeout_s)
    except ssl.SSLError as exc:
        return exc
    except Exception:
        return None
    try:
        # ApiVersions v0, correlation id 1, null client id: any request will do.
        writer.write(struct.pack(">ihhih", 10, 18, 0, 1, -1))
        await asyncio.wait_for(reader.read(4), timeout_s)
    except ssl.SSLError as exc:
        return exc
    except Exception:
        return None
    finally:
        writer.close()
    return None
