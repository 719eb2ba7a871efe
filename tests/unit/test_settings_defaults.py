"""Each default is written once, on its dataclass field; the loader and the shipped file agree with it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from localdev.simulator.model import SimulatorConfig, SimulatorConfigError
from localdev.simulator.server import ApiError
from nexus.errors import NexusError
from nexus.settings import (
    DEFAULT_MODEL_IDS,
    ConfigError,
    EndpointSettings,
    ModelSettings,
    Settings,
    field_defaults,
    load_settings,
)

REPO = Path(__file__).resolve().parents[2]


def _load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "nexus.toml"
    path.write_text(text)
    return load_settings(path, environ={})


def test_field_defaults_are_the_declared_plain_defaults() -> None:
    assert field_defaults(EndpointSettings) == {"weight": 1.0, "max_concurrency": 4, "max_rps": None, "kind": "ollama"}
    defaults = field_defaults(ModelSettings)
    assert "id" not in defaults and "endpoints" not in defaults  # required fields have none
    assert defaults["timeout_s"] == 120.0


def test_a_bare_model_table_gets_the_dataclass_defaults(tmp_path: Path) -> None:
    settings = _load(tmp_path, '[models.m]\nendpoints = ["http://gpu:11434"]\n')
    assert settings.models == (ModelSettings("m", (EndpointSettings("http://gpu:11434"),)),)


def test_a_bare_endpoint_table_gets_the_dataclass_defaults(tmp_path: Path) -> None:
    settings = _load(tmp_path, '[models.m]\nendpoints = [{ url = "http://gpu:11434" }]\n')
    assert settings.models[0].endpoints == (EndpointSettings("http://gpu:11434"),)


def test_a_changed_field_default_reaches_the_loader(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The loader reads the field, not a copy of its value: change the field, the parsed model follows."""
    fields = {f.name: f for f in dataclasses.fields(ModelSettings)}
    monkeypatch.setattr(fields["retries"], "default", 9)
    settings = _load(tmp_path, '[models.m]\nendpoints = ["http://gpu:11434"]\n')
    assert settings.models[0].retries == 9


def test_without_a_models_section_the_default_models_use_the_ollama_host(tmp_path: Path) -> None:
    settings = _load(tmp_path, "")
    assert settings.model_ids == DEFAULT_MODEL_IDS
    assert settings.ollama_host == field_defaults(Settings)["ollama_host"]
    assert all(m.urls == (settings.ollama_host,) for m in settings.models)


def test_the_shipped_config_file_states_exactly_the_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no configs/nexus.toml here: built-in defaults only
    assert load_settings(REPO / "configs" / "nexus.toml", environ={}) == load_settings(environ={})


def test_the_simulator_serves_the_default_models() -> None:
    assert SimulatorConfig().models == DEFAULT_MODEL_IDS


def test_errors_are_nexus_errors_and_keep_their_value_error_base() -> None:
    assert issubclass(ConfigError, NexusError) and issubclass(ConfigError, ValueError)
    assert issubclass(SimulatorConfigError, NexusError) and issubclass(SimulatorConfigError, ValueError)
    assert issubclass(ApiError, NexusError)
    with pytest.raises(SimulatorConfigError, match="parallel"):
        SimulatorConfig(parallel=0)
