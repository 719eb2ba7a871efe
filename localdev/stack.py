"""``nexus up``: the whole stack on one machine, each role in its own process."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from nexus import logs
from nexus.ollama_host import DEFAULT_PORT, connect_url, is_local
from nexus.settings import DEFAULT_MODEL_IDS, ConfigError, Settings


def ollama_answers(url: str, timeout_s: float = 1.0) -> bool:
    try:
        return httpx.get(f"{url}/api/version", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def _role(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "nexus", name, *args]


def served_models(url: str, timeout_s: float = 2.0) -> list[str]:
    """The models an Ollama at ``url`` has (``/api/tags``), in its order; empty if it cannot say."""
    try:
        tags = httpx.get(f"{url}/api/tags", timeout=timeout_s).json()
        return [m["name"] for m in tags.get("models", []) if isinstance(m.get("name"), str)]
    except (httpx.HTTPError, ValueError, AttributeError, KeyError, TypeError):
        return []


SIMULATOR_BANNER = (
    "\n"
    "nexus: ************************************************************\n"
    "nexus: {why}: starting the SIMULATOR.\n"
    "nexus: Answers are SIMULATED, not from a real model.\n"
    "nexus: ************************************************************\n"
)


@dataclass(frozen=True)
class Backend:
    """Where ``nexus up`` looks for a model server, and where it starts one when it may."""

    url: str  # where an Ollama already running is asked: OLLAMA_HOST, 0.0.0.0 dialled as 127.0.0.1
    local: bool  # OLLAMA_HOST names this machine (localhost, 127.x, ::1, 0.0.0.0, ::): one may be started
    listen_host: str  # the address a started server listens on
    port: int
    started_url: str  # where the roles reach a server nexus up started


def backend_for(ollama_host: str) -> Backend:
    """``OLLAMA_HOST`` (as parsed) seen by ``nexus up``.

    ``0.0.0.0`` is this machine, as for ``ollama serve``: a server started for it listens on every
    interface and is dialled at 127.0.0.1. The local servers bind IPv4 sockets, so one started for
    an IPv6 local address (``[::1]``, ``[::]``) listens on, and is dialled at, 127.0.0.1.
    """
    split = urlsplit(ollama_host)
    host = split.hostname or "127.0.0.1"
    port = split.port or DEFAULT_PORT
    url = connect_url(ollama_host)
    if ":" in host:
        return Backend(url, is_local(ollama_host), "127.0.0.1", port, f"http://127.0.0.1:{port}")
    return Backend(url, is_local(ollama_host), host, port, url)


def models_for_roles(settings: Settings, backend_models: list[str]) -> str | None:
    """``NEXUS_MODELS`` for the roles: the backend's own models, unless models are configured.

    Models are configured by a ``[models]`` section or ``NEXUS_MODELS``; otherwise the
    built-in defaults (``llama3.1``, ``mistral``) would name models the backend may not
    have, so the roles serve what it has.
    """
    if not backend_models or settings.model_ids != DEFAULT_MODEL_IDS:
        return None
    return ",".join(backend_models)


def run_stack(settings: Settings, args: argparse.Namespace) -> int:
    """Start Kafka (unless --bootstrap), a model backend, the worker, gateway and bridge.

    The backend: the Ollama at ``OLLAMA_HOST`` if one answers; else, for a local host, a
    real Ollama with SmolLM2-135M built and cached by :mod:`localdev.ollama`; the
    simulator only when asked (``--simulate``) or when the real one cannot be provisioned.

    Returns when interrupted or when any role exits, after stopping the rest.
    """
    from localdev.broker import LocalKafka, default_data_dir

    if args.bootstrap is None and settings.kafka.security_protocol != "PLAINTEXT":
        raise ConfigError(
            f"nexus up runs a PLAINTEXT broker, but kafka.security_protocol is "
            f"{settings.kafka.security_protocol!r}: pass --bootstrap for your secured cluster"
        )
    backend = backend_for(settings.ollama_host)
    simulate = bool(getattr(args, "simulate", False))
    why = "asked for (--simulate)"
    existing = not simulate and ollama_answers(backend.url)
    real_local = not simulate and not existing and backend.local
    if args.bootstrap is None:
        # Before Ctrl-C is taken over below: the first run downloads the broker's jars (with
        # progress lines), and Ctrl-C must stop that at once; later runs find them cached.
        from localdev.broker import fetch_kafka

        fetch_kafka()
    if real_local:
        # Before Ctrl-C is taken over below: a first build takes minutes, and Ctrl-C must stop it.
        from localdev.ollama import LocalOllamaError, provision

        print(f"nexus: no Ollama at {backend.url}: starting a real local one "
              "(built and fetched once into the Nexus home; the first time takes minutes)", file=sys.stderr)
        try:
            provision()
        except LocalOllamaError as exc:
            real_local, simulate = False, True
            why = f"a real Ollama could not be provisioned ({exc})"
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    kafka = None
    if args.bootstrap is None:
        data = Path(args.kafka_data) if args.kafka_data else default_data_dir(args.kafka_port)
        kafka = LocalKafka(port=args.kafka_port, data_dir=data)
        kafka.start()
        print(f"nexus: Kafka ready on {kafka.bootstrap} (data in {data})", file=sys.stderr)
    bootstrap = kafka.bootstrap if kafka else settings.kafka.bootstrap
    common = ["--bootstrap", bootstrap] + (["--config", args.config] if args.config else [])

    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    local_ollama = None
    env = dict(os.environ)
    # The roles dial what was found or started (127.0.0.1 for OLLAMA_HOST=0.0.0.0), and log as up does.
    env["OLLAMA_HOST"] = backend.url
    if getattr(args, "log", None) is not None:
        env.update(logs.environment(args.log))
    try:
        models: list[str] = []
        if existing:
            models = served_models(backend.url)
            print(f"nexus: using the Ollama at {backend.url} (models: {', '.join(models) or 'none'})",
                  file=sys.stderr)
        elif real_local:
            from localdev.ollama import LocalOllama, LocalOllamaError

            local_ollama = LocalOllama(port=backend.port, host=backend.listen_host)
            env["OLLAMA_HOST"] = backend.started_url
            try:
                local_ollama.start()
                models = [local_ollama.model_name]
                print(f"nexus: real Ollama ready on {local_ollama.url} with {local_ollama.model_name}",
                      file=sys.stderr)
            except LocalOllamaError as exc:
                local_ollama, simulate = None, True
                why = f"the real Ollama did not start ({exc})"
        elif not simulate:
            print(f"nexus: warning: no Ollama answers at {backend.url}", file=sys.stderr)
        if simulate:
            print(SIMULATOR_BANNER.format(why=why), file=sys.stderr)
            env["OLLAMA_HOST"] = backend.started_url
            children.append(("simulator", subprocess.Popen(_role(
                "simulate-ollama", "--host", backend.listen_host, "--port", str(backend.port),
                "--models", ",".join(settings.model_ids)), env=env)))
        roles_models = models_for_roles(settings, models)
        if roles_models:
            env["NEXUS_MODELS"] = roles_models
            print(f"nexus: serving {roles_models} (configure [models] to choose)", file=sys.stderr)
        children.append(("worker", subprocess.Popen(_role("worker", *common), env=env)))
        children.append(("gateway", subprocess.Popen(_role("gateway", *common), env=env)))
        children.append(("bridge", subprocess.Popen(_role("bridge", *common), env=env)))
        print(
            f"nexus: gateway on http://localhost:{settings.gateway.port} "
            f"(POST /infer, GET /health, /metrics, /models; the live page at /); "
            f"websocket bridge on ws://localhost:{settings.bridge.port}{settings.bridge.path}; "
            "Ctrl-C stops everything",
            file=sys.stderr,
        )
        while not stop.wait(0.5):
            for name, proc in children:
                if proc.poll() is not None:
                    print(f"nexus: {name} exited with code {proc.returncode}; stopping", file=sys.stderr)
                    return 1
        return 0
    finally:
        for _, proc in reversed(children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in reversed(children):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if local_ollama is not None:
            local_ollama.stop()
        if kafka is not None:
            kafka.stop()
