"""The ``nexus`` command line: options taken as the docs write them, and every role's logging options."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from nexus import logs
from nexus.cli import build_parser, main, values_as_written
from nexus.settings import ConfigError
from producers.client import ResponseTimeoutError
from producers.submit import InvalidInputError, print_as_answered, requests_from_lines
from schemas import InferenceRequest, InferenceResponse, ModelContext, utcnow


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """main() configures the process's logging, as a role does; put pytest's back after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in logs.NOISY_LOGGERS}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, old in levels.items():
        logging.getLogger(name).setLevel(old)
    logging.captureWarnings(False)


# --------------------------------------------------------------------------- relative times


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["replay", "--since", "-15m"], ["replay", "--since=-15m"]),
        (["replay", "--since", "-15m", "--until", "-1h", "--join"], ["replay", "--since=-15m", "--until=-1h", "--join"]),
        (["replay", "--grace", "-.5"], ["replay", "--grace=-.5"]),
        (["--config", "x.toml", "replay", "--since=-2d"], ["--config", "x.toml", "replay", "--since=-2d"]),
        # Nothing else changes meaning: "-" is stdin, a flag stays a flag, "--" ends the options.
        (["submit", "--model", "m", "-"], ["submit", "--model", "m", "-"]),
        (["submit", "--json", "-5"], ["submit", "--json", "-5"]),
        (["replay", "--since", "--join"], ["replay", "--since", "--join"]),
        (["submit", "--model", "m", "--", "--since", "-1h"], ["submit", "--model", "m", "--", "--since", "-1h"]),
    ],
)
def test_a_value_starting_with_a_dash_is_kept_with_its_option(argv: list[str], expected: list[str]) -> None:
    assert values_as_written(build_parser(), argv) == expected


def test_replay_takes_since_and_until_as_the_docs_write_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import consumers.replay.cli as replay
    from consumers.replay.audit import parse_time

    seen: dict[str, Any] = {}

    def fake_run(args: argparse.Namespace, settings: Any) -> int:
        seen["since"], seen["until"] = args.since, args.until
        seen["range"] = replay.options_from_args(args).selection
        return 0

    monkeypatch.setattr(replay, "run", fake_run)
    assert main(["replay", "--since", "-15m", "--until", "-5m", "--bootstrap", "127.0.0.1:1"]) == 0
    assert (seen["since"], seen["until"]) == ("-15m", "-5m")
    selection = seen["range"]
    assert selection.since_ms is not None and selection.until_ms is not None
    assert selection.until_ms - selection.since_ms == pytest.approx(10 * 60_000, abs=2_000)
    assert abs(selection.since_ms - parse_time("-15m")) < 2_000


# --------------------------------------------------------------------------- logging options


ROLES = ["up", "kafka", "ollama", "worker", "gateway", "bridge", "simulate-ollama", "submit", "replay", "config",
         "new-key"]


def test_every_command_takes_the_log_options() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(ROLES) <= set(commands)
    for name, command in commands.items():
        options = {o for a in command._actions for o in a.option_strings}
        assert {"--log-level", "--log-format"} <= options, name


def test_the_worker_keeps_its_loglevel_spelling() -> None:
    args = build_parser().parse_args(["worker", "--loglevel", "warn"])
    assert logs.resolve(args.log_level, args.log_format, {}).level == "warning"
    args = build_parser().parse_args(["worker", "--log-level", "DEBUG"])
    assert logs.resolve(args.log_level, args.log_format, {}).level == "debug"


def test_flags_beat_the_environment_which_beats_the_defaults() -> None:
    assert logs.resolve(None, None, {}) == logs.LogSettings("info", "text", "default", "default")
    env = {"NEXUS_LOG_LEVEL": "WARN", "NEXUS_LOG_FORMAT": "json"}
    assert logs.resolve(None, None, env) == logs.LogSettings(
        "warning", "json", "env NEXUS_LOG_LEVEL", "env NEXUS_LOG_FORMAT")
    assert logs.resolve("error", "text", env) == logs.LogSettings("error", "text", "--log-level", "--log-format")
    with pytest.raises(ConfigError, match="NEXUS_LOG_LEVEL"):
        logs.resolve(None, None, {"NEXUS_LOG_LEVEL": "loud"})
    with pytest.raises(ConfigError, match="NEXUS_LOG_FORMAT"):
        logs.resolve(None, None, {"NEXUS_LOG_FORMAT": "xml"})


def test_a_bad_log_level_in_the_environment_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NEXUS_LOG_LEVEL", "loud")
    assert main(["new-key", "x"]) == 2
    assert "NEXUS_LOG_LEVEL" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("level", "nexus", "libraries"),
    [
        ("info", logging.INFO, logging.WARNING),  # INFO shows "listening", not every Kafka heartbeat
        ("warning", logging.WARNING, logging.WARNING),
        ("error", logging.ERROR, logging.ERROR),
        ("debug", logging.DEBUG, logging.DEBUG),
    ],
)
def test_the_noisy_libraries_stay_at_warning_unless_debugging(level: str, nexus: int, libraries: int) -> None:
    logs.configure(logs.LogSettings(level=level), stream=io.StringIO())
    assert logging.getLogger("producers.gateway.app").getEffectiveLevel() == nexus
    for name in ("aiokafka", "aiokafka.consumer.fetcher", "faust", "faust.app", "mode", "websockets.server", "httpx"):
        assert logging.getLogger(name).getEffectiveLevel() == libraries, name


def test_json_records_are_one_object_per_line_with_the_exception() -> None:
    stream = io.StringIO()
    logs.configure(logs.LogSettings(level="info", format="json"), role="gateway", stream=stream)
    logging.getLogger("producers.gateway.app").info("gateway listening on http://%s:%d", "0.0.0.0", 3000)
    logging.getLogger("aiokafka").info("a heartbeat")  # below the libraries' level
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        logging.getLogger("streams.worker").exception("a task failed")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert {k: first[k] for k in ("level", "logger", "message", "role")} == {
        "level": "INFO", "logger": "producers.gateway.app", "message": "gateway listening on http://0.0.0.0:3000",
        "role": "gateway"}
    assert first["time"].endswith("Z") and len(first["time"]) == len("2025-01-31T12:00:00.123Z")
    assert second["level"] == "ERROR" and second["message"] == "a task failed"
    assert second["exception"].startswith("Traceback") and "RuntimeError: boom\nsecond line" in second["exception"]


def test_a_failure_is_one_json_record_in_json_format(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure(logs.LogSettings(level="critical", format="json"), role="gateway", stream=sys.stderr)
    logs.fail("nexus gateway: cannot listen on 0.0.0.0:3000 (gateway.port): Address already in use")  # said whatever the level
    [line] = capsys.readouterr().err.splitlines()
    assert json.loads(line)["message"].startswith("nexus gateway: cannot listen")
    logs.configure(logs.LogSettings(format="text"), stream=sys.stderr)
    logs.fail("nexus gateway: plain")
    assert capsys.readouterr().err == "nexus gateway: plain\n"


def test_a_parent_passes_its_logging_to_its_children() -> None:
    assert logs.environment(logs.LogSettings("debug", "json")) == {"NEXUS_LOG_LEVEL": "debug", "NEXUS_LOG_FORMAT": "json"}
    assert logs.resolve(None, None, logs.environment(logs.LogSettings("debug", "json"))).level == "debug"


# --------------------------------------------------------------------------- nexus submit -


def _request(request_id: str) -> InferenceRequest:
    return InferenceRequest(request_id, "m", "hi", ModelContext("s", {}))


class Printed(io.StringIO):
    """stdout that tells when something was written to it."""

    def __init__(self) -> None:
        super().__init__()
        self.written = asyncio.Event()

    def write(self, text: str) -> int:
        self.written.set()
        return super().write(text)


class FakeProducer:
    """'slow' is answered only once something was printed; 'lost' is never answered."""

    def __init__(self, out: Printed) -> None:
        self.out = out
        self.submitted: list[str] = []

    async def submit_and_wait(self, request: InferenceRequest, timeout_s: float) -> InferenceResponse:
        self.submitted.append(request.id)
        if request.id == "lost":
            raise ResponseTimeoutError(request.id, timeout_s, "kafka:9092")
        if request.id == "slow":
            await self.out.written.wait()
        return InferenceResponse(id=request.id, model_id="m", output=f"answer to {request.id}", context=request.context,
                                 status="ok", latency_ms=1, completed_at=utcnow())


async def test_submit_prints_each_answer_as_it_arrives_and_reports_a_timeout() -> None:
    out, err = Printed(), io.StringIO()
    producer = FakeProducer(out)
    requests = [_request("slow"), _request("lost"), _request("fast")]
    # If nothing printed before every answer was in, 'slow' would wait forever.
    code = await asyncio.wait_for(print_as_answered(producer, requests, 3.0, False, out, err), 10)  # type: ignore[arg-type]
    assert producer.submitted == ["slow", "lost", "fast"]  # submitted in input order
    assert out.getvalue() == "answer to fast\nanswer to slow\n"
    assert err.getvalue() == "nexus submit: request lost (m): no answer within 3s (--timeout); it stays submitted\n"
    assert code == 1


def test_submit_refuses_two_lines_with_one_id() -> None:
    lines = ['{"id": "a", "model_id": "m", "input": "x"}', '{"id": "b", "model_id": "m", "input": "y"}',
             '{"id": "a", "model_id": "m", "input": "z"}']
    with pytest.raises(InvalidInputError, match="line 3: request id 'a' is also on line 1"):
        requests_from_lines(lines, {"m"})
