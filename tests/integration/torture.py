"""Restart torture: every request the gateway accepted (HTTP 202) is answered, however the roles stop.

A reusable driver, no pytest in it (tests/integration/test_restarts.py and bench/restarts.py run it).
One run uses topics, a worker group and a simulated Ollama of its own on the given broker:

* Each cycle makes sure a worker and a gateway run (starting what is missing), waits until
  the gateway is healthy, floods ``per_cycle`` requests at ``POST /infer`` with client-chosen
  ids (every id answered 202 is recorded; 503s are retried with the same id), waits until a
  worker answers (so requests are in flight), then after a short seeded random delay stops
  roles in one of five ways, each occurring once per round of five cycles (seeded order):

  a. ``worker-sigint``: SIGINT to the worker alone (the gateway stays up)
  b. ``worker-sigkill``: SIGKILL to the worker alone
  c. ``stack-sigint``: SIGINT to the worker and the gateway together
  d. ``stack-sigkill``: SIGKILL to the worker and the gateway together
  e. ``join-leave``: while requests keep trickling in (one every ``trickle_interval_s``), a
     second worker joins; once the group is stable with both, one of the two (seeded choice)
     gets SIGTERM. The other one stays and is the next cycle's worker (no restart there).

* After the last cycle a worker is running (a final one is started unless the last cycle left
  one), and so is a gateway; one more request per model (one on every partition) shows the
  final worker serves new work everywhere, and the driver polls until every accepted id has a
  response on the responses topic, within ``final_timeout_s`` (or until the outcome is settled:
  the group committed every partition to its end and no answer came for ``settled_s``). Then
  it stops every role gracefully, reads the responses topic to its end (so late duplicates
  count), places each unanswered request against its partition's committed offset (committed
  past: lost; not yet: pending), runs the real ``python -m nexus replay --join`` over the run's
  time range, and scans every role's log for ``LOG_PATTERNS``.

Waiting is always for a condition (polled, with a deadline), never for a fixed time; the only
fixed delays are the seeded random ones that choose *when* roles are stopped.
"""

from __future__ import annotations

import asyncio
import atexit
import bisect
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2

from localdev.broker import free_port
from nexus.settings import KafkaSettings
from nexus.kafka.readers import known_partitions
from nexus.kafka.topics import ensure_topics
from schemas import decode_request, decode_response
from tests.integration.support import CODEC, REPO, Role, stack_env

KINDS = ("worker-sigint", "worker-sigkill", "stack-sigint", "stack-sigkill", "join-leave")
LOG_PATTERNS = ("Task exception was never retrieved", "Traceback", "KeyError")
# Four models whose keys land on the four partitions of the requests topic (Kafka's default
# partitioner, murmur2 of the model id), so every partition carries work and can stall.
MODELS = ("llama3.2", "falcon", "llama3.1", "mistral")
PARTITIONS = 4
POLL_S = 0.05  # how often conditions are re-checked while waiting for them


class TortureError(RuntimeError):
    """The harness itself could not run (a role did not start, Kafka unreachable)."""


@dataclass
class CycleRecord:
    index: int
    kind: str
    started_worker: bool = False  # False: a worker survived the previous cycle (join-leave)
    started_gateway: bool = False
    backlog_at_start: int = 0  # accepted, not yet answered, when the cycle began
    flood: int = 0  # POSTs attempted in the opening flood
    trickled: int = 0  # POSTs attempted by the join-leave trickle
    accepted: int = 0  # ... that got 202
    retried_503: int = 0  # 503s retried with the same id
    not_accepted: int = 0  # ... that never got 202 (other status or a broken connection)
    time_to_first_answer_s: float | None = None  # worker start -> its first answer
    stop_delay_s: float = 0.0
    unanswered_at_stop: int = 0  # accepted and unanswered when the roles were stopped
    stopped: list[str] = field(default_factory=list)  # "worker-3 SIGKILL", "gateway-2 SIGINT -> 0"
    notes: list[str] = field(default_factory=list)  # anything unexpected: timeouts, crashes, exit codes

    def line(self) -> str:
        if not self.started_worker:
            ttfa = "(survivor)"
        else:
            ttfa = "none" if self.time_to_first_answer_s is None else f"{self.time_to_first_answer_s:.2f}s"
        sent = f"{self.flood}" + (f"+{self.trickled} trickled" if self.trickled else "")
        text = (
            f"cycle {self.index:>2} {self.kind:<14} backlog {self.backlog_at_start:>4}  sent {sent:<14} "
            f"accepted {self.accepted:>4}  first answer after restart {ttfa:>10}  stop after "
            f"{self.stop_delay_s * 1000:>3.0f} ms with {self.unanswered_at_stop:>4} unanswered: {', '.join(self.stopped)}"
        )
        if self.retried_503 or self.not_accepted:
            text += f"  [503 retried {self.retried_503}, not accepted {self.not_accepted}]"
        return text + "".join(f"\n      ! {note}" for note in self.notes)


@dataclass
class LogProblem:
    path: Path
    lineno: int
    pattern: str
    text: str
    context: list[str]  # for a Traceback: its lines up to the exception message

    def line(self) -> str:
        text = self.text.strip()
        if self.pattern == "Traceback" and len(self.context) > 1:
            text += f" ... {self.context[-1].strip()}"
        return f"{self.path.name}:{self.lineno}: {text}"


@dataclass
class PartitionState:
    """One partition of the requests topic once every role stopped, as the next worker would find it."""

    partition: int
    end: int  # end offset
    committed: int | None  # the workers' group's committed offset; None: nothing committed
    committed_before_final_stop: int | None  # ... while the final worker still ran (after the final wait)
    unanswered_below_commit: list[str]  # unanswered, yet committed past: no worker reads them again (lost)
    unanswered_pending: list[str]  # unanswered at or after the commit: the next worker would read them

    def line(self) -> str:
        committed = "none" if self.committed is None else str(self.committed)
        before = "none" if self.committed_before_final_stop is None else str(self.committed_before_final_stop)
        return (f"partition {self.partition}: end {self.end}, committed {committed} ({before} before the "
                f"final worker's stop), unanswered "
                f"{len(self.unanswered_below_commit)} below the commit (lost) + "
                f"{len(self.unanswered_pending)} at or after it (pending)")


@dataclass
class TortureReport:
    run: str
    seed: int
    cycles: list[CycleRecord]
    final: CycleRecord  # the final worker's wait for the last answers, and the graceful stop of all
    accepted: list[str]  # ids answered 202, in order
    answered: int  # accepted ids with at least one response
    unanswered: list[str]
    responses_per_id: dict[str, int]  # every id seen on the responses topic, accepted or not
    answered_not_accepted: int  # responses to ids whose POST never got 202 (the write happened anyway)
    retried_ids: int  # ids POSTed again after a 503: they may be on the topic twice, so answered twice
    error_statuses: dict[str, int]  # status != "ok" among the accepted ids' first responses
    time_to_first_answer_s: list[tuple[str, float | None]]  # per restart ("cycle 3", "final")
    longest_stall_s: float  # longest gap between answers while a worker was answering and work waited
    longest_stall_where: str
    final_wait_s: float  # last cycle's end -> every accepted id answered (or the timeout)
    replay_exit_code: int | None
    replay_report: dict | None  # nexus replay --join --format jsonl, parsed
    replay_output: str  # its stdout and stderr, for failures
    log_problems: list[LogProblem]
    log_files: dict[str, Path]  # role name -> its log
    elapsed_s: float
    partitions: list[PartitionState] = field(default_factory=list)  # the requests topic at the end
    not_on_requests_topic: list[str] = field(default_factory=list)  # unanswered, and never written: 202 lied

    @property
    def duplicate_ids(self) -> dict[str, int]:
        """Accepted ids answered more than once, with their number of responses."""
        accepted = set(self.accepted)
        return {i: n for i, n in self.responses_per_id.items() if n > 1 and i in accepted}

    @property
    def duplicate_responses(self) -> int:
        """Responses beyond the first, over the accepted ids."""
        return sum(n - 1 for n in self.duplicate_ids.values())

    @property
    def max_time_to_first_answer_s(self) -> float | None:
        values = [v for _, v in self.time_to_first_answer_s if v is not None]
        return max(values) if values else None

    def worker_problems(self, pattern: str | None = None) -> list[LogProblem]:
        return [p for p in self.log_problems if "worker" in p.path.name and (pattern is None or p.pattern == pattern)]

    def log_tail(self, role: str, lines: int = 30) -> str:
        path = self.log_files[role]
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def worker_log_tails(self, workers: int = 3, lines: int = 30) -> str:
        """The last ``workers`` workers' log tails, and every worker log with a problem."""
        names = [n for n in self.log_files if n.startswith("worker")]
        with_problems = {n for n in names for p in self.log_problems if p.path == self.log_files[n]}
        chosen = [n for n in names if n in with_problems or n in names[-workers:]]
        return "\n".join(f"--- {n} ({self.log_files[n]}), last {lines} lines:\n{self.log_tail(n, lines)}"
                         for n in chosen)

    def keep_logs(self, directory: Path) -> Path:
        """Copy every role log of the run (simulator included) to ``directory/<run>``; return that."""
        target = Path()
        for folder in {path.parent for path in self.log_files.values()}:
            target = keep_logs(folder, self.run, directory)
        (target / "summary.txt").write_text(self.summary() + f"\n\n{self.replay_output}\n")
        return target

    def summary(self) -> str:
        replay = self.replay_report or {}
        ttfa = ", ".join(f"{w}: {'-' if v is None else f'{v:.2f}s'}" for w, v in self.time_to_first_answer_s)
        max_ttfa = self.max_time_to_first_answer_s
        lines = [
            f"restart torture run {self.run} (seed {self.seed}): {len(self.cycles)} cycles in {self.elapsed_s:.1f}s",
            *(f"  {c.line()}" for c in [*self.cycles, self.final]),
            f"  accepted (202):             {len(self.accepted)}",
            f"  answered:                   {self.answered}"
            + ("" if not self.unanswered else f"  ({len(self.unanswered)} NEVER ANSWERED)"),
            f"  answered more than once:    {len(self.duplicate_ids)} ids, {self.duplicate_responses} extra responses"
            f" (ids re-POSTed after a 503: {self.retried_ids})",
            f"  error responses:            {sum(self.error_statuses.values())} {dict(self.error_statuses) or ''}",
            f"  answers to non-202 POSTs:   {self.answered_not_accepted}",
            f"  time to first answer after restart: max "
            f"{'-' if max_ttfa is None else f'{max_ttfa:.2f}s'} ({ttfa})",
            f"  longest stall while a worker answered and work waited: {self.longest_stall_s:.2f}s "
            f"({self.longest_stall_where})",
            f"  final wait for the last answers: {self.final_wait_s:.2f}s",
            f"  nexus replay --join: exit {self.replay_exit_code}; requests {replay.get('requests', '?')}, "
            f"answered {replay.get('answered', '?')}, unanswered {len(replay.get('unanswered', []))}, "
            f"duplicate responses {len(replay.get('duplicate_responses', {}))} ids, "
            f"duplicate requests {len(replay.get('duplicate_requests', {}))} ids",
            f"  log problems: {len(self.log_problems)} lines ("
            + ", ".join(f"{p!r}: {sum(q.pattern == p for q in self.log_problems)}" for p in LOG_PATTERNS) + ")",
            *(f"    {p.line()}" for p in self.log_problems[:40]),
        ]
        if len(self.log_problems) > 40:
            lines.append(f"    ... and {len(self.log_problems) - 40} more")
        if self.unanswered or any(p.committed is None or p.committed < p.end for p in self.partitions):
            lines.append("  requests topic after the last stop, per partition:")
            lines += [f"    {p.line()}" for p in self.partitions]
        if self.not_on_requests_topic:
            lines.append(f"  accepted but NOT on the requests topic: {len(self.not_on_requests_topic)}: "
                         f"{', '.join(self.not_on_requests_topic[:30])}")
        if self.unanswered:
            shown = ", ".join(self.unanswered[:30])
            more = f" ... and {len(self.unanswered) - 30} more" if len(self.unanswered) > 30 else ""
            lines.append(f"  unanswered ids: {shown}{more}")
        return "\n".join(lines)


class ResponseWatcher:
    """Reads every response of the run's responses topic from the start, in the background.

    Keeps, per id, the timestamps (the worker's CreateTime, seconds) and statuses of its responses.
    """

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                          auto_offset_reset="earliest")
        self.responses: dict[str, list[tuple[float, str]]] = defaultdict(list)
        self.first_at: dict[str, float] = {}
        self.answer_times: list[float] = []  # first-answer times, in arrival order
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None

    async def start(self) -> None:
        await self._consumer.start()
        partitions = await known_partitions(self._consumer, self.topic, timeout_s=30)
        tps = [TopicPartition(self.topic, p) for p in partitions]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            while True:
                batches = await self._consumer.getmany(timeout_ms=200)
                for records in batches.values():
                    for record in records:
                        response = decode_response(CODEC, record.value)
                        at = record.timestamp / 1000
                        self.responses[response.id].append((at, response.status))
                        if response.id not in self.first_at or at < self.first_at[response.id]:
                            if response.id not in self.first_at:
                                self.answer_times.append(at)
                            self.first_at[response.id] = at
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # surfaced by check(): a dead watcher must not look like a stall
            self._error = exc

    def check(self) -> None:
        if self._error is not None:
            raise TortureError(f"reading {self.topic} failed: {self._error!r}") from self._error

    async def drain(self, timeout: float = 60) -> None:
        """Return once everything written to the topic so far has been read."""
        tps = list(self._consumer.assignment())
        ends = await self._consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            positions = {tp: await self._consumer.position(tp) for tp in tps}
            if all(positions[tp] >= ends[tp] for tp in tps):
                return
            if time.monotonic() > deadline:
                raise TortureError(f"{self.topic}: not read to its end within {timeout}s: {positions} < {ends}")
            await asyncio.sleep(POLL_S)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self._consumer.stop()


class Torture:
    """One run: see the module docstring. Use :func:`torture` (or ``run_all()``).

    Options: ``kinds`` (the stops to cycle through), ``stop_delay_s`` (range of the seeded delay
    from a worker's first answer to the stop), ``trickle_interval_s`` (join-leave's request pace),
    ``flood_concurrency`` (POSTs at once), ``ttft_ms``/``tokens_per_s`` (the simulator's speed),
    ``first_answer_timeout_s`` (per cycle, then noted and the cycle goes on), ``final_timeout_s``
    and ``settled_s`` (the final wait), ``exit_timeout_s`` (after a signal, then SIGKILL),
    ``extra_env`` (more ``NEXUS_*`` settings for every role), ``progress`` (called with each
    cycle's line as it ends).
    """

    def __init__(
        self,
        bootstrap: str,
        logs_dir: Path,
        *,
        cycles: int,
        per_cycle: int,
        seed: int,
        kinds: tuple[str, ...] = KINDS,
        stop_delay_s: tuple[float, float] = (0.0, 0.4),
        trickle_interval_s: float = 0.05,
        flood_concurrency: int = 16,
        ttft_ms: float = 50,
        tokens_per_s: float = 100,
        first_answer_timeout_s: float = 45,
        final_timeout_s: float = 120,
        settled_s: float = 10,
        exit_timeout_s: float = 30,
        extra_env: dict[str, str] | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        unknown = set(kinds) - set(KINDS)
        if unknown or not kinds:
            raise ValueError(f"kinds must be some of {KINDS}, got {kinds}")
        self.bootstrap = bootstrap
        self.logs_dir = logs_dir
        self.cycles = cycles
        self.per_cycle = per_cycle
        self.seed = seed
        self.kinds = kinds
        self.stop_delay_s = stop_delay_s
        self.trickle_interval_s = trickle_interval_s
        self.flood_concurrency = flood_concurrency
        self.ttft_ms = ttft_ms
        self.tokens_per_s = tokens_per_s
        self.first_answer_timeout_s = first_answer_timeout_s
        self.final_timeout_s = final_timeout_s
        self.settled_s = settled_s
        self.extra_env = dict(extra_env or {})
        self.exit_timeout_s = exit_timeout_s
        self.progress = progress or (lambda line: None)
        self.rng = random.Random(seed)
        self.run = f"{seed}x{uuid.uuid4().hex[:6]}"
        self.kafka = KafkaSettings(
            bootstrap=bootstrap, partitions=PARTITIONS,
            requests_topic=f"torture{self.run}.requests", responses_topic=f"torture{self.run}.responses",
            tokens_topic=f"torture{self.run}.tokens", dlq_topic=f"torture{self.run}.dlq",
            state_topic=f"torture{self.run}.state",
        )
        self.app_id = f"nexus-torture-{self.run}"
        self.env: dict[str, str] = {}
        self.simulator: Role | None = None
        self.gateway: Role | None = None
        self.workers: list[Role] = []  # the running ones, oldest first
        self.roles: list[Role] = []  # every role started, for the logs
        self.watcher: ResponseWatcher | None = None
        self.http: httpx.AsyncClient | None = None
        self.accepted_at: dict[str, float] = {}  # id -> when its 202 came (insertion order = accept order)
        self.retried: set[str] = set()
        self.not_accepted: set[str] = set()
        # (start, end, label): a worker was answering from its first answer until roles were stopped.
        self.active_windows: list[tuple[float, float, str]] = []
        self.current: CycleRecord | None = None  # the cycle running, for errors
        self.missing_from_topic: set[str] = set()
        self.started_at: dict[str, float] = {}  # worker name -> when it was started (wall clock)
        self.counter = 0
        self.started_workers = 0
        self.started_gateways = 0

    # ------------------------------------------------------------------ roles

    def _role(self, kind: str, env: dict[str, str], args: list[str]) -> Role:
        number = self.started_workers if kind == "worker" else self.started_gateways
        role = Role(f"{kind}-{number}", args, env, self.logs_dir)
        role.log_path = self.logs_dir / f"torture-{self.run}-{role.name}.log"
        self.roles.append(role)
        return role

    def _start_worker(self) -> Role:
        self.started_workers += 1
        env = {**self.env, "NEXUS_WORKER_WEB_PORT": str(free_port())}
        role = self._role("worker", env, ["worker", "--loglevel", "info"])
        self.started_at[role.name] = time.time()  # compared with the answers' record timestamps
        role.start()
        self.workers.append(role)
        return role

    def _start_gateway(self) -> Role:
        self.started_gateways += 1
        port = free_port()
        role = self._role("gateway", {**self.env, "NEXUS_GATEWAY_PORT": str(port)}, ["gateway"])
        role.start()
        role.url = f"http://127.0.0.1:{port}"
        self.gateway = role
        return role

    async def _start_simulator(self, models: str) -> None:
        port = free_port()
        role = Role("simulator", [
            "simulate-ollama", "--port", str(port), "--models", models, "--ttft-ms", str(self.ttft_ms),
            "--tokens-per-s", str(self.tokens_per_s), "--parallel", "256", "--max-queue", "100000",
        ], {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}, self.logs_dir)
        role.log_path = self.logs_dir / f"torture-{self.run}-simulator.log"
        role.url = f"http://127.0.0.1:{port}"
        self.roles.append(role)
        self.simulator = role.start()
        async with httpx.AsyncClient() as http:
            deadline = time.monotonic() + 60
            while True:
                if not role.alive():
                    raise TortureError(f"the simulator exited:\n{role.log_tail()}")
                try:
                    await http.get(f"{role.url}/api/version", timeout=1)
                    return
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        raise TortureError(f"the simulator did not answer within 60s:\n{role.log_tail()}") from None
                await asyncio.sleep(POLL_S)

    async def _wait_healthy(self, gateway: Role) -> None:
        assert self.http is not None
        deadline = time.monotonic() + 60
        last = "no answer yet"
        while True:
            if not gateway.alive():
                raise TortureError(f"{gateway.name} exited:\n{gateway.log_tail()}")
            try:
                reply = await self.http.get(f"{gateway.url}/health", timeout=2)
                if reply.status_code == 200:
                    return
                last = f"{reply.status_code} {reply.text[:300]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            if time.monotonic() > deadline:
                self._check_simulator()
                raise TortureError(f"{gateway.name} not healthy within 60s ({last}):\n{gateway.log_tail()}")
            await asyncio.sleep(POLL_S)

    async def _signal(self, roles: list[Role], sig: signal.Signals, record: CycleRecord | None) -> None:
        """Signal every role at once, then wait for each to exit (SIGKILL after ``exit_timeout_s``)."""
        for role in roles:
            assert role.proc is not None
            if role.proc.poll() is None:
                role.proc.send_signal(sig)
        deadline = time.monotonic() + self.exit_timeout_s
        for role in roles:
            assert role.proc is not None
            while role.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(POLL_S)
            note = ""
            if role.proc.poll() is None:
                role.proc.kill()
                role.proc.wait()
                note = f"{role.name} did not exit within {self.exit_timeout_s:.0f}s of {sig.name}; SIGKILLed"
            code = role.proc.returncode
            if record is not None:
                record.stopped.append(f"{role.name} {sig.name} -> {code}")
                if note:
                    record.notes.append(note)
                elif sig != signal.SIGKILL and code != 0:
                    record.notes.append(f"{role.name} exited with {code} after {sig.name}")
            if role in self.workers:
                self.workers.remove(role)
            if role is self.gateway:
                self.gateway = None

    def _reap_crashed(self, record: CycleRecord) -> None:
        for role in list(self.workers):
            if not role.alive():
                record.notes.append(f"{role.name} exited on its own with {role.proc.returncode if role.proc else '?'}")
                self.workers.remove(role)
        if self.gateway is not None and not self.gateway.alive():
            record.notes.append(f"{self.gateway.name} exited on its own")
            self.gateway = None

    # ------------------------------------------------------------------ requests

    def _next_body(self, cycle: int) -> dict:
        self.counter += 1
        model = MODELS[self.counter % len(MODELS)]
        # The simulator echoes the prompt, one token per word at tokens_per_s: 1-20 words make
        # answers take ttft + (5..24) tokens, about 90-290 ms at the defaults.
        words = " ".join(f"w{self.rng.randrange(1000)}" for _ in range(self.rng.randint(1, 20)))
        return {
            "id": f"{self.run}-c{cycle}-{self.counter}",
            "model_id": model,
            "input": f"{self.counter} {words}",
            "context": {"session_id": f"{self.run}-s{self.counter % 7}", "metadata": {"cycle": str(cycle)}},
        }

    async def _post(self, body: dict, record: CycleRecord, gate: asyncio.Semaphore) -> None:
        """POST until 202; retry 503 with the same id. Anything else: not accepted (outcome unknown)."""
        assert self.http is not None
        deadline = time.monotonic() + 60
        async with gate:
            while True:
                gateway = self.gateway
                if gateway is None:
                    self._not_accepted(record, body["id"], "no gateway to POST to")
                    return
                try:
                    reply = await self.http.post(f"{gateway.url}/infer", json=body, timeout=30)
                except httpx.HTTPError as exc:
                    self._not_accepted(record, body["id"], f"POST failed: {exc!r}")
                    return
                if reply.status_code == 202:
                    self.accepted_at[body["id"]] = time.time()
                    record.accepted += 1
                    return
                if reply.status_code == 503 and time.monotonic() < deadline:
                    record.retried_503 += 1
                    self.retried.add(body["id"])
                    await asyncio.sleep(0.2)  # back off before retrying the same id
                    continue
                self._not_accepted(record, body["id"], f"POST answered {reply.status_code} {reply.text[:200]}")
                return

    def _not_accepted(self, record: CycleRecord, request_id: str, why: str) -> None:
        record.not_accepted += 1
        self.not_accepted.add(request_id)
        if record.not_accepted <= 3:  # the first few say why; the count says how many
            record.notes.append(f"{request_id} not accepted: {why}")

    async def _flood(self, cycle: int, count: int, record: CycleRecord) -> None:
        gate = asyncio.Semaphore(self.flood_concurrency)
        bodies = [self._next_body(cycle) for _ in range(count)]
        record.flood += count
        await asyncio.gather(*(self._post(body, record, gate) for body in bodies))

    async def _trickle(self, cycle: int, record: CycleRecord, stop: asyncio.Event) -> None:
        """One POST every ``trickle_interval_s`` until ``stop`` (the pacing is the point: a flow)."""
        gate = asyncio.Semaphore(self.flood_concurrency)
        posts: list[asyncio.Task[None]] = []
        try:
            while not stop.is_set():
                record.trickled += 1
                posts.append(asyncio.ensure_future(self._post(self._next_body(cycle), record, gate)))
                try:
                    await asyncio.wait_for(stop.wait(), timeout=self.trickle_interval_s)
                except TimeoutError:
                    pass
        finally:
            await asyncio.gather(*posts)

    # ------------------------------------------------------------------ conditions

    def unanswered(self) -> list[str]:
        assert self.watcher is not None
        return [i for i in self.accepted_at if i not in self.watcher.first_at]

    async def _until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Poll ``condition`` until true (True) or ``timeout`` (False)."""
        assert self.watcher is not None
        deadline = time.monotonic() + timeout
        while True:
            self.watcher.check()
            if condition():
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(POLL_S)

    def _answer_since(self, since: float) -> float | None:
        """The earliest first answer written at or after ``since`` (wall clock seconds)."""
        assert self.watcher is not None
        later = [t for t in self.watcher.answer_times if t >= since]
        return min(later) if later else None

    async def _wait_first_answer(self, since: float, record: CycleRecord, waiting_for: Callable[[], bool]) -> float | None:
        """Wait for a worker's first answer after ``since``; give up (noted) when none can come or on timeout.

        ``waiting_for()`` is false when there is nothing an answer could come for.
        """
        answered = await self._until(
            lambda: self._answer_since(since) is not None or not (self.unanswered() or waiting_for())
            or not any(w.alive() for w in self.workers),
            self.first_answer_timeout_s,
        )
        first = self._answer_since(since)
        if first is None:
            if not any(w.alive() for w in self.workers):
                record.notes.append("no answer: no worker is running " + ", ".join(
                    f"({w.name} exited with {w.proc.returncode if w.proc else '?'})" for w in self.workers))
            elif answered:
                record.notes.append("nothing was waiting to be answered")
            else:
                record.notes.append(
                    f"no answer within {self.first_answer_timeout_s:.0f}s after {since - self.t0:.1f}s "
                    f"({len(self.unanswered())} accepted requests waiting; workers "
                    f"{[w.name for w in self.workers]} alive: {[w.alive() for w in self.workers]})"
                )
        return first

    async def _group(self) -> tuple[str, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            [response] = await admin.describe_consumer_groups([self.app_id])
            [(_error, _group, state, _protocol_type, _protocol, members, *_)] = response.groups
            return state, len(members)
        finally:
            await admin.close()

    async def _wait_group(self, members: int, timeout: float) -> str:
        """Poll until the workers' group is Stable with ``members`` members; return the last state seen."""
        deadline = time.monotonic() + timeout
        seen = "not described yet"
        while time.monotonic() < deadline:
            dead = [w for w in self.workers if not w.alive()]
            if dead:
                raise TimeoutError(f"{seen}; " + ", ".join(
                    f"{w.name} exited with {w.proc.returncode if w.proc else '?'}" for w in dead))
            try:
                state, count = await self._group()
                seen = f"{state} with {count} members"
                if state == "Stable" and count == members:
                    return seen
            except (KafkaError, ValueError) as exc:  # no coordinator yet
                seen = repr(exc)
            await asyncio.sleep(0.2)
        raise TimeoutError(seen)

    # ------------------------------------------------------------------ the run

    async def run_all(self) -> TortureReport:
        self.t0 = time.time()
        started = time.monotonic()
        atexit.register(self._kill_all)  # should this process die without its finally
        since_ms = int(self.t0 * 1000) - 1000
        models = ",".join(MODELS)
        spread = {(murmur2(m.encode()) & 0x7FFFFFFF) % PARTITIONS for m in MODELS}
        if len(spread) != PARTITIONS:
            self.progress(f"note: the models use partitions {sorted(spread)} of {PARTITIONS}")
        cycle_records: list[CycleRecord] = []
        ttfa: list[tuple[str, float | None]] = []
        final_wait = 0.0
        try:
            await ensure_topics(self.kafka)  # first: their leaders are elected while the simulator starts
            await self._start_simulator(models)
            assert self.simulator is not None
            self.env = stack_env(
                self.bootstrap, self.simulator.url,
                NEXUS_KAFKA_REQUESTS_TOPIC=self.kafka.requests_topic,
                NEXUS_KAFKA_RESPONSES_TOPIC=self.kafka.responses_topic,
                NEXUS_KAFKA_TOKENS_TOPIC=self.kafka.tokens_topic,
                NEXUS_KAFKA_DLQ_TOPIC=self.kafka.dlq_topic,
                NEXUS_KAFKA_STATE_TOPIC=self.kafka.state_topic,
                NEXUS_KAFKA_PARTITIONS=str(PARTITIONS),
                NEXUS_WORKER_APP_ID=self.app_id,
                NEXUS_MODELS=models,
                **self.extra_env,
            )
            self.watcher = ResponseWatcher(self.bootstrap, self.kafka.responses_topic)
            await self.watcher.start()
            self.http = httpx.AsyncClient(limits=httpx.Limits(max_connections=4 * self.flood_concurrency))

            order: list[str] = []
            while len(order) < self.cycles:
                order += self.rng.sample(list(self.kinds), len(self.kinds))
            for index, kind in enumerate(order[: self.cycles]):
                record = await self._cycle(index, kind)
                cycle_records.append(record)
                if record.started_worker:
                    ttfa.append((f"cycle {index}", record.time_to_first_answer_s))
                self.progress(record.line())

            # The final worker: every accepted id must be answered. One more request per model (so
            # one on every partition) proves it serves new work on each, even with no backlog left.
            final_started = time.time()
            final = self.current = CycleRecord(len(order[: self.cycles]), "final")
            self._check_simulator()
            self._reap_crashed(final)
            final.backlog_at_start = len(self.unanswered())
            if not self.workers:
                self._start_worker()
                final.started_worker = True
            if self.gateway is None:
                self._start_gateway()
                final.started_gateway = True
            assert self.gateway is not None
            await self._wait_healthy(self.gateway)
            await self._flood(final.index, len(MODELS), final)
            since = self.started_at[self.workers[0].name] if final.started_worker else final_started
            first = await self._wait_first_answer(since, final, lambda: False)
            if final.started_worker:
                final.time_to_first_answer_s = None if first is None else first - since
                ttfa.append(("final", final.time_to_first_answer_s))
            window_start = first if first is not None else final_started
            await self._final_wait(final)
            final_wait = time.time() - final_started
            self.active_windows.append((window_start, time.time(), "final worker"))
            final.unanswered_at_stop = len(self.unanswered())
            try:  # a diagnosis: did the final worker's stop move the commits?
                committed_before = await self._committed()
            except Exception as exc:
                committed_before = {}
                final.notes.append(f"could not read the group's offsets: {exc!r}")
            # Graceful stops, so shutdown errors reach the logs and late duplicates reach the topic.
            await self._signal(self.workers + ([self.gateway] if self.gateway else []), signal.SIGTERM, final)
            self.progress(final.line())
            await self.watcher.drain()
            try:  # a diagnosis; failing it must not lose the report
                partitions = await self._partition_states(committed_before)
            except Exception as exc:
                partitions = []
                final.notes.append(f"could not read the requests topic and the group's offsets: {exc!r}")
            until_ms = int(time.time() * 1000) + 1
            replay_code, replay_report, replay_output = await self._replay(since_ms, until_ms)
        except Exception as exc:
            where = f"\nthe run stopped in:\n  {self.current.line()}" if self.current else ""
            done = "".join(f"\n  {c.line()}" for c in cycle_records)
            raise TortureError(f"{exc}{where}\ncycles before it:{done or ' none'}\nrole logs: "
                               f"{self.logs_dir}/torture-{self.run}-*.log") from exc
        finally:
            await self._cleanup()

        watcher = self.watcher
        assert watcher is not None
        accepted = list(self.accepted_at)
        unanswered = [i for i in accepted if i not in watcher.first_at]
        stall, where = self._longest_stall()
        errors: dict[str, int] = defaultdict(int)
        for i in accepted:
            if watcher.responses.get(i):
                status = min(watcher.responses[i])[1]
                if status != "ok":
                    errors[status] += 1
        log_files = {r.name: r.log_path for r in self.roles if r.name != "simulator"}
        return TortureReport(
            run=self.run,
            seed=self.seed,
            cycles=cycle_records,
            final=final,
            accepted=accepted,
            answered=len(accepted) - len(unanswered),
            unanswered=unanswered,
            responses_per_id={i: len(rs) for i, rs in watcher.responses.items()},
            answered_not_accepted=len([i for i in self.not_accepted if i in watcher.first_at]),
            retried_ids=len(self.retried),
            error_statuses=dict(errors),
            time_to_first_answer_s=ttfa,
            longest_stall_s=stall,
            longest_stall_where=where,
            final_wait_s=final_wait,
            replay_exit_code=replay_code,
            replay_report=replay_report,
            replay_output=replay_output,
            log_problems=scan_logs(list(log_files.values())),
            log_files=log_files,
            elapsed_s=time.monotonic() - started,
            partitions=partitions,
            not_on_requests_topic=[i for i in unanswered if i in self.missing_from_topic],
        )

    def _check_simulator(self) -> None:
        if self.simulator is not None and not self.simulator.alive():
            code = self.simulator.proc.returncode if self.simulator.proc else "?"
            raise TortureError(f"the simulated Ollama exited with {code} (killed from outside?):\n"
                               f"{self.simulator.log_tail()}")

    async def _cycle(self, index: int, kind: str) -> CycleRecord:
        record = self.current = CycleRecord(index, kind)
        self._check_simulator()
        self._reap_crashed(record)
        record.backlog_at_start = len(self.unanswered())
        cycle_start = time.time()
        if not self.workers:
            self._start_worker()
            record.started_worker = True
        if self.gateway is None:
            self._start_gateway()
            record.started_gateway = True
        assert self.gateway is not None
        await self._wait_healthy(self.gateway)
        since = self.started_at[self.workers[0].name] if record.started_worker else cycle_start

        flood = asyncio.ensure_future(self._flood(index, self.per_cycle, record))
        try:
            first = await self._wait_first_answer(since, record, lambda: not flood.done())
            if record.started_worker and first is not None:
                record.time_to_first_answer_s = first - since
            if kind in ("stack-sigint", "stack-sigkill", "join-leave"):
                await flood  # the gateway goes too (or the trickle follows): every POST has its outcome first
            self._reap_crashed(record)
            if kind == "join-leave":
                await self._join_leave(index, record, first)
                return record
            record.stop_delay_s = self.rng.uniform(*self.stop_delay_s)
            await asyncio.sleep(record.stop_delay_s)  # seeded: *when* to stop is the experiment
            record.unanswered_at_stop = len(self.unanswered())
            stopped_at = time.time()
            if first is not None:
                self.active_windows.append((first, stopped_at, f"cycle {index}"))
            sig = signal.SIGINT if kind.endswith("sigint") else signal.SIGKILL
            roles = list(self.workers)
            if kind.startswith("stack") and self.gateway is not None:
                roles.append(self.gateway)
            await self._signal(roles, sig, record)
        finally:
            await flood
        return record

    async def _join_leave(self, index: int, record: CycleRecord, first: float | None) -> None:
        stop_trickle = asyncio.Event()
        again: float | None = None
        trickle = asyncio.ensure_future(self._trickle(index, record, stop_trickle))
        try:
            self._start_worker()
            try:
                await self._wait_group(len(self.workers), timeout=60)
            except TimeoutError as exc:
                record.notes.append(f"the group never became stable with {len(self.workers)} workers: {exc}")
            record.stop_delay_s = self.rng.uniform(*self.stop_delay_s)
            await asyncio.sleep(record.stop_delay_s)  # seeded: *when* to stop is the experiment
            record.unanswered_at_stop = len(self.unanswered())
            left_at = time.time()
            if first is not None:
                self.active_windows.append((first, left_at, f"cycle {index}"))
            if self.workers:
                leaver = self.rng.choice(self.workers)
                await self._signal([leaver], signal.SIGTERM, record)
            # The survivor must take the leaver's partitions over: wait for an answer after the leave.
            left = time.time()
            again = await self._wait_first_answer(left, record, lambda: True)
            if again is not None:
                record.notes.append(f"survivor answered {again - left:.2f}s after the leaver exited")
        finally:
            stop_trickle.set()
            await trickle
        if again is not None:
            self.active_windows.append((again, time.time(), f"cycle {index} survivor"))

    def _longest_stall(self) -> tuple[float, str]:
        """Longest time without a new answer inside an active window while an accepted request waited."""
        assert self.watcher is not None
        first_at = self.watcher.first_at
        times = sorted(first_at[i] for i in self.accepted_at if i in first_at)
        # Request i waits during [accepted, first answer); the answer may be written before the 202
        # reaches us, then it never waits. Waiting at t: intervals begun by t minus those ended by t.
        waits = [(acc, first_at.get(i, math.inf)) for i, acc in self.accepted_at.items()]
        waits = [(a, f) for a, f in waits if a < f]
        begun, ended = sorted(a for a, _ in waits), sorted(f for _, f in waits)

        def waiting(t: float) -> bool:
            return bisect.bisect_right(begun, t) - bisect.bisect_right(ended, t) > 0

        longest, where = 0.0, "no stall"
        for start, end, label in self.active_windows:
            inside = times[bisect.bisect_left(times, start): bisect.bisect_right(times, end)]
            points = [start, *inside, end]
            for a, b in zip(points, points[1:]):
                if b - a > longest and waiting(a):
                    longest, where = b - a, f"{label}, {a - self.t0:.1f}s..{b - self.t0:.1f}s into the run"
        return longest, where

    async def _final_wait(self, final: CycleRecord) -> None:
        """Poll until every accepted id is answered; give up at ``final_timeout_s``, or earlier once
        the outcome is settled: the group has committed every partition to its end (so no worker
        will read an unanswered request again) and no new answer came for ``settled_s``."""
        assert self.watcher is not None
        deadline = time.monotonic() + self.final_timeout_s
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False)
        await consumer.start()
        try:
            tps = [TopicPartition(self.kafka.requests_topic, p)
                   for p in await known_partitions(consumer, self.kafka.requests_topic, timeout_s=30)]
            answers, progress_at, checked_at = -1, time.monotonic(), 0.0
            while self.unanswered():
                self.watcher.check()
                self._check_simulator()
                now = time.monotonic()
                if len(self.watcher.answer_times) != answers:
                    answers, progress_at = len(self.watcher.answer_times), now
                if now > deadline:
                    final.notes.append(f"{len(self.unanswered())} accepted requests still unanswered after "
                                       f"{self.final_timeout_s:.0f}s")
                    return
                if now - progress_at > self.settled_s and now - checked_at > 1:
                    checked_at = now
                    ends = await consumer.end_offsets(tps)
                    committed = await self._committed()
                    if all(committed.get(tp.partition) == ends[tp] for tp in tps):
                        final.notes.append(
                            f"gave up waiting after {now - deadline + self.final_timeout_s:.0f}s: the group "
                            f"committed every partition to its end, yet {len(self.unanswered())} accepted "
                            f"requests have no answer (none came for {self.settled_s:.0f}s)")
                        return
                await asyncio.sleep(POLL_S)
        finally:
            await consumer.stop()

    async def _committed(self) -> dict[int, int | None]:
        """The workers' group's committed offsets on the requests topic, per partition."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            offsets = await admin.list_consumer_group_offsets(self.app_id)
        finally:
            await admin.close()
        return {tp.partition: (mark.offset if mark.offset >= 0 else None)
                for tp, mark in offsets.items() if tp.topic == self.kafka.requests_topic}

    async def _partition_states(self, committed_before: dict[int, int | None]) -> list[PartitionState]:
        """Where each unanswered request sits against its partition's committed offset."""
        unanswered = set(self.unanswered())
        committed = await self._committed()
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="earliest")
        await consumer.start()
        try:
            tps = [TopicPartition(self.kafka.requests_topic, p)
                   for p in await known_partitions(consumer, self.kafka.requests_topic, timeout_s=30)]
            ends = await consumer.end_offsets(tps)
            where: dict[str, tuple[int, int]] = {}  # unanswered id -> (partition, offset)
            if unanswered:
                consumer.assign(tps)
                await consumer.seek_to_beginning(*tps)
                deadline = time.monotonic() + 60
                while True:
                    positions = {tp: await consumer.position(tp) for tp in tps}
                    if all(positions[tp] >= ends[tp] for tp in tps):
                        break
                    if time.monotonic() > deadline:
                        raise TortureError(f"{self.kafka.requests_topic} not read to its end within 60s")
                    for records in (await consumer.getmany(timeout_ms=500)).values():
                        for record in records:
                            request_id = decode_request(CODEC, record.value).id
                            if request_id in unanswered:
                                where.setdefault(request_id, (record.partition, record.offset))
            self.missing_from_topic = unanswered - set(where)
            states = []
            for tp in sorted(tps, key=lambda tp: tp.partition):
                offset = committed.get(tp.partition)
                mine = [i for i, (p, _) in where.items() if p == tp.partition]
                below = [i for i in mine if offset is not None and where[i][1] < offset]
                states.append(PartitionState(tp.partition, ends[tp], offset, committed_before.get(tp.partition),
                                             below, [i for i in mine if i not in below]))
            return states
        finally:
            await consumer.stop()

    async def _replay(self, since_ms: int, until_ms: int) -> tuple[int | None, dict | None, str]:
        command = [sys.executable, "-m", "nexus", "replay", "--join", "--since", str(since_ms),
                   "--until", str(until_ms), "--format", "jsonl", "--no-progress"]
        proc = await asyncio.create_subprocess_exec(
            *command, cwd=REPO, env=self.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=120)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return None, None, "nexus replay --join did not finish within 120s"
        out, err = stdout.decode(errors="replace"), stderr.decode(errors="replace")
        report = None
        try:
            report = json.loads(out.strip().splitlines()[-1]) if out.strip() else None
        except json.JSONDecodeError:
            pass
        return proc.returncode, report, f"$ {' '.join(command[1:])}\n{out}{err}"

    def _kill_all(self) -> None:
        for role in self.roles:
            if role.alive():
                assert role.proc is not None
                role.proc.kill()
                role.proc.wait()

    async def _cleanup(self) -> None:
        """Stop whatever still runs (gracefully, then SIGKILL), whatever went wrong before."""
        running = [r for r in self.roles if r.alive()]
        for role in running:
            assert role.proc is not None
            role.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for role in running:
            assert role.proc is not None
            while role.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(POLL_S)
            if role.proc.poll() is None:
                role.proc.kill()
                role.proc.wait()
        self.workers.clear()
        self.gateway = None
        if self.http is not None:
            await self.http.aclose()
        if self.watcher is not None:
            await self.watcher.stop()
        shutil.rmtree(REPO / ".cache" / "faust" / self.app_id, ignore_errors=True)
        atexit.unregister(self._kill_all)


def keep_logs(logs_dir: Path, run: str, directory: Path) -> Path:
    """Copy run ``run``'s role logs from ``logs_dir`` to ``directory/<run>``; return that."""
    target = directory / run
    target.mkdir(parents=True, exist_ok=True)
    for path in logs_dir.glob(f"torture-{run}-*.log"):
        shutil.copy2(path, target / path.name)
    return target


def scan_logs(paths: list[Path], patterns: tuple[str, ...] = LOG_PATTERNS) -> list[LogProblem]:
    """Every line of the logs with one of ``patterns``; a Traceback keeps its lines up to the exception."""
    problems = []
    for path in paths:
        if not path.exists():
            continue
        lines = path.read_text(errors="replace").splitlines()
        inside_until = -1  # lines of a Traceback already reported are not reported again
        for n, line in enumerate(lines):
            if n <= inside_until:
                continue
            for pattern in patterns:
                if pattern in line:
                    context = [line]
                    if pattern == "Task exception was never retrieved":
                        context += lines[n + 1: n + 2]  # "future: <Task ... exception=...>"
                    if pattern == "Traceback":
                        for following in lines[n + 1: n + 80]:
                            context.append(following)
                            if following and not following.startswith((" ", "\t")):
                                break
                        inside_until = n + len(context) - 1
                    problems.append(LogProblem(path, n + 1, pattern, line, context))
                    break
    return problems


async def torture(
    bootstrap: str,
    logs_dir: Path,
    *,
    cycles: int,
    per_cycle: int,
    seed: int,
    **options: object,
) -> TortureReport:
    """Run the torture on ``bootstrap``, role logs in ``logs_dir``; see :class:`Torture` for the options."""
    return await Torture(bootstrap, logs_dir, cycles=cycles, per_cycle=per_cycle, seed=seed, **options).run_all()  # type: ignore[arg-type]
