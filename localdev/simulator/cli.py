"""Simulator command line, shared by ``python -m localdev.simulator`` and ``nexus simulate-ollama``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Sequence

from localdev.simulator.model import SimulatorConfig

_DEFAULTS = SimulatorConfig()


def _models(value: str) -> tuple[str, ...]:
    models = tuple(m.strip() for m in value.split(",") if m.strip())
    if not models:
        raise argparse.ArgumentTypeError("at least one model name is required")
    return models


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the simulator's options on ``parser`` (host/port plus every config knob)."""
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    parser.add_argument("--port", type=int, default=11434, help="port (default: %(default)s)")
    parser.add_argument(
        "--models",
        type=_models,
        default=_DEFAULTS.models,
        help=f"comma-separated model ids to serve (default: {','.join(_DEFAULTS.models)})",
    )
    parser.add_argument(
        "--ttft-ms", type=float, default=_DEFAULTS.ttft_ms, help="time to first token in ms"
    )
    parser.add_argument(
        "--tokens-per-s",
        type=float,
        default=_DEFAULTS.tokens_per_s,
        help="generation speed; 0 or inf = no delay between tokens",
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=_DEFAULTS.parallel,
        help="concurrent generations, like OLLAMA_NUM_PARALLEL",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=_DEFAULTS.max_queue,
        help="waiting requests before 503, like OLLAMA_MAX_QUEUE",
    )
    parser.add_argument(
        "--fail-rate",
        type=float,
        default=_DEFAULTS.fail_rate,
        help="fraction of generate/chat requests answered with HTTP 500",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the fail-rate RNG")
    parser.add_argument(
        "--no-tools",
        type=_models,
        default=_DEFAULTS.no_tools,
        metavar="MODEL[,MODEL]",
        help="served models without tool support: a chat offering them tools gets Ollama's 400 "
        "'<registry name> does not support tools' (as smollm2:135m does)",
    )
    parser.add_argument(
        "--record-bodies",
        type=int,
        default=_DEFAULTS.record_bodies,
        metavar="N",
        help="request bodies kept per endpoint path, shown at GET /simulator/stats "
        "as received_bodies (default: %(default)s; 0 keeps none)",
    )


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """Build the config from parsed arguments (raises SimulatorConfigError, a ValueError, on
    out-of-range values)."""
    return SimulatorConfig(
        models=tuple(args.models),
        ttft_ms=args.ttft_ms,
        tokens_per_s=args.tokens_per_s,
        parallel=args.parallel,
        max_queue=args.max_queue,
        fail_rate=args.fail_rate,
        seed=args.seed,
        no_tools=tuple(args.no_tools),
        record_bodies=args.record_bodies,
    )


async def _serve_until_signalled(config: SimulatorConfig, host: str, port: int) -> None:
    """SIGTERM (what process managers and benchmarks send) shuts down cleanly, like Ctrl-C."""
    from localdev.simulator.server import serve  # keeps aiohttp out of argument handling

    task = asyncio.current_task()
    assert task is not None
    with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await serve(config, host, port)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments and serve until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m localdev.simulator",
        description="Simulated Ollama server (answers are fake, for tests and benchmarks).",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    return run(config, args.host, args.port)


def run(config: SimulatorConfig, host: str = "127.0.0.1", port: int = 11434) -> int:
    """Blocking entry point: serve until Ctrl-C or SIGTERM, then return exit status 0."""
    try:
        asyncio.run(_serve_until_signalled(config, host, port))
    except KeyboardInterrupt:
        pass
    return 0
