"""Settings: defaults < TOML file < NEXUS_* environment, and errors that say where."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nexus.settings import (
    EndpointSettings,
    DEFAULT_PROMPT_TEMPLATE,
    ConfigError,
    ModelSettings,
    Settings,
    load_settings,
)


def _error(path: Path | None, environ: dict[str, str]) -> str:
    """The ConfigError message, with the file path blanked so it cannot match by accident."""
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ=environ)
    message = str(info.value)
    return message.replace(str(path), "<file>") if path is not None else message


def _toml(tmp_path: Path, text: str, name: str = "nexus.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_without_file_or_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No configs/nexus.toml in the working directory: a missing default file is fine.
    monkeypatch.chdir(tmp_path)
    settings = load_settings(environ={})
    assert settings.kafka.bootstrap == "localhost:9092"
    assert settings.kafka.partitions == 8
    assert settings.kafka.requests_topic == "inference.requests"
    assert settings.kafka.responses_topic == "inference.responses"
    assert settings.gateway.port == 3000
    assert settings.ollama_host == "http://127.0.0.1:11434"  # as Ollama's clients read an unset OLLAMA_HOST
    assert settings.model_ids == ("llama3.1", "mistral")
    for model in settings.models:
        assert model.urls == ("http://127.0.0.1:11434",)
        assert model.timeout_s == 120.0
    assert settings.worker.prompt_template == DEFAULT_PROMPT_TEMPLATE
    assert settings == Settings(
        models=(
            ModelSettings("llama3.1", (EndpointSettings("http://127.0.0.1:11434"),)),
            ModelSettings("mistral", (EndpointSettings("http://127.0.0.1:11434"),)),
        )
    )


def test_default_config_file_in_working_directory_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "configs").mkdir()
    _toml(tmp_path / "configs", "[kafka]\npartitions = 3\n")
    monkeypatch.chdir(tmp_path)
    assert load_settings(environ={}).kafka.partitions == 3


def test_precedence_defaults_file_env(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        """
        [kafka]
        bootstrap = "broker-from-file:9092"
        partitions = 4

        [gateway]
        port = 4000
        host = "127.0.0.1"

        [worker]
        max_batch = 16
        """,
    )
    settings = load_settings(
        path,
        environ={
            "NEXUS_GATEWAY_PORT": "5000",
            "NEXUS_KAFKA_BOOTSTRAP": "broker-from-env:19092",
            "NEXUS_WORKER_MAX_WAIT_MS": "7",
            "NEXUS_KAFKA_PRODUCE_TIMEOUT_S": "2.5",
        },
    )
    # env beats file
    assert settings.gateway.port == 5000
    assert settings.kafka.bootstrap == "broker-from-env:19092"
    # file beats defaults
    assert settings.kafka.partitions == 4
    assert settings.gateway.host == "127.0.0.1"
    assert settings.worker.max_batch == 16
    # env beats defaults, with the field's type
    assert settings.worker.max_wait_ms == 7
    assert settings.kafka.produce_timeout_s == 2.5
    # untouched fields keep their defaults
    assert settings.kafka.replication_factor == 1
    assert settings.gateway.max_body_bytes == 1024 * 1024


def test_nexus_config_env_names_the_file(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[gateway]\nport = 3999\n", name="other.toml")
    assert load_settings(environ={"NEXUS_CONFIG": str(path)}).gateway.port == 3999


def test_float_field_accepts_toml_integer(tmp_path: Path) -> None:
    settings = load_settings(_toml(tmp_path, "[kafka]\nproduce_timeout_s = 3\n"), environ={})
    assert settings.kafka.produce_timeout_s == 3.0
    assert isinstance(settings.kafka.produce_timeout_s, float)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("gpu1:11434", "http://gpu1:11434"),
        ("10.0.0.5:11434/", "http://10.0.0.5:11434"),
        ("https://ollama.example.com/", "https://ollama.example.com:443"),  # the scheme's port, as Ollama's client
        ("0.0.0.0", "http://0.0.0.0:11434"),  # Ollama's port, not 80 (tests/unit/test_ollama_host.py has the rest)
    ],
)
def test_ollama_host_normalised(tmp_path: Path, host: str, expected: str) -> None:
    settings = load_settings(_toml(tmp_path, ""), environ={"OLLAMA_HOST": host})
    assert settings.ollama_host == expected
    # The default models use it.
    assert all(m.urls == (expected,) for m in settings.models)


def test_ollama_host_env_beats_file(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'ollama_host = "file-host:11434"\n')
    assert load_settings(path, environ={}).ollama_host == "http://file-host:11434"
    assert load_settings(path, environ={"OLLAMA_HOST": "env-host"}).ollama_host == "http://env-host:11434"


def test_models_tables(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        """
        ollama_host = "default-host:11434"

        [models."llama3.1"]
        endpoints = ["gpu1:11434", "http://gpu2:11434/"]
        timeout_s = 30

        [models.mistral]
        """,
    )
    settings = load_settings(path, environ={})
    assert settings.model_ids == ("llama3.1", "mistral")
    llama = settings.model("llama3.1")
    assert llama == ModelSettings(
        id="llama3.1",
        endpoints=(EndpointSettings("http://gpu1:11434"), EndpointSettings("http://gpu2:11434")),
        timeout_s=30.0,
    )
    # A model without endpoints is served by the default Ollama host.
    assert settings.model("mistral") == ModelSettings(
        id="mistral", endpoints=(EndpointSettings("http://default-host:11434"),), timeout_s=120.0
    )
    assert settings.model("gpt-4") is None


def test_nexus_models_env_replaces_models(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[models.mistral]\nendpoints = ["gpu9:1"]\n')
    settings = load_settings(
        path, environ={"NEXUS_MODELS": " phi3 , qwen2,,", "OLLAMA_HOST": "box:11434"}
    )
    assert settings.models == (
        ModelSettings("phi3", (EndpointSettings("http://box:11434"),)),
        ModelSettings("qwen2", (EndpointSettings("http://box:11434"),)),
    )


def test_with_bootstrap() -> None:
    settings = Settings()
    assert settings.with_bootstrap(None) is settings
    assert settings.with_bootstrap("") is settings
    changed = settings.with_bootstrap("kafka:29092")
    assert changed.kafka.bootstrap == "kafka:29092"
    assert changed.kafka.partitions == settings.kafka.partitions
    assert settings.kafka.bootstrap == "localhost:9092"


# --- errors ------------------------------------------------------------------------------


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[kafka\npartitions = 8\n", name="broken.toml")
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    assert str(path) in str(info.value)
    assert "TOML" in str(info.value)


def test_unknown_section_is_named(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[kafkaa]\nbootstrap = 'x'\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    assert str(path) in str(info.value)
    assert "'kafkaa'" in _error(path, {})


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[gateway]\nprot = 3000\n")
    message = _error(path, {})
    assert "'prot'" in message
    assert "[gateway]" in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[kafka]\npartitions = "eight"\n', "partitions"),
        ("[gateway]\nport = true\n", "port"),
        ("[kafka]\nbootstrap = 9092\n", "bootstrap"),
        ("[worker]\ncommit_interval_s = [1]\n", "commit_interval_s"),
        ('kafka = "localhost"\n', "kafka"),
    ],
)
def test_wrong_type_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    assert key in _error(_toml(tmp_path, text), {})


def test_wrong_type_in_environment_names_the_variable(tmp_path: Path) -> None:
    message = _error(_toml(tmp_path, ""), {"NEXUS_KAFKA_PARTITIONS": "eight"})
    assert "NEXUS_KAFKA_PARTITIONS" in message
    assert "'eight'" in message


def test_explicit_missing_config_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="nope.toml"):
        load_settings(missing, environ={})
    with pytest.raises(ConfigError, match="nope.toml"):
        load_settings(environ={"NEXUS_CONFIG": str(missing)})


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[models.mistral]\nendpoints = []\n', "endpoints"),
        ('[models.mistral]\nendpoints = "gpu1:11434"\n', "endpoints"),
        ('[models.mistral]\nendpoints = [1]\n', "endpoints"),
        ("[models.mistral]\ntimeout_s = 0\n", "timeout_s"),
        ('[models.mistral]\ntimeout_s = "soon"\n', "timeout_s"),
        ("[models.mistral]\nendpoint = ['x']\n", "'endpoint'"),
        ("[models]\n", "models"),
        ('models = "mistral"\n', "models"),
        ('[models]\nmistral = "gpu1"\n', "mistral"),
    ],
)
def test_bad_models(tmp_path: Path, text: str, needle: str) -> None:
    assert needle in _error(_toml(tmp_path, text), {})


def test_unquoted_dotted_model_id_is_not_silently_misread(tmp_path: Path) -> None:
    # [models.llama3.1] is TOML for models -> llama3 -> "1": it must fail, not serve "llama3".
    assert "'1'" in _error(_toml(tmp_path, "[models.llama3.1]\n"), {})


def test_zero_batch_window_is_refused_naming_the_env_var(tmp_path: Path) -> None:
    # Faust's take() with a zero window would wait for a full batch forever.
    with pytest.raises(ConfigError, match="NEXUS_WORKER_MAX_WAIT_MS"):
        config = tmp_path / "nexus.toml"
        config.write_text("")
        load_settings(config, {"NEXUS_WORKER_MAX_WAIT_MS": "0"})


def test_endpoint_tables_fallback_and_cache_policy(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        """
        [models."llama3.1"]
        fallback = "mistral"
        retries = 4
        cache = "off"
        endpoints = [
          { url = "gpu1:11434", weight = 2.0, max_concurrency = 8, max_rps = 5 },
          "gpu2:11434",
        ]

        [models.mistral]
        """,
    )
    llama = load_settings(path, environ={}).model("llama3.1")
    assert llama is not None
    assert llama.endpoints == (
        EndpointSettings("http://gpu1:11434", weight=2.0, max_concurrency=8, max_rps=5.0),
        EndpointSettings("http://gpu2:11434"),
    )
    assert (llama.fallback, llama.retries, llama.cache) == ("mistral", 4, "off")


@pytest.mark.parametrize(
    "body, names",
    [
        ('[models.a]\nfallback = "b"\n', "fallback"),
        ('[models.a]\nfallback = "a"\n', "fallback"),
        ('[models.a]\ncache = "always"\n', "cache"),
        ('[models.a]\nendpoints = [{ url = "x", max_concurrency = 0 }]\n', "endpoints[0]"),
        ('[models.a]\nendpoints = [{ url = "x", speed = 3 }]\n', "speed"),
        ('[models.a]\nendpoints = [{ weight = 1 }]\n', "endpoints[0]"),
    ],
)
def test_bad_model_tables_name_the_key(tmp_path: Path, body: str, names: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(names)):
        load_settings(_toml(tmp_path, body), environ={})


def test_processing_guarantee_defaults_to_at_least_once_and_readers_follow_it(tmp_path: Path) -> None:
    default = load_settings(_toml(tmp_path, ""), environ={})
    assert default.kafka.processing_guarantee == "at_least_once"
    assert default.kafka.isolation_level == "read_uncommitted"
    path = _toml(tmp_path, '[kafka]\nprocessing_guarantee = "exactly_once"\n', "eos.toml")
    assert load_settings(path, environ={}).kafka.isolation_level == "read_committed"
    env = load_settings(path, environ={"NEXUS_KAFKA_PROCESSING_GUARANTEE": "at_least_once"})
    assert env.kafka.isolation_level == "read_uncommitted"


def test_unknown_processing_guarantee_is_refused_naming_the_choices(tmp_path: Path) -> None:
    message = _error(_toml(tmp_path, ""), {"NEXUS_KAFKA_PROCESSING_GUARANTEE": "exactly-once"})
    assert "NEXUS_KAFKA_PROCESSING_GUARANTEE" in message
    assert "at_least_once, exactly_once" in message and "'exactly-once'" in message


def test_endpoint_kind_defaults_to_ollama_and_an_openai_url_is_the_servers_base(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        """
        [models.a]
        endpoints = [
          "gpu1:11434",
          { url = "http://vllm:8000/v1/", kind = "openai", max_concurrency = 16 },
          { url = "http://llamacpp:8080", kind = "openai" },
          { url = "http://gpu2:11434", kind = "ollama" },
        ]
        """,
    )
    a = load_settings(path, environ={}).model("a")
    assert a is not None
    assert a.endpoints == (
        EndpointSettings("http://gpu1:11434"),
        EndpointSettings("http://vllm:8000", max_concurrency=16, kind="openai"),
        EndpointSettings("http://llamacpp:8080", kind="openai"),
        EndpointSettings("http://gpu2:11434", kind="ollama"),
    )
    assert [e.kind for e in a.endpoints] == ["ollama", "openai", "openai", "ollama"]


@pytest.mark.parametrize("kind", ['"vllm"', '"OpenAI"', "1", '""'])
def test_an_unknown_endpoint_kind_names_the_endpoint_and_the_kinds(tmp_path: Path, kind: str) -> None:
    path = _toml(tmp_path, f'[models.a]\nendpoints = ["gpu1:1", {{ url = "http://vllm:8000", kind = {kind} }}]\n')
    message = _error(path, {})
    assert "[models.'a'] endpoints[1] (http://vllm:8000) kind" in message
    assert "'ollama', 'openai'" in message


def test_one_server_url_has_one_kind_across_models(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        """
        [models.a]
        endpoints = ["http://h:11434"]
        [models.b]
        endpoints = [{ url = "http://h:11434/v1", kind = "openai" }]
        """,
    )
    message = _error(path, {})
    assert "http://h:11434" in message and "'a'" in message and "'b'" in message and "one kind" in message
