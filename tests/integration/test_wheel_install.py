"""What a user gets from the wheel: built from this source tree, installed into a fresh venv
elsewhere, ``nexus up`` runs the whole stack from any directory, keeping its state in the
user-level Nexus home (``$NEXUS_HOME``).

Nothing here runs from the checkout: the wheel is built from a copy of the source tree (so
the build writes nothing into the checkout either), installed with its dependencies from
PyPI (pip's cache makes that quick) at the versions in constraints.txt, and run from an
empty directory with an environment that does not name the checkout. The home starts empty:
the first run fetches the broker jars with ``mvn`` (from ~/.m2 when warm) and says so. The
backend is the simulator (``--simulate``): building the real Ollama into a fresh home takes
minutes, and tests/integration/test_up.py covers ``nexus up`` with the real one.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement

from localdev.broker import KAFKA_VERSION, free_port
from tests.eventually import eventually
from tests.integration.support import REPO, TopicReader, wait_for_responses
from tests.integration.test_pipeline import SEED_BODY, simulated

TOP_LEVEL = ("nexus", "schemas", "streams", "producers", "consumers", "localdev")
# Never part of a source tree: local caches, environments and earlier build output.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", ".cache", "build", "dist", "*.egg-info", "__pycache__", ".mypy_cache", ".ruff_cache",
    ".pytest_cache", ".hypothesis", "data", "*.pyc",
)


def _run(cmd: list[str], timeout: float, **kwargs: object) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return str(proc.stdout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this source tree, built as a user would (`pip wheel`, isolated build)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE, symlinks=True)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q",
          "-w", str(work / "dist"), str(source)], timeout=300)
    [built] = (work / "dist").glob("nexus_inference-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (no system site-packages) with the wheel and its dependencies installed."""
    path = tmp_path_factory.mktemp("venv") / "venv"
    _run([sys.executable, "-m", "venv", str(path)], timeout=120)
    _run([str(path / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q",
          "-c", str(REPO / "constraints.txt"), str(wheel)], timeout=600)
    return path


def test_the_wheel_carries_its_data_license_and_type_hints(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        [metadata] = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = archive.read(metadata).decode()
    assert "localdev/kafka_pom.xml" in names  # `nexus kafka` / `nexus up` fetch the broker with it
    assert "schemas/avro/InferenceRequest.v1.avsc" in names
    assert "producers/gateway/static/index.html" in names
    assert {f"{package}/py.typed" for package in TOP_LEVEL} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith("tests/") for n in names)
    assert "License-Expression: Apache-2.0" in meta
    for classifier in ("Typing :: Typed", "Framework :: AsyncIO", "Programming Language :: Python :: 3.11"):
        assert f"Classifier: {classifier}" in meta
    requires = {r.name: r.specifier for r in map(Requirement, re.findall(r"^Requires-Dist: (.+)$", meta, re.M))}
    for patched in ("faust-streaming", "aiokafka"):  # Nexus patches their internals: bounded above
        assert any(spec.operator == "<" for spec in requires[patched]), requires[patched]


def _site_packages(venv: Path) -> Path:
    paths = sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})
    return Path(paths["purelib"])


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and mtime: what changed shows as a difference."""
    return {
        str(path.relative_to(root)): (stat.st_size, stat.st_mtime_ns)
        for path in root.rglob("*") if path.is_file() and (stat := path.stat())
    }


@pytest.fixture()
def user_env(tmp_path: Path, venv: Path) -> dict[str, str]:
    """A user's shell: the venv's bin first on PATH, no trace of the checkout or its venv."""
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and not p.startswith(str(REPO))]
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("NEXUS_", "PYTHON", "VIRTUAL_ENV", "PYTEST", "OLLAMA_")) and str(REPO) not in v
    }
    env.update(PATH=os.pathsep.join([str(venv / "bin"), *path]), NEXUS_HOME=str(tmp_path / "home"),
               PYTHONUNBUFFERED="1")
    return env


async def test_nexus_up_from_the_installed_wheel_serves_and_keeps_its_state_in_the_home(
    tmp_path: Path, venv: Path, user_env: dict[str, str]
) -> None:
    home, cwd = Path(user_env["NEXUS_HOME"]), tmp_path / "anywhere"
    cwd.mkdir()
    python = str(venv / "bin" / "python")
    where = _run([python, "-c", "import localdev, nexus; print(nexus.__file__); print(localdev.__file__)"],
                 timeout=60, cwd=cwd, env=user_env)
    site = _site_packages(venv)
    assert all(Path(line).is_relative_to(site) for line in where.split()), where  # the wheel, not the source
    kafka_port, gateway_port, bridge_port, ollama_port = free_port(), free_port(), free_port(), free_port()
    env = {
        **user_env,
        "OLLAMA_HOST": f"http://127.0.0.1:{ollama_port}",  # the simulator's port (--simulate)
        "NEXUS_GATEWAY_HOST": "127.0.0.1",
        "NEXUS_GATEWAY_PORT": str(gateway_port),
        "NEXUS_BRIDGE_PORT": str(bridge_port),
        "NEXUS_WORKER_WEB_PORT": str(free_port()),
        "NEXUS_KAFKA_SESSION_TIMEOUT_MS": "6000",
    }
    installed = _snapshot(site)
    checkout = sorted(os.listdir(REPO))
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        up = subprocess.Popen([str(venv / "bin" / "nexus"), "up", "--simulate", "--kafka-port", str(kafka_port)],
                              cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)

    def said() -> str:
        return "nexus up's output:\n" + log.read_text(errors="replace")[-4000:]

    gateway = f"http://127.0.0.1:{gateway_port}"
    try:
        async with httpx.AsyncClient(timeout=5) as http:

            async def healthy() -> bool:
                assert up.poll() is None, f"nexus up exited with {up.returncode}"
                return (await http.get(f"{gateway}/health")).status_code == 200

            await eventually(healthy, "the gateway of the installed nexus up answers /health with 200",
                             timeout=180, interval=0.2, context=said)
            page = await http.get(f"{gateway}/", headers={"Accept": "text/html"})  # the live page
            assert page.status_code == 200 and "<html" in page.text.lower()  # static files came with the wheel
            async with TopicReader(f"127.0.0.1:{kafka_port}", "inference.responses") as responses:
                reply = await http.post(f"{gateway}/infer", json=SEED_BODY)
                assert reply.status_code == 202, reply.text
                answers = await wait_for_responses(responses, {SEED_BODY["id"]})
        assert answers.by_id[SEED_BODY["id"]][0].output == simulated("llama3.1", "Hello, world!")
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(timeout=60)
    assert code == 0, said()

    output = log.read_text(errors="replace")
    libs = home / "kafka" / KAFKA_VERSION / "libs"
    # The first run said it was downloading, where to, and when it was done.
    assert f"fetching the Kafka {KAFKA_VERSION} broker jars" in output and "(first run only)" in output, said()
    assert f"jars ready in {libs}" in output, said()
    # Everything it keeps is in the home: the jars, the broker's data, the worker's tables.
    assert (libs / ".fetch-complete").is_file() and any(libs.glob("kafka_*.jar"))
    assert (home / "kafka-data" / str(kafka_port) / "logs" / "meta.properties").is_file()
    assert (home / "faust" / "nexus-worker").is_dir()
    # And nowhere else: not the directory it ran in, not the installed package, not the checkout.
    assert sorted(os.listdir(cwd)) == []
    assert _snapshot(site) == installed
    assert sorted(os.listdir(REPO)) == checkout
