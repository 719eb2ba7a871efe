"""The house rules of docs/architecture.md, held by a test: which role may import which.

The worker (``streams``) and the edges (``producers``, ``consumers``) meet only through
Kafka topics and the wire contract (``schemas``), so each can be deployed and scaled
alone; ``nexus`` holds what they share; ``localdev`` is tooling for a developer's
machine that no running role depends on. Every import in every module is checked,
including imports inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("schemas", "nexus", "streams", "producers", "consumers", "localdev")

# Who may import whom; a package may always import itself. "x.*" is x and all below it,
# a name without ".*" is that module alone.
MAY_IMPORT: dict[str, set[str]] = {
    "schemas": {"nexus.errors"},
    "nexus": {"schemas.*"},
    "streams": {"schemas.*", "nexus.*"},
    "producers": {"schemas.*", "nexus.*"},
    # The producer API, the reader of the workers' queue reports (the bridge's queued frames) and
    # admission (the bridge's submits count against the same limits as the gateway's).
    "consumers": {"schemas.*", "nexus.*", "producers", "producers.client", "producers.queue", "producers.admission"},
    "localdev": {"schemas.*", "nexus.*"},
}
# The command line is where roles are put together: it may start any of them.
ANYTHING_GOES = {"nexus.cli", "nexus.__main__"}
# Decisions without I/O (tested in microseconds): no network, Kafka, HTTP or event loop in them.
PURE = {
    "schemas.validation", "schemas.endpoint_state", "schemas.headers", "schemas.records",
    "streams.commits.ledger", "streams.answering.routing", "streams.answering.cache",
    "streams.answering.prompt", "streams.answering.responses", "consumers.bridge.subscriptions",
    "consumers.bridge.owners", "consumers.bridge.core", "consumers.bridge.frames", "consumers.replay.audit",
    "consumers.replay.join", "consumers.replay.render", "producers.gateway.dropin.conversation",
    "localdev.simulator.model", "nexus.access", "streams.answering.scheduling", "schemas.queue_state",
    "producers.admission",
}
IO_MODULES = ("asyncio", "socket", "aiokafka", "aiohttp", "faust", "httpx", "websockets", "subprocess")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports, at any depth of the code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in MODULES)
    return names


def _allowed(importer: str, imported: str) -> bool:
    own = importer.split(".")[0]
    target = imported.split(".")[0]
    if target not in PACKAGES or target == own or importer in ANYTHING_GOES:
        return True
    for rule in MAY_IMPORT[own]:
        base = rule.removesuffix(".*")
        if imported == base or (rule.endswith(".*") and imported.startswith(base + ".")):
            return True
    return False


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_imports_only_what_its_role_may(name: str) -> None:
    broken = sorted(i for i in _imports(name, MODULES[name]) if not _allowed(name, i))
    assert not broken, f"{name} imports {broken}: see the import rules in docs/architecture.md"


@pytest.mark.parametrize("name", sorted(PURE))
def test_decisions_do_no_io(name: str) -> None:
    assert name in MODULES, f"{name} is listed as pure but does not exist"
    io = sorted(i for i in _imports(name, MODULES[name]) if i.split(".")[0] in IO_MODULES)
    assert not io, f"{name} decides, it should not do I/O, yet imports {io}"


def test_the_rules_catch_a_broken_import() -> None:
    """The checker itself: a worker module importing the gateway, or a consumer the gateway, is refused."""
    assert not _allowed("streams.app", "producers.gateway.app")
    assert not _allowed("consumers.bridge.server", "producers.replies")
    assert not _allowed("schemas.codec", "nexus.settings")
    assert not _allowed("producers.client", "localdev.broker")
    assert _allowed("consumers.bridge.server", "producers.client")
    assert _allowed("consumers.bridge.server", "producers")
    assert _allowed("nexus.cli", "streams.app")
