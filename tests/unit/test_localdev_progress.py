"""A first-run step as a child process: its output logged, progress lines, killed on timeout or Ctrl-C."""

from __future__ import annotations

import io
import subprocess
import sys
from typing import Any

import pytest

from localdev import progress
from localdev.progress import run_reporting
from nexus.errors import NexusError


class StepTookTooLong(NexusError):
    pass


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_output_is_logged_each_line_seen_and_progress_reported_while_it_runs() -> None:
    log, seen, lines = io.StringIO(), [], []
    code = run_reporting(
        _python("import time\nfor i in range(3):\n    print('step', i, flush=True); time.sleep(0.2)\nraise SystemExit(3)"),
        log, progress=lines.append, report=lambda elapsed: f"working: {len(seen)} lines so far",
        every_s=0.1, timeout_s=60, timed_out=lambda: StepTookTooLong("never"), on_line=seen.append, poll_s=0.05)
    assert code == 3
    assert log.getvalue() == "step 0\nstep 1\nstep 2\n" and seen == ["step 0\n", "step 1\n", "step 2\n"]
    assert lines and all(line.startswith("working: ") for line in lines)


@pytest.fixture()
def children(monkeypatch: pytest.MonkeyPatch) -> list[subprocess.Popen[str]]:
    """Every child run_reporting starts, to check none is left running."""
    started: list[subprocess.Popen[str]] = []
    real = subprocess.Popen

    def recording(*args: Any, **kwargs: Any) -> subprocess.Popen[str]:
        started.append(real(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(progress.subprocess, "Popen", recording)
    return started


SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_a_step_past_its_timeout_is_killed_and_says_so(children: list[subprocess.Popen[str]]) -> None:
    with pytest.raises(StepTookTooLong):
        run_reporting(SLEEPER, io.StringIO(), progress=lambda line: None, report=str, every_s=10, timeout_s=0.3,
                      timed_out=lambda: StepTookTooLong("over 0.3 s"), poll_s=0.05)
    (child,) = children
    assert child.returncode is not None  # killed and reaped


def test_an_interrupt_leaves_no_child_behind(children: list[subprocess.Popen[str]]) -> None:
    def interrupt(elapsed: float) -> str:
        raise KeyboardInterrupt  # Ctrl-C arrives while the step runs

    with pytest.raises(KeyboardInterrupt):
        run_reporting(SLEEPER, io.StringIO(), progress=lambda line: None, report=interrupt, every_s=0.1,
                      timeout_s=60, timed_out=lambda: StepTookTooLong("never"), poll_s=0.05)
    (child,) = children
    assert child.returncode is not None
