"""First-run steps that take minutes (a Maven fetch, a Go build, a PyPI download) as child processes
that say how they are doing.

A user who runs ``nexus up`` for the first time should see a line every few seconds, not minutes of
silence; a step that hangs is stopped after its timeout; Ctrl-C leaves no ``mvn``, ``go`` or
``pip`` behind.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TextIO

# Where progress lines go: stderr in the CLI, a list in tests.
Progress = Callable[[str], None]


def run_reporting(
    cmd: Sequence[str],
    log: TextIO,
    *,
    progress: Progress,
    report: Callable[[float], str],
    every_s: float,
    timeout_s: float,
    timed_out: Callable[[], Exception],
    on_line: Callable[[str], None] | None = None,
    started: float | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    poll_s: float = 0.2,
) -> int:
    """Run ``cmd`` to its end, its output (stdout and stderr) written to ``log`` and each line
    given to ``on_line``; every ``every_s`` seconds ``progress(report(elapsed))``.

    Past ``timeout_s`` (counted from ``started``, default now) the process is killed and
    ``timed_out()`` raised; on any exception (Ctrl-C) it is killed too. Returns its exit code.
    """
    started = time.monotonic() if started is None else started
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=None if env is None else dict(env), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if on_line is not None:
                on_line(line)

    reader = threading.Thread(target=pump, name=f"{Path(cmd[0]).name}-output", daemon=True)
    reader.start()
    next_report = started + every_s
    try:
        while proc.poll() is None:
            now = time.monotonic()
            if now - started > timeout_s:
                raise timed_out()
            if now >= next_report:
                progress(report(now - started))
                next_report = now + every_s
            time.sleep(poll_s)
    finally:
        if proc.poll() is None:  # Ctrl-C or the timeout: leave nothing behind
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
    return proc.returncode
