"""``nexus config``: every effective setting, and where it came from, secrets hidden.

An operator asking "which bootstrap does this worker use, and why?" gets one line per value:
the default, the settings file, an environment variable (named), or a flag (``--bootstrap``,
``--log-level``). Sections are read from the :class:`~nexus.settings.Settings` dataclasses, so a
setting added there shows here without a change. Secrets (passwords, tokens, API key hashes,
header values) show as ``***`` when set.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nexus.logs import LogSettings
from nexus.settings import _SECTIONS, Settings, _env_tenant

HIDDEN = "***"
DEFAULT = "default"
# Field names whose values are never printed (a TLS key password, an OTLP "Authorization" header...).
_SECRET_NAME = re.compile(
    r"(^|_)(password|passphrase|secret|token|sha256|api_key|credentials?|authorization|headers)$", re.IGNORECASE
)


@dataclass(frozen=True)
class Row:
    key: str  # dotted, model and tenant names quoted: models."llama3.1".timeout_s
    value: Any  # JSON-compatible
    source: str  # "default", the settings file's path, "env NAME", or a flag ("--bootstrap")


def is_secret(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def describe(
    settings: Settings,
    raw: Mapping[str, Any],
    environ: Mapping[str, str],
    config_file: str,
    bootstrap_flag: str | None = None,
    log: LogSettings | None = None,
) -> list[Row]:
    """One row per effective value. ``raw`` is the settings file's tables (empty when there is
    none), ``config_file`` its path as shown, ``bootstrap_flag`` the ``--bootstrap`` given."""
    rows: list[Row] = []
    handled = {"models", "ollama_host", "access", "tenants"}
    for name in [*_SECTIONS, *(f.name for f in dataclasses.fields(Settings) if f.name not in _SECTIONS)]:
        section = getattr(settings, name)
        if name in handled or not dataclasses.is_dataclass(section):
            continue
        table = raw.get(name, {}) if isinstance(raw.get(name), dict) else {}
        for f in dataclasses.fields(section):
            env_name = f"NEXUS_{name.upper()}_{f.name.upper()}"
            if name == "kafka" and f.name == "bootstrap" and bootstrap_flag:
                source = "--bootstrap"
            elif env_name in environ:
                source = f"env {env_name}"
            elif f.name in table:
                source = config_file
            else:
                source = DEFAULT
            rows.append(_row(f"{name}.{f.name}", getattr(section, f.name), source))
    ollama_source = _ollama_source(raw, environ, config_file)
    rows.append(Row("ollama_host", settings.ollama_host, ollama_source))
    rows.extend(_models(settings, raw, environ, config_file, ollama_source))
    rows.extend(_access(settings, raw, environ, config_file))
    rows.extend(_tenants(settings, raw, environ, config_file))
    if log is not None:
        rows.append(Row("log.level", log.level, log.level_source))
        rows.append(Row("log.format", log.format, log.format_source))
    rows.extend(_tracing(environ))
    return rows


def _tracing(environ: Mapping[str, str]) -> list[Row]:
    """Tracing is configured the OpenTelemetry way, by ``OTEL_*`` variables (docs/observability.md):
    each one set is shown, headers hidden; none set means no export."""
    names = sorted(n for n in environ if n.startswith("OTEL_"))
    if not names:
        return [Row("tracing.export", "off (no OTEL_EXPORTER_OTLP_ENDPOINT)", DEFAULT)]
    return [_row(f"tracing.{name}", environ[name], f"env {name}") for name in names]


def _row(key: str, value: Any, source: str) -> Row:
    name = key.rsplit(".", 1)[-1]
    if is_secret(name) and value not in ("", None, b""):
        value = HIDDEN
    elif isinstance(value, bytes):
        value = value.hex()
    elif isinstance(value, tuple):
        value = list(value)
    return Row(key, value, source)


def _ollama_source(raw: Mapping[str, Any], environ: Mapping[str, str], config_file: str) -> str:
    if environ.get("OLLAMA_HOST", "").strip():
        return "env OLLAMA_HOST"
    return config_file if "ollama_host" in raw else DEFAULT


def _quoted(name: str) -> str:
    return json.dumps(name, ensure_ascii=False)


def _models(settings: Settings, raw: Mapping[str, Any], environ: Mapping[str, str], config_file: str,
            ollama_source: str) -> list[Row]:
    from_env = bool(environ.get("NEXUS_MODELS"))
    tables = raw.get("models") if isinstance(raw.get("models"), dict) and not from_env else None
    id_source = "env NEXUS_MODELS" if from_env else config_file if tables is not None else DEFAULT
    rows = []
    for model in settings.models:
        prefix = f"models.{_quoted(model.id)}"
        table = tables.get(model.id, {}) if tables is not None else {}
        rows.append(Row(f"{prefix}.id", model.id, id_source))
        for f in dataclasses.fields(model):
            if f.name in ("id", "endpoints"):
                continue
            rows.append(_row(f"{prefix}.{f.name}", getattr(model, f.name),
                             config_file if f.name in table else DEFAULT))
        given = table.get("endpoints") if isinstance(table.get("endpoints"), list) else None
        for i, endpoint in enumerate(model.endpoints):
            spec = given[i] if given is not None and i < len(given) else None
            for f in dataclasses.fields(endpoint):
                if spec is None:
                    source = ollama_source if f.name == "url" else DEFAULT
                elif f.name == "url" or (isinstance(spec, dict) and f.name in spec):
                    source = config_file
                else:
                    source = DEFAULT
                rows.append(_row(f"{prefix}.endpoints[{i}].{f.name}", getattr(endpoint, f.name), source))
    return rows


def _access(settings: Settings, raw: Mapping[str, Any], environ: Mapping[str, str], config_file: str) -> list[Row]:
    if environ.get("NEXUS_API_KEYS", "").strip():
        source = "env NEXUS_API_KEYS"
    elif "access" in raw:
        source = config_file
    else:
        source = DEFAULT
    if not settings.access.keys:
        return [Row("access.keys", [], source)]
    rows = []
    for i, key in enumerate(settings.access.keys):
        for f in dataclasses.fields(key):
            rows.append(_row(f"access.keys[{i}].{f.name}", getattr(key, f.name), source))
    return rows


def _tenants(settings: Settings, raw: Mapping[str, Any], environ: Mapping[str, str], config_file: str) -> list[Row]:
    tables: Mapping[str, Any]
    if environ.get("NEXUS_TENANTS", "").strip():
        source = "env NEXUS_TENANTS"
        tables = dict(_env_tenant(e) for e in environ["NEXUS_TENANTS"].split(";") if e.strip())
    elif isinstance(raw.get("tenants"), dict):
        source, tables = config_file, raw["tenants"]
    else:
        source, tables = DEFAULT, {}
    if not settings.tenants:
        return [Row("tenants", {}, source)]
    rows = []
    for name, tenant in settings.tenants.items():
        table = tables.get(name, {})
        for f in dataclasses.fields(tenant):
            given = isinstance(table, dict) and f.name in table
            rows.append(_row(f"tenants.{_quoted(name)}.{f.name}", getattr(tenant, f.name),
                             source if given else DEFAULT))
    return rows


def render_text(rows: list[Row], config_file: str, found: bool) -> str:
    """``key = value  # source`` lines, values as JSON, aligned; a header names the settings file."""
    state = "read" if found else "not found: defaults and environment only"
    lines = [f"# nexus config: effective settings, each with where it came from (settings file {config_file}: "
             f"{state}); secrets show as {HIDDEN}"]
    shown = [(f"{r.key} = {json.dumps(r.value, ensure_ascii=False)}", r.source) for r in rows]
    width = min(max((len(s) for s, _ in shown), default=0), 72)
    lines.extend(f"{setting:<{width}}  # {source}" for setting, source in shown)
    return "\n".join(lines) + "\n"


def render_json(rows: list[Row], config_file: str, found: bool) -> str:
    """One object: the settings file, and each key's value and source."""
    body = {
        "config_file": config_file if found else None,
        "settings": {r.key: {"value": r.value, "source": r.source} for r in rows},
    }
    return json.dumps(body, indent=2, ensure_ascii=False) + "\n"
