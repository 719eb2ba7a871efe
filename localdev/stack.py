"""``nexus up``: the whole stack on one machine, each role in its own process."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

import httpx

from nexus.settings import ConfigError, Settings


def ollama_answers(url: str, timeout_s: float = 1.0) -> bool:
    try:
        return httpx.get(f"{url}/api/version", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def _role(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "nexus", name, *args]


def run_stack(settings: Settings, args: argparse.Namespace) -> int:
    """Start Kafka (unless --bootstrap), the simulator (if Ollama is away), worker, gateway, bridge.

    Returns when interrupted or when any role exits, after stopping the rest.
    """
    from localdev.broker import LocalKafka, default_data_dir

    if args.bootstrap is None and settings.kafka.security_protocol != "PLAINTEXT":
        raise ConfigError(
            f"nexus up runs a PLAINTEXT broker, but kafka.security_protocol is "
            f"{settings.kafka.security_protocol!r}: pass --bootstrap for your secured cluster"
        )
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
    try:
        ollama = urlparse(settings.ollama_host)
        if not ollama_answers(settings.ollama_host):
            if ollama.hostname not in ("localhost", "127.0.0.1"):
                print(f"nexus: warning: no Ollama answers at {settings.ollama_host}", file=sys.stderr)
            else:
                print(
                    "\n"
                    "nexus: ************************************************************\n"
                    f"nexus: no Ollama at {settings.ollama_host}: starting the SIMULATOR.\n"
                    "nexus: Answers are SIMULATED, not from a real model.\n"
                    "nexus: ************************************************************\n",
                    file=sys.stderr,
                )
                models = ",".join(settings.model_ids)
                children.append(("simulator", subprocess.Popen(_role(
                    "simulate-ollama", "--host", ollama.hostname, "--port", str(ollama.port or 11434),
                    "--models", models))))
        children.append(("worker", subprocess.Popen(_role("worker", *common))))
        children.append(("gateway", subprocess.Popen(_role("gateway", *common))))
        children.append(("bridge", subprocess.Popen(_role("bridge", *common))))
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
        if kafka is not None:
            kafka.stop()
