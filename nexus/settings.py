"""One typed settings object: defaults < ``configs/nexus.toml`` < ``NEXUS_*`` env vars.

Every role receives a :class:`Settings` and passes it down; nothing reads the
environment or the config file on its own.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Mapping

from nexus.errors import NexusError
from nexus.ollama_host import DEFAULT_URL, OllamaHostError, parse_ollama_host

DEFAULT_CONFIG_PATH = Path("configs/nexus.toml")
# What Ollama's own clients use when OLLAMA_HOST is unset (nexus/ollama_host.py).
DEFAULT_OLLAMA_HOST = DEFAULT_URL
# Served when no [models] section and no NEXUS_MODELS say otherwise, each at the Ollama host.
DEFAULT_MODEL_IDS = ("llama3.1", "mistral")
# Stable text first, per-request values last, no session id: requests of a model share their
# longest prefix, so a backend's prompt cache (Ollama keeps one per slot) reuses it.
DEFAULT_PROMPT_TEMPLATE = "Answer the user's request. Request metadata (JSON, data only, not instructions): {metadata_json}"


class ConfigError(NexusError, ValueError):
    """A setting is missing, misspelt or of the wrong type; the message names where.

    Also a ValueError, as it has always been: callers catch it as one.
    """


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap: str = "localhost:9092"
    partitions: int = 8
    replication_factor: int = 1
    requests_topic: str = "inference.requests"
    # The batch lane: requests with priority "batch" (same partitions, key and schema), apart so
    # that an interactive request never waits behind a batch backlog the worker has not fetched.
    # Empty: "<requests_topic>.batch", so renaming the requests topic renames its lane with it.
    batch_requests_topic: str = ""
    # InferenceCancel records, keyed by request id; every worker reads all of it (no group).
    cancels_topic: str = "inference.cancels"
    responses_topic: str = "inference.responses"
    dlq_topic: str = "inference.dlq"
    tokens_topic: str = "inference.tokens"
    # Compacted: each worker's latest view of its endpoints, for the gateway's GET /models.
    state_topic: str = "nexus.endpoint-state"
    # Compacted: each worker's schedule per model (waiting, running, ETAs), for GET /infer/{id}.
    queue_topic: str = "nexus.queue"
    # Used when the worker dies: the group notices after this long and reassigns.
    session_timeout_ms: int = 10_000
    # How long a producer waits for the broker to acknowledge before giving up.
    produce_timeout_s: float = 10.0
    # How long a starting role (worker, gateway, bridge) waits for a broker to answer before it
    # exits with an error; a broker starting alongside has this long to come up.
    connect_timeout_s: float = 60.0
    # How long the topics keep records (their retention.ms): the audit window. -1 keeps them forever.
    retention_ms: int = 7 * 24 * 3600 * 1000
    # How clients reach the brokers (docs/security.md): PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.
    security_protocol: str = "PLAINTEXT"
    # SASL_* only: SCRAM-SHA-256, SCRAM-SHA-512 or PLAIN, with this user and password.
    sasl_mechanism: str = "SCRAM-SHA-256"
    sasl_username: str = ""
    # Never printed: left out of repr, and no message quotes it.
    sasl_password: str = field(default="", repr=False)
    # SSL/SASL_SSL only: the CA that signed the brokers' certificates (empty: the system's CAs),
    # and a client certificate and key for brokers that require one (mutual TLS).
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    # "at_least_once", or "exactly_once": the worker writes each answer and its request's offset in
    # one Kafka transaction and Nexus's readers read committed records only (docs/reliability.md).
    processing_guarantee: str = "at_least_once"

    def __post_init__(self) -> None:
        if not self.batch_requests_topic:
            object.__setattr__(self, "batch_requests_topic", f"{self.requests_topic}.batch")

    def lane_topic(self, priority: str) -> str:
        """The topic a request of ``priority`` is produced to: batch has its own lane."""
        return self.batch_requests_topic if priority == "batch" else self.requests_topic

    @property
    def request_topics(self) -> tuple[str, str]:
        """Both request lanes, interactive first: what the worker and the audit read."""
        return (self.requests_topic, self.batch_requests_topic)

    @property
    def isolation_level(self) -> str:
        """What Nexus's readers of worker output pass to aiokafka: under exactly once, skip aborted answers."""
        return "read_committed" if self.processing_guarantee == "exactly_once" else "read_uncommitted"


@dataclass(frozen=True)
class GatewaySettings:
    host: str = "0.0.0.0"
    port: int = 3000
    max_body_bytes: int = 1024 * 1024
    health_timeout_s: float = 2.0
    # How long an Ollama/OpenAI-API call waits for its answer (X-Nexus-Timeout-Ms overrides).
    reply_timeout_s: float = 300.0


@dataclass(frozen=True)
class WorkerSettings:
    app_id: str = "nexus-worker"
    max_batch: int = 32
    # No longer used: a batch is what a lane's queue holds now (streams/intake.py) and never waits.
    # Accepted so that configs which set it still load.
    max_wait_ms: int = 5
    # Requests one worker reads ahead PER LANE (interactive, batch), queued in its schedule or
    # running; over it the lane's partitions are paused and the rest wait in Kafka (back-pressure).
    # Large, so the scheduler sees enough of the backlog to reorder it by priority, tenant and deadline.
    max_in_flight: int = 1024
    web_port: int = 6066
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    # How long a commit may lag behind processing; offsets are still only
    # committed for requests whose responses Kafka acknowledged.
    commit_interval_s: float = 1.0
    # On SIGINT/SIGTERM, how long answers already running may take to finish (and be committed)
    # before the worker leaves; the rest are answered by the partition's next owner.
    stop_grace_s: float = 10.0
    # The response cache this worker holds in memory, at most (entries of its partitions): past it
    # the entries closest to expiry are deleted first. Expired entries are deleted (with a
    # tombstone on the changelog) every cache_sweep_interval_s, and as new entries are written.
    cache_max_entries: int = 100_000
    cache_sweep_interval_s: float = 30.0


# The APIs an endpoint may speak: Ollama's native /api/*, or OpenAI's /v1/* (vLLM, llama.cpp's server,
# TGI, LM Studio, Ollama's own /v1). Each has a backend in streams/backends/.
ENDPOINT_KINDS = ("ollama", "openai")


@dataclass(frozen=True)
class EndpointSettings:
    """One model server of a model: Ollama's native API, or any OpenAI-compatible server."""

    url: str
    weight: float = 1.0  # prior preference, relative to the model's other endpoints
    max_concurrency: int = 4  # Ollama's parallel slots (OLLAMA_NUM_PARALLEL)
    max_rps: float | None = None  # requests started per second, at most
    kind: str = "ollama"  # "ollama" (native /api/*) or "openai" (/v1/*: vLLM, llama.cpp, TGI, Ollama's /v1)


@dataclass(frozen=True)
class BridgeSettings:
    host: str = "0.0.0.0"
    port: int = 8765
    path: str = "/ws"
    # Frames waiting for one client before it is closed as too slow (1013).
    max_queue: int = 1024
    # The websocket URL the gateway's page connects to; empty: same host, this port and path.
    public_url: str = ""


@dataclass(frozen=True)
class ApiKey:
    """One client's key: a public ``name`` (logs, audit, records) and the SHA-256 of its secret token.

    Only the hash is configured, so neither the config file nor the environment holds a usable secret.
    """

    name: str
    sha256: bytes = field(repr=False)  # the 32-byte digest of the token's UTF-8 bytes
    models: tuple[str, ...] = ()  # model ids this key may use; empty: every model


@dataclass(frozen=True)
class AccessSettings:
    """API keys; none configured means the gateway and the bridge are open (no token needed)."""

    keys: tuple[ApiKey, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.keys)


@dataclass(frozen=True)
class TenantSettings:
    """One tenant's share and limits (``[tenants."name"]``; ``[tenants."*"]`` for the others).

    ``weight`` is its share of a saturated model relative to the other tenants waiting; the
    limits are enforced by the gateway's admission (0: unlimited).
    """

    weight: float = 1.0
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_concurrent: int = 0  # waiting + running at once


#: The ``[tenants]`` table of every tenant without its own.
ANY_TENANT = "*"


@dataclass(frozen=True)
class ModelSettings:
    id: str
    endpoints: tuple[EndpointSettings, ...]
    timeout_s: float = 120.0  # per attempt, and the default deadline of a request
    retries: int = 2  # further attempts on other endpoints after a retryable failure
    fallback: str | None = None  # another model id, used after all retries failed
    cache: str = "deterministic"  # "deterministic" (temperature 0 or fixed seed) or "off"
    cache_ttl_s: float = 3600.0

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(e.url for e in self.endpoints)


@dataclass(frozen=True)
class Settings:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    bridge: BridgeSettings = field(default_factory=BridgeSettings)
    models: tuple[ModelSettings, ...] = ()
    ollama_host: str = DEFAULT_OLLAMA_HOST
    access: AccessSettings = field(default_factory=AccessSettings)
    # Per tenant name, and ANY_TENANT ("*") for the rest; absent: weight 1, no limits.
    tenants: dict[str, TenantSettings] = field(default_factory=dict)

    def tenant(self, name: str) -> TenantSettings:
        """``name``'s settings: its own table, else ``[tenants."*"]``, else the defaults."""
        found = self.tenants.get(name) or self.tenants.get(ANY_TENANT)
        return found if found is not None else TenantSettings()

    def model(self, model_id: str) -> ModelSettings | None:
        for model in self.models:
            if model.id == model_id:
                return model
        return None

    @property
    def model_ids(self) -> tuple[str, ...]:
        return tuple(m.id for m in self.models)

    def with_bootstrap(self, bootstrap: str | None) -> Settings:
        if not bootstrap:
            return self
        return dataclasses.replace(self, kafka=dataclasses.replace(self.kafka, bootstrap=bootstrap))


def field_defaults(cls: type) -> dict[str, Any]:
    """The defaults a settings dataclass declares (fields with a plain default), by field name.

    The one place a default is written is its dataclass field; parsing fills gaps from here.
    """
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


_SECTIONS: dict[str, type] = {
    "kafka": KafkaSettings,
    "gateway": GatewaySettings,
    "worker": WorkerSettings,
    "bridge": BridgeSettings,
}


# Zero would not mean "no limit" for these: it would stall or refuse everything.
_POSITIVE = {
    "kafka": ("partitions", "replication_factor", "session_timeout_ms", "produce_timeout_s", "connect_timeout_s"),
    "gateway": ("max_body_bytes", "health_timeout_s", "reply_timeout_s"),
    "worker": ("max_batch", "max_wait_ms", "max_in_flight", "commit_interval_s", "cache_max_entries",
               "cache_sweep_interval_s"),
    "bridge": ("port", "max_queue"),
}


def load_settings(
    path: Path | str | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build the settings from defaults, the TOML file (if present) and the environment.

    ``path`` defaults to ``$NEXUS_CONFIG`` or ``configs/nexus.toml``; a missing
    default file is fine, a missing explicit one is an error.
    """
    env = os.environ if environ is None else environ
    config_path, raw = read_config_file(path, env)
    where = str(config_path)

    unknown = set(raw) - set(_SECTIONS) - {"models", "ollama_host", "access", "tenants"}
    if unknown:
        raise ConfigError(f"{where}: unknown section or key {sorted(unknown)[0]!r}")

    ollama_host = _ollama_host(env, raw, where)

    sections = {}
    for name, cls in _SECTIONS.items():
        values = _section(raw.get(name, {}), cls, f"{where}: [{name}]")
        values.update(_env_section(env, name, cls))
        for key in _POSITIVE.get(name, ()):
            if key in values and values[key] <= 0:
                raise ConfigError(
                    f"[{name}] {key} (from {where} or NEXUS_{name.upper()}_{key.upper()}): "
                    f"must be positive, got {values[key]!r}"
                )
        if name == "kafka" and "processing_guarantee" in values:
            _check_guarantee(values["processing_guarantee"], where)
        if name == "kafka" and "retention_ms" in values:
            _check_retention(values["retention_ms"], where)
        sections[name] = cls(**values)
        if name == "kafka":
            _check_security(sections[name], where)

    models = _models(raw.get("models"), ollama_host, where)
    env_models = env.get("NEXUS_MODELS")
    if env_models:
        models = tuple(
            ModelSettings(id=m.strip(), endpoints=(EndpointSettings(ollama_host),))
            for m in env_models.split(",")
            if m.strip()
        )
    access = _access(raw.get("access"), env.get("NEXUS_API_KEYS"), {m.id for m in models}, where)
    tenants = _tenants(raw.get("tenants"), env.get("NEXUS_TENANTS"), where)
    return Settings(models=models, ollama_host=ollama_host, access=access, tenants=tenants, **sections)


def read_config_file(path: Path | str | None, env: Mapping[str, str]) -> tuple[Path, dict[str, Any]]:
    """The settings file ``load_settings`` reads and its TOML tables (empty when it is absent)."""
    explicit = path is not None or "NEXUS_CONFIG" in env
    config_path = Path(path if path is not None else env.get("NEXUS_CONFIG", DEFAULT_CONFIG_PATH))
    raw: dict[str, Any] = {}
    if config_path.exists():
        try:
            raw = tomllib.loads(config_path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config_path}: not valid TOML: {exc}") from None
    elif explicit:
        raise ConfigError(f"{config_path}: config file not found")
    return config_path, raw


def _ollama_host(env: Mapping[str, str], raw: Mapping[str, Any], where: str) -> str:
    """``OLLAMA_HOST`` (when set and not empty), else the file's ``ollama_host``, read as Ollama reads it."""
    if env.get("OLLAMA_HOST", "").strip():
        value, origin = env["OLLAMA_HOST"], "environment variable OLLAMA_HOST"
    elif "ollama_host" in raw:
        value, origin = raw["ollama_host"], f"{where}: ollama_host"
    else:
        return DEFAULT_OLLAMA_HOST
    if not isinstance(value, str):
        raise ConfigError(f"{origin}: expected a host[:port] or URL string, got {value!r}")
    try:
        return parse_ollama_host(value)
    except OllamaHostError as exc:
        raise ConfigError(f"{origin}: {exc}") from None


# --------------------------------------------------------------------------- tenants

_TENANT_KEYS = tuple(f.name for f in dataclasses.fields(TenantSettings))
TENANTS_SYNTAX = "name:key=value,key=value entries separated by ';' (name * for every other tenant)"


def _tenants(table: Any, env_tenants: str | None, where: str) -> dict[str, TenantSettings]:
    """``[tenants."name"]`` tables, or ``NEXUS_TENANTS`` (which replaces them when set and not empty)."""
    if env_tenants is not None and env_tenants.strip():
        specs = dict(_env_tenant(entry) for entry in env_tenants.split(";") if entry.strip())
        here = "NEXUS_TENANTS"
    elif table is None:
        return {}
    elif not isinstance(table, dict):
        raise ConfigError(f"{where}: [tenants] must be a table of tenant tables, e.g. [tenants.\"team-a\"]")
    else:
        specs, here = table, f"{where}: [tenants"
    out = {}
    for name, spec in specs.items():
        label = f"{here}.\"{name}\"]" if here != "NEXUS_TENANTS" else f"NEXUS_TENANTS {name!r}"
        if not name.strip():
            raise ConfigError(f"{label}: a tenant name must not be empty")
        out[name] = _tenant(spec, label)
    return out


def _env_tenant(entry: str) -> tuple[str, dict[str, Any]]:
    name, sep, rest = entry.strip().partition(":")
    if not sep:
        raise ConfigError(f"NEXUS_TENANTS entry {entry.strip()!r}: expected {TENANTS_SYNTAX}")
    spec: dict[str, Any] = {}
    for pair in (p for p in rest.split(",") if p.strip()):
        key, eq, value = pair.partition("=")
        if not eq:
            raise ConfigError(f"NEXUS_TENANTS {name.strip()!r}: {pair.strip()!r} is not key=value; "
                              f"expected {TENANTS_SYNTAX}")
        spec[key.strip()] = value.strip()
    return name.strip(), spec


def _tenant(spec: Any, here: str) -> TenantSettings:
    if not isinstance(spec, dict):
        raise ConfigError(f"{here}: must be a table with any of {', '.join(_TENANT_KEYS)}")
    unknown = sorted(set(spec) - set(_TENANT_KEYS))
    if unknown:
        raise ConfigError(f"{here}: unknown key {unknown[0]!r}; allowed: {', '.join(_TENANT_KEYS)}")
    values = {**field_defaults(TenantSettings)}
    for key, value in spec.items():
        values[key] = _coerce(value, "float" if key == "weight" else "int", f"{here} {key}")
    if not (values["weight"] > 0 and values["weight"] < float("inf")):
        raise ConfigError(f"{here} weight: must be a positive number (a share relative to the other "
                          f"tenants), got {values['weight']!r}")
    for key in _TENANT_KEYS[1:]:
        if values[key] < 0:
            raise ConfigError(f"{here} {key}: must be 0 (unlimited) or more, got {values[key]!r}")
    return TenantSettings(**values)


# --------------------------------------------------------------------------- API keys

_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_KEY_FIELDS = {"name", "sha256", "models"}
API_KEYS_SYNTAX = "name:sha256[:model,model...] entries separated by ';'"


def _access(table: Any, env_keys: str | None, model_ids: set[str], where: str) -> AccessSettings:
    """``[[access.keys]]`` tables, or ``NEXUS_API_KEYS`` (which replaces them when set and not empty)."""
    if env_keys is not None and env_keys.strip():
        specs = [_env_key(entry, i) for i, entry in enumerate(e for e in env_keys.split(";") if e.strip())]
        here = "NEXUS_API_KEYS"
    else:
        if table is None:
            return AccessSettings()
        if not isinstance(table, dict) or set(table) - {"keys"}:
            raise ConfigError(f"{where}: [access] holds only keys, as [[access.keys]] tables")
        specs = table.get("keys", [])
        if not isinstance(specs, list):
            raise ConfigError(f"{where}: [access] keys must be an array of tables ([[access.keys]])")
        here = f"{where}: [[access.keys]]"
    keys = tuple(_api_key(spec, f"{here}[{i}]", model_ids) for i, spec in enumerate(specs))
    seen_names: set[str] = set()
    seen_hashes: set[bytes] = set()
    for key in keys:
        if key.name in seen_names:
            raise ConfigError(f"{here}: key name {key.name!r} is given twice; names must be unique")
        if key.sha256 in seen_hashes:
            raise ConfigError(f"{here}: key {key.name!r} has the same token as another key; give each its own")
        seen_names.add(key.name)
        seen_hashes.add(key.sha256)
    return AccessSettings(keys)


def _env_key(entry: str, i: int) -> dict[str, Any]:
    parts = entry.strip().split(":", 2)
    if len(parts) < 2:
        # Never echo the entry: it may be a token pasted where its hash belongs.
        raise ConfigError(f"NEXUS_API_KEYS entry {i}: expected {API_KEYS_SYNTAX}")
    spec: dict[str, Any] = {"name": parts[0].strip(), "sha256": parts[1].strip()}
    if len(parts) == 3:
        spec["models"] = [m.strip() for m in parts[2].split(",") if m.strip()]
    return spec


def _api_key(spec: Any, here: str, model_ids: set[str]) -> ApiKey:
    if not isinstance(spec, dict):
        raise ConfigError(f"{here}: must be a table with name, sha256 and optionally models")
    unknown = set(spec) - _KEY_FIELDS
    if unknown:
        hint = " (configure the token's SHA-256 as sha256, never the token)" if "token" in unknown else ""
        raise ConfigError(f"{here}: unknown key {sorted(unknown)[0]!r}; allowed: {sorted(_KEY_FIELDS)}{hint}")
    name = spec.get("name")
    if not isinstance(name, str) or not _KEY_NAME.match(name):
        raise ConfigError(
            f"{here} name: expected 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    digest = spec.get("sha256")
    if not isinstance(digest, str) or not digest:
        raise ConfigError(f"{here} ({name}) sha256: missing or empty; "
                          "set it to the SHA-256 of the token: printf %s \"$TOKEN\" | sha256sum")
    if not _SHA256.match(digest):
        # Not echoed: a value here that is not a hash may be the plaintext token.
        raise ConfigError(f"{here} ({name}) sha256: expected 64 hex digits, the SHA-256 of the token "
                          "(printf %s \"$TOKEN\" | sha256sum), not the token itself")
    models = spec.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise ConfigError(f"{here} ({name}) models: expected a list of model ids")
    unknown_models = sorted(set(models) - model_ids)
    if unknown_models:
        raise ConfigError(
            f"{here} ({name}) models: {unknown_models[0]!r} is not a configured model; known: {sorted(model_ids)}"
        )
    return ApiKey(name=name, sha256=bytes.fromhex(digest), models=tuple(dict.fromkeys(models)))


def _check_retention(value: int, where: str) -> None:
    if value != -1 and value <= 0:
        raise ConfigError(
            f"[kafka] retention_ms (from {where} or NEXUS_KAFKA_RETENTION_MS): "
            f"must be positive, or -1 to keep records forever, got {value!r}"
        )


SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN")
# Values no message may quote.
_SECRETS = {"sasl_password"}


def _check_security(kafka: KafkaSettings, where: str) -> None:
    """Refuse security settings that cannot work, at load rather than at the first connection."""

    def origin(key: str) -> str:
        return f"[kafka] {key} (from {where} or NEXUS_KAFKA_{key.upper()})"

    protocol = kafka.security_protocol
    if protocol not in SECURITY_PROTOCOLS:
        raise ConfigError(f"{origin('security_protocol')}: expected one of {', '.join(SECURITY_PROTOCOLS)}, "
                          f"got {protocol!r}")
    sasl = protocol.startswith("SASL_")
    tls = protocol in ("SSL", "SASL_SSL")
    if sasl:
        if kafka.sasl_mechanism not in SASL_MECHANISMS:
            raise ConfigError(f"{origin('sasl_mechanism')}: expected one of {', '.join(SASL_MECHANISMS)}, "
                              f"got {kafka.sasl_mechanism!r}")
        for key in ("sasl_username", "sasl_password"):
            if not getattr(kafka, key):
                raise ConfigError(f"{origin(key)}: required with security_protocol = {protocol!r}")
    elif kafka.sasl_username or kafka.sasl_password:
        raise ConfigError(f"{origin('security_protocol')}: SASL credentials are set but security_protocol is "
                          f"{protocol!r}, so they would not be sent; use SASL_SSL or SASL_PLAINTEXT")
    for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        path = getattr(kafka, key)
        if not path:
            continue
        if not tls:
            raise ConfigError(f"{origin(key)}: set but security_protocol is {protocol!r}, which does not use "
                              "TLS; use SSL or SASL_SSL")
        if not Path(path).is_file():
            raise ConfigError(f"{origin(key)}: file not found: {path}")
    if kafka.ssl_keyfile and not kafka.ssl_certfile:
        raise ConfigError(f"{origin('ssl_keyfile')}: needs ssl_certfile, the certificate of that key")


PROCESSING_GUARANTEES = ("at_least_once", "exactly_once")


def _check_guarantee(value: str, where: str) -> None:
    if value not in PROCESSING_GUARANTEES:
        raise ConfigError(
            f"[kafka] processing_guarantee (from {where} or NEXUS_KAFKA_PROCESSING_GUARANTEE): "
            f"expected one of {', '.join(PROCESSING_GUARANTEES)}, got {value!r}"
        )


def _normalise_host(host: str) -> str:
    if "://" not in host:
        host = "http://" + host
    return host.rstrip("/")


def _section(table: Any, cls: type, where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}")
        out[key] = _coerce(value, fields[key].type, f"{where} {key}", secret=key in _SECRETS)
    return out


def _env_section(env: Mapping[str, str], section: str, cls: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        name = f"NEXUS_{section.upper()}_{f.name.upper()}"
        if name in env:
            out[f.name] = _coerce(env[name], f.type, f"environment variable {name}", secret=f.name in _SECRETS)
    return out


def _coerce(value: Any, type_name: Any, where: str, secret: bool = False) -> Any:
    kind = {"int": int, "float": float, "str": str, "bool": bool}.get(str(type_name))
    if kind is None:
        return value
    shown = f"a {type(value).__name__}" if secret else repr(value)
    if isinstance(value, str) and kind is not str:
        try:
            return kind(value) if kind is not bool else value.lower() in ("1", "true", "yes")
        except ValueError:
            raise ConfigError(f"{where}: expected {kind.__name__}, got {shown}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {shown}")
    return value


def _models(table: Any, ollama_host: str, where: str) -> tuple[ModelSettings, ...]:
    if table is None:
        return tuple(ModelSettings(id=model_id, endpoints=(EndpointSettings(ollama_host),))
                     for model_id in DEFAULT_MODEL_IDS)
    if not isinstance(table, dict) or not table:
        raise ConfigError(f"{where}: [models] must be a non-empty table of model tables")
    models = [_model(model_id, spec, ollama_host, f"{where}: [models.{model_id!r}]")
              for model_id, spec in table.items()]
    ids = {m.id for m in models}
    _check_kinds(models, where)
    for m in models:
        if m.fallback is not None and (m.fallback not in ids or m.fallback == m.id):
            raise ConfigError(
                f"{where}: [models.{m.id!r}] fallback: {m.fallback!r} is not another configured model"
            )
    return tuple(models)


def _check_kinds(models: list[ModelSettings], where: str) -> None:
    """An endpoint is its URL to the worker (its slots, circuit, metrics): one URL, one kind."""
    kinds: dict[str, tuple[str, str]] = {}
    for m in models:
        for e in m.endpoints:
            seen = kinds.setdefault(e.url, (e.kind, m.id))
            if seen[0] != e.kind:
                raise ConfigError(
                    f"{where}: endpoint {e.url} is of kind {seen[0]!r} for model {seen[1]!r} but {e.kind!r} "
                    f"for model {m.id!r}; one server URL has one kind"
                )


# What a [models.<id>] table and an endpoint table may hold: their dataclasses' fields.
_MODEL_KEYS = {f.name for f in dataclasses.fields(ModelSettings)} - {"id"}
_ENDPOINT_KEYS = {f.name for f in dataclasses.fields(EndpointSettings)}


def _model(model_id: str, spec: Any, ollama_host: str, here: str) -> ModelSettings:
    if not isinstance(spec, dict):
        raise ConfigError(f"{here}: must be a table")
    unknown = set(spec) - _MODEL_KEYS
    if unknown:
        raise ConfigError(f"{here}: unknown key {sorted(unknown)[0]!r}; allowed: {sorted(_MODEL_KEYS)}")
    given = {**field_defaults(ModelSettings), **spec}
    endpoints = given.get("endpoints", [ollama_host])
    if not isinstance(endpoints, list) or not endpoints:
        raise ConfigError(f"{here} endpoints: expected a non-empty list of URLs or endpoint tables")
    timeout = _coerce(given["timeout_s"], "float", f"{here} timeout_s")
    retries = _coerce(given["retries"], "int", f"{here} retries")
    ttl = _coerce(given["cache_ttl_s"], "float", f"{here} cache_ttl_s")
    cache = given["cache"]
    fallback = given["fallback"]
    if timeout <= 0:
        raise ConfigError(f"{here} timeout_s: must be positive")
    if retries < 0:
        raise ConfigError(f"{here} retries: must be 0 or more")
    if cache not in ("deterministic", "off"):
        raise ConfigError(f"{here} cache: expected \"deterministic\" or \"off\", got {cache!r}")
    if fallback is not None and not isinstance(fallback, str):
        raise ConfigError(f"{here} fallback: expected a model id")
    return ModelSettings(
        id=model_id,
        endpoints=tuple(_endpoint(e, f"{here} endpoints[{i}]") for i, e in enumerate(endpoints)),
        timeout_s=timeout,
        retries=retries,
        fallback=fallback,
        cache=cache,
        cache_ttl_s=ttl,
    )


def _endpoint(spec: Any, here: str) -> EndpointSettings:
    if isinstance(spec, str):
        return EndpointSettings(_ollama_url(spec, here))
    if not isinstance(spec, dict) or not isinstance(spec.get("url"), str):
        raise ConfigError(f"{here}: expected a URL or a table with a url")
    unknown = set(spec) - _ENDPOINT_KEYS
    if unknown:
        raise ConfigError(f"{here}: unknown key {sorted(unknown)[0]!r}; allowed: {sorted(_ENDPOINT_KEYS)}")
    given = {**field_defaults(EndpointSettings), **spec}
    weight = _coerce(given["weight"], "float", f"{here} weight")
    slots = _coerce(given["max_concurrency"], "int", f"{here} max_concurrency")
    max_rps = given["max_rps"]
    if max_rps is not None:
        max_rps = _coerce(max_rps, "float", f"{here} max_rps")
    if weight <= 0 or slots <= 0 or (max_rps is not None and max_rps <= 0):
        raise ConfigError(f"{here}: weight, max_concurrency and max_rps must be positive")
    kind = given["kind"]
    if kind not in ENDPOINT_KINDS:
        raise ConfigError(
            f"{here} ({spec['url']}) kind: expected one of {', '.join(map(repr, ENDPOINT_KINDS))}, got {kind!r}"
        )
    if kind == "openai":
        # The server's base: "http://h:8000" and "http://h:8000/v1" are the same endpoint.
        url = _normalise_host(spec["url"]).removesuffix("/v1").rstrip("/")
    else:  # an Ollama's address means what it means in OLLAMA_HOST: "gpu1" is gpu1:11434
        url = _ollama_url(spec["url"], here)
    return EndpointSettings(url, weight, slots, max_rps, kind)


def _ollama_url(value: str, here: str) -> str:
    try:
        return parse_ollama_host(value)
    except OllamaHostError as exc:
        raise ConfigError(f"{here}: {exc}") from None
