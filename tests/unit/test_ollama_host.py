"""OLLAMA_HOST means what it means to Ollama's official clients, and `nexus up` knows a local one.

Every case is checked against the official Python client's own parser
(``ollama._client._parse_host``, installed with the ``test`` extra), so the table holds by
construction; the literal expectations keep it readable and catch a client that changes.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from localdev.stack import backend_for
from nexus.ollama_host import OllamaHostError, connect_url, is_local, parse_ollama_host
from nexus.settings import ConfigError, load_settings

official_parse_host: Callable[[str | None], str] = importlib.import_module("ollama._client")._parse_host

CASES = [
    # unset, empty: Ollama's default
    (None, "http://127.0.0.1:11434"),
    ("", "http://127.0.0.1:11434"),
    # a bare host gets Ollama's port, not 80
    ("0.0.0.0", "http://0.0.0.0:11434"),
    ("localhost", "http://localhost:11434"),
    ("1.2.3.4", "http://1.2.3.4:11434"),
    ("example.com", "http://example.com:11434"),
    # host:port
    ("0.0.0.0:11434", "http://0.0.0.0:11434"),
    ("1.2.3.4:56789", "http://1.2.3.4:56789"),
    ("example.com:56789", "http://example.com:56789"),
    # :port alone is the loopback
    (":11434", "http://127.0.0.1:11434"),
    (":56789", "http://127.0.0.1:56789"),
    ("http://:5000", "http://127.0.0.1:5000"),
    # a scheme gives its own default port
    ("http://example.com", "http://example.com:80"),
    ("https://example.com", "https://example.com:443"),
    ("https://example.com:56789", "https://example.com:56789"),
    ("http://0.0.0.0", "http://0.0.0.0:80"),
    # a scheme alone: what follows "://" is empty, so the whole text is read as a host
    ("http://", "http://http:11434"),
    ("https://", "http://https:11434"),
    # paths kept, trailing slashes dropped
    ("example.com/", "http://example.com:11434"),
    ("example.com:56789/", "http://example.com:56789"),
    ("example.com/path", "http://example.com:11434/path"),
    ("example.com:56789/path/", "http://example.com:56789/path"),
    ("https://example.com:56789/path", "https://example.com:56789/path"),
    ("https://example.com/a/b/", "https://example.com:443/a/b"),
    # IPv6
    ("[::1]", "http://[::1]:11434"),
    ("[::]:11434", "http://[::]:11434"),
    ("[0001:002:003:0004::1]:56789", "http://[0001:002:003:0004::1]:56789"),
    ("http://[::1]", "http://[::1]:80"),
    ("https://[::1]", "https://[::1]:443"),
    ("[::1]/", "http://[::1]:11434"),
    ("[::1]:56789/path/", "http://[::1]:56789/path"),
    # port 0 is "no port"
    ("example.com:0", "http://example.com:11434"),
]


@pytest.mark.parametrize(("value", "expected"), CASES)
def test_ollama_host_is_read_as_the_official_client_reads_it(value: str | None, expected: str) -> None:
    assert official_parse_host(value) == expected
    assert parse_ollama_host(value) == expected
    assert parse_ollama_host(expected) == expected  # endpoints re-read a parsed host: no drift


@pytest.mark.parametrize("value", ["::1", "example.com:99999", "example.com:port", "[::1", "example.com:-1"])
def test_what_the_official_client_refuses_is_refused(value: str) -> None:
    with pytest.raises(ValueError):
        official_parse_host(value)
    with pytest.raises(OllamaHostError, match="not a host"):
        parse_ollama_host(value)


def test_surrounding_spaces_and_quotes_are_ignored_as_by_the_ollama_server() -> None:
    # envconfig.Var in Ollama's Go code trims both; a systemd Environment="OLLAMA_HOST=..." keeps them.
    assert parse_ollama_host(' "0.0.0.0:8000" ') == "http://0.0.0.0:8000"
    assert parse_ollama_host("'gpu1'\n") == "http://gpu1:11434"


HOSTS = st.one_of(
    st.text(alphabet="ab01:./[]@", max_size=16),
    st.builds(lambda scheme, rest: scheme + rest, st.sampled_from(["http://", "https://", "ftp://"]),
              st.text(alphabet="ab019:./[]", max_size=12)),
)


@given(HOSTS)
def test_any_host_text_gives_the_official_clients_url_or_is_refused_like_it(value: str) -> None:
    try:
        expected = official_parse_host(value)
    except ValueError:
        with pytest.raises(OllamaHostError):
            parse_ollama_host(value)
        return
    assert parse_ollama_host(value) == expected


@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("http://0.0.0.0:11434", True),
        ("http://[::]:11434", True),
        ("http://localhost:11434", True),
        ("http://127.0.0.1:11434", True),
        ("http://127.1.2.3:11434", True),
        ("http://[::1]:11434", True),
        ("http://gpu1:11434", False),
        ("http://10.0.0.5:11434", False),
        ("https://ollama.example.com:443", False),
    ],
)
def test_local_hosts(url: str, local: bool) -> None:
    assert is_local(url) is local


def test_a_listen_address_is_dialled_at_the_loopback() -> None:
    assert connect_url("http://0.0.0.0:11434") == "http://127.0.0.1:11434"
    assert connect_url("http://[::]:8000/p") == "http://[::1]:8000/p"
    for kept in ("http://127.0.0.1:11434", "http://gpu1:11434", "https://[::1]:443", "http://localhost:1"):
        assert connect_url(kept) == kept


@pytest.mark.parametrize(
    ("ollama_host", "url", "local", "listen", "started"),
    [
        # OLLAMA_HOST=0.0.0.0 on a server: `nexus up` starts a local backend on every interface
        # and the roles dial 127.0.0.1.
        ("0.0.0.0", "http://127.0.0.1:11434", True, "0.0.0.0", "http://127.0.0.1:11434"),
        (":8000", "http://127.0.0.1:8000", True, "127.0.0.1", "http://127.0.0.1:8000"),
        ("localhost:9", "http://localhost:9", True, "localhost", "http://localhost:9"),
        ("127.0.0.2:9", "http://127.0.0.2:9", True, "127.0.0.2", "http://127.0.0.2:9"),
        ("[::1]:9", "http://[::1]:9", True, "127.0.0.1", "http://127.0.0.1:9"),
        ("[::]:9", "http://[::1]:9", True, "127.0.0.1", "http://127.0.0.1:9"),
        ("gpu1", "http://gpu1:11434", False, "gpu1", "http://gpu1:11434"),
    ],
)
def test_nexus_up_sees_a_local_ollama_host(ollama_host: str, url: str, local: bool, listen: str,
                                           started: str) -> None:
    backend = backend_for(parse_ollama_host(ollama_host))
    assert (backend.url, backend.local, backend.listen_host, backend.started_url) == (url, local, listen, started)


def _settings_file(tmp_path: Path, text: str = "") -> Path:
    path = tmp_path / "nexus.toml"
    path.write_text(text)
    return path


def test_settings_read_ollama_host_and_ollama_endpoints_alike(tmp_path: Path) -> None:
    path = _settings_file(tmp_path, '[models.a]\nendpoints = ["gpu1", { url = "http://gpu2" }, '
                                    '{ url = "vllm:8000/v1", kind = "openai" }]\n[models.b]\n')
    settings = load_settings(path, environ={"OLLAMA_HOST": "0.0.0.0"})
    assert settings.ollama_host == "http://0.0.0.0:11434"
    a, b = settings.models
    # An Ollama endpoint is read as OLLAMA_HOST is; an OpenAI-compatible base URL is left as written.
    assert a.urls == ("http://gpu1:11434", "http://gpu2:80", "http://vllm:8000")
    assert b.urls == ("http://0.0.0.0:11434",)
    # An empty OLLAMA_HOST is unset, for Ollama's clients and for Nexus.
    assert load_settings(_settings_file(tmp_path), environ={"OLLAMA_HOST": ""}).ollama_host == "http://127.0.0.1:11434"


@pytest.mark.parametrize(
    ("text", "environ", "where"),
    [
        ("", {"OLLAMA_HOST": "gpu1:99999"}, "environment variable OLLAMA_HOST"),
        ('ollama_host = "[::1"\n', {}, "nexus.toml: ollama_host"),
        ("ollama_host = 11434\n", {}, "nexus.toml: ollama_host"),
        ('[models.a]\nendpoints = ["gpu1:port"]\n', {}, "endpoints[0]"),
    ],
)
def test_a_host_no_client_accepts_is_a_config_error_naming_where(tmp_path: Path, text: str,
                                                                 environ: dict[str, str], where: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(where)):
        load_settings(_settings_file(tmp_path, text), environ=environ)
