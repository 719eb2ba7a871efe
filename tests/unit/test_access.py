"""API keys without I/O: the settings that configure them, the policy that decides, the bridge's owner memory."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from consumers.bridge.owners import SessionOwners
from nexus.access import AccessPolicy, Forbidden, Unauthenticated, bearer_token
from nexus.settings import AccessSettings, ApiKey, ConfigError, load_settings
from producers.gateway.access import error_body, is_open


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


ALPHA = ApiKey("alpha", bytes.fromhex(sha("alpha-token")))
BETA = ApiKey("beta", bytes.fromhex(sha("beta-token")), ("mistral",))
POLICY = AccessPolicy(AccessSettings((ALPHA, BETA)))
OPEN = AccessPolicy(AccessSettings())


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "nexus.toml"
    path.write_text(text)
    return path


def _error(path: Path | None, environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ=environ)
    return str(info.value)


# --------------------------------------------------------------------------- policy


def test_open_access_needs_no_token_and_allows_everything() -> None:
    assert not OPEN.enabled
    assert OPEN.authenticate(None) is None
    assert OPEN.authenticate_header("Basic whatever") is None
    OPEN.authorize(None, "llama3.1")
    assert OPEN.may_see(None, "alpha") and OPEN.may_see(None, None)
    assert OPEN.models_for(None, ["llama3.1", "mistral"]) == ["llama3.1", "mistral"]


def test_a_token_finds_its_key() -> None:
    assert POLICY.authenticate("alpha-token") is ALPHA
    assert POLICY.authenticate_header("Bearer beta-token") is BETA
    assert POLICY.authenticate_header("bearer   beta-token ") is BETA  # the scheme is case-insensitive


@pytest.mark.parametrize(
    "header, invalid",
    [(None, False), ("", False), ("Bearer wrong", True), ("Basic YWxwaGEtdG9rZW4=", True), ("Bearer", True),
     ("alpha-token", True)],
)
def test_a_missing_or_wrong_token_is_unauthenticated_without_echoing_it(header: str | None, invalid: bool) -> None:
    with pytest.raises(Unauthenticated) as info:
        POLICY.authenticate_header(header)
    assert info.value.status == 401
    assert info.value.invalid_token is invalid
    assert info.value.challenge.startswith('Bearer realm="nexus"')
    assert ("invalid_token" in info.value.challenge) is invalid
    if header and header != "Bearer":
        assert header.split()[-1] not in info.value.reason


def test_bearer_token_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token(None) is None


def test_a_key_limited_to_models_is_forbidden_the_others() -> None:
    POLICY.authorize(ALPHA, "llama3.1")
    POLICY.authorize(BETA, "mistral")
    with pytest.raises(Forbidden, match=r"API key 'beta' may not use model 'llama3.1'; it may use \['mistral'\]"):
        POLICY.authorize(BETA, "llama3.1")
    assert POLICY.models_for(BETA, ["llama3.1", "mistral"]) == ["mistral"]
    assert POLICY.models_for(ALPHA, ["llama3.1", "mistral"]) == ["llama3.1", "mistral"]


def test_a_key_sees_only_its_own_records_and_sessions() -> None:
    assert POLICY.owner(ALPHA) == "alpha" and POLICY.owner(None) is None
    assert POLICY.may_see(ALPHA, "alpha")
    assert not POLICY.may_see(ALPHA, "beta")
    assert not POLICY.may_see(ALPHA, None)  # records without an owner belong to no key
    assert POLICY.may_subscribe(ALPHA, frozenset())  # unknown session: allowed, records still filtered
    assert POLICY.may_subscribe(ALPHA, frozenset({"beta", "alpha"}))
    assert not POLICY.may_subscribe(ALPHA, frozenset({"beta"}))


def test_session_owners_remember_every_key_and_forget_the_oldest_sessions() -> None:
    owners = SessionOwners(max_sessions=2)
    owners.saw("s1", "alpha")
    owners.saw("s1", "beta")
    owners.saw("s2", None)
    assert owners.of("s1") == {"alpha", "beta"} and owners.of("s2") == {None}
    owners.saw("s1", "alpha")  # seen again: now the most recent
    owners.saw("s3", "alpha")
    assert owners.of("s2") == frozenset() and len(owners) == 2


def test_the_gateway_leaves_probes_the_page_and_docs_open() -> None:
    for path in ("/health", "/", "/config.json", "/openapi.json", "/api/version", "/static/nexus.js"):
        assert is_open(path), path
    for path in ("/infer", "/metrics", "/models", "/api/generate", "/api/tags", "/v1/models", "/v1/chat/completions"):
        assert not is_open(path), path


def test_error_bodies_take_each_apis_shape() -> None:
    missing = Unauthenticated("an API key is required", invalid_token=False)
    assert error_body("/infer", missing) == {"error": "an API key is required"}
    assert error_body("/api/chat", missing) == {"error": "an API key is required"}
    assert error_body("/v1/models", missing)["error"]["code"] == "missing_api_key"
    wrong = Unauthenticated("the API key is not valid", invalid_token=True)
    assert error_body("/v1/completions", wrong)["error"] == {
        "message": "the API key is not valid", "type": "invalid_request_error", "param": None, "code": "invalid_api_key",
    }
    assert error_body("/v1/chat/completions", Forbidden("no"))["error"]["type"] == "permission_error"


# --------------------------------------------------------------------------- settings


def test_no_keys_by_default(tmp_path: Path) -> None:
    assert not load_settings(_toml(tmp_path, ""), environ={}).access.enabled


def test_keys_from_toml(tmp_path: Path) -> None:
    path = _toml(tmp_path, f"""
[[access.keys]]
name = "team-a"
sha256 = "{sha('a').upper()}"

[[access.keys]]
name = "team-b"
sha256 = "{sha('b')}"
models = ["mistral"]
""")
    access = load_settings(path, environ={}).access
    assert access.keys == (ApiKey("team-a", bytes.fromhex(sha("a"))), ApiKey("team-b", bytes.fromhex(sha("b")), ("mistral",)))
    assert sha("a") not in repr(access), "the digests stay out of reprs (and so out of logged settings)"


def test_nexus_api_keys_env_replaces_the_file(tmp_path: Path) -> None:
    path = _toml(tmp_path, f'[[access.keys]]\nname = "file"\nsha256 = "{sha("f")}"\n')
    env = {"NEXUS_API_KEYS": f" ops:{sha('o')} ; team-b:{sha('b')}:mistral, llama3.1 ;"}
    keys = load_settings(path, environ=env).access.keys
    assert [(k.name, k.models) for k in keys] == [("ops", ()), ("team-b", ("mistral", "llama3.1"))]
    assert load_settings(path, environ={"NEXUS_API_KEYS": ""}).access.keys[0].name == "file"


def test_model_ids_with_colons_work_in_the_env_form(tmp_path: Path) -> None:
    env = {"NEXUS_MODELS": "llama3.1:8b,mistral", "NEXUS_API_KEYS": f"a:{sha('a')}:llama3.1:8b"}
    assert load_settings(_toml(tmp_path, ""), environ=env).access.keys[0].models == ("llama3.1:8b",)


@pytest.mark.parametrize(
    "env, needle",
    [
        (f"a:{sha('a')};a:{sha('b')}", "key name 'a' is given twice"),
        (f"a:{sha('a')};b:{sha('a')}", "key 'b' has the same token as another key"),
        ("a:", "(a) sha256: missing or empty"),
        (f"a:{sha('a')}:gpt-9", "(a) models: 'gpt-9' is not a configured model; known: ['llama3.1', 'mistral']"),
        (f"bad name:{sha('a')}", "NEXUS_API_KEYS[0] name: expected 1 to 64 letters"),
        ("just-a-name", "NEXUS_API_KEYS entry 0: expected name:sha256"),
    ],
)
def test_bad_keys_are_refused_with_where_and_why(tmp_path: Path, env: str, needle: str) -> None:
    assert needle in _error(_toml(tmp_path, ""), {"NEXUS_API_KEYS": env})


def test_a_plaintext_token_where_the_hash_belongs_is_refused_and_not_echoed(tmp_path: Path) -> None:
    message = _error(_toml(tmp_path, ""), {"NEXUS_API_KEYS": "a:my-plaintext-secret"})
    assert "expected 64 hex digits, the SHA-256 of the token" in message
    assert "my-plaintext-secret" not in message
    path = _toml(tmp_path, '[[access.keys]]\nname = "a"\ntoken = "my-plaintext-secret"\n')
    message = _error(path, {})
    assert "unknown key 'token'" in message and "never the token" in message
    assert "my-plaintext-secret" not in message


def test_access_section_shape_is_checked(tmp_path: Path) -> None:
    assert "[access] holds only keys" in _error(_toml(tmp_path, "[access]\nopen = true\n"), {})
    assert "must be a table" in _error(_toml(tmp_path, "[access]\nkeys = [1]\n"), {})


def test_new_key_prints_a_token_and_config_lines_that_accept_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nexus.cli import main

    assert main(["new-key", "team-c", "--models", "mistral"]) == 0
    out = capsys.readouterr().out
    token = out.split("it is not stored anywhere): ", 1)[1].split()[0]
    env_line = out.rsplit("): ", 1)[1].strip()
    toml = out.split("configs/nexus.toml:\n", 1)[1].split("\n\n", 1)[0]
    assert token not in env_line and token not in toml
    for settings in (load_settings(_toml(tmp_path, ""), environ={"NEXUS_API_KEYS": env_line}),
                     load_settings(_toml(tmp_path, toml), environ={})):
        key = AccessPolicy(settings.access).authenticate(token)
        assert key is not None and (key.name, key.models) == ("team-c", ("mistral",))
