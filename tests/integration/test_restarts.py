"""Restart torture: every request answered 202 by ``POST /infer`` is answered, across restarts.

Six cycles of 40 requests on the session broker (tests/integration/torture.py): each of the five ways
of stopping roles occurs at least once (SIGINT or SIGKILL to the worker alone or to the
worker and the gateway, and a second worker joining then one of the two leaving), with
answers in flight every time, with fewer answers running at once than are read (so each
stop finds requests read but not started). Set ``NEXUS_TORTURE_SEED`` to replay a given
seed's order of stops and delays (the broker's timing still varies).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.integration.support import REPO
from tests.integration.torture import KINDS, Torture, keep_logs

CYCLES = 6
PER_CYCLE = 40
KEPT_LOGS = REPO / ".cache" / "test-logs" / "restarts"  # a failed run's role logs are copied here
# Fewer answers running at once than a cycle floods (the default is 256): every stop and every
# rebalance then finds requests the worker has read but not started, the state a worker's
# bookkeeping must not commit past. The four models' endpoints run 16 at once anyway.
WORKER_ENV = {"NEXUS_WORKER_MAX_IN_FLIGHT": "16"}


async def test_every_accepted_request_is_answered_across_restarts(
    bootstrap: str, logs_dir: Path, record_property  # type: ignore[no-untyped-def]
) -> None:
    seed = int(os.environ.get("NEXUS_TORTURE_SEED", "1"))
    run = Torture(bootstrap, logs_dir, cycles=CYCLES, per_cycle=PER_CYCLE, seed=seed, extra_env=WORKER_ENV,
                  progress=lambda line: print(line, flush=True))
    try:
        report = await run.run_all()
    except Exception:  # the harness could not finish (a role would not start, Kafka went away)
        print(f"role logs kept in {keep_logs(logs_dir, run.run, KEPT_LOGS)}")
        raise
    print("\n" + report.summary())

    # The harness itself: every kind of stop happened, and some with answers still to come.
    assert {c.kind for c in report.cycles} == set(KINDS), report.summary()
    assert any(c.unanswered_at_stop for c in report.cycles), f"nothing was in flight at any stop\n{report.summary()}"
    # In flight: what was unanswered at each stop, plus, for each join-leave cycle, what one worker
    # can be running at the join's and the leave's rebalances; plus ids re-POSTed after a 503.
    joins = sum(1 for c in report.cycles if c.kind == "join-leave")
    duplicate_bound = (sum(c.unanswered_at_stop for c in report.cycles)
                       + 2 * joins * int(WORKER_ENV["NEXUS_WORKER_MAX_IN_FLIGHT"]) + report.retried_ids)
    replay = report.replay_report or {}
    for name, value in {
        "seed": seed,
        "accepted": len(report.accepted),
        "answered": report.answered,
        "unanswered": len(report.unanswered),
        "duplicate_ids": len(report.duplicate_ids),
        "duplicate_responses": report.duplicate_responses,
        "duplicate_bound": duplicate_bound,
        "max_time_to_first_answer_after_restart_s": report.max_time_to_first_answer_s,
        "time_to_first_answer_after_restart_s": report.time_to_first_answer_s,
        "longest_stall_s": round(report.longest_stall_s, 3),
        "final_wait_s": round(report.final_wait_s, 3),
        "replay_exit_code": report.replay_exit_code,
        "replay_unanswered": len(replay.get("unanswered", [])),
        "log_problems": [p.line() for p in report.log_problems],
        "elapsed_s": round(report.elapsed_s, 1),
    }.items():
        record_property(name, value)

    failures = []
    if report.unanswered:
        failures.append(f"{len(report.unanswered)} of {len(report.accepted)} accepted requests were never "
                        f"answered: {', '.join(report.unanswered)}")
    if report.replay_exit_code != 0:
        said = (f"{len(replay['unanswered'])} unanswered by its count: {', '.join(replay['unanswered'][:30])}"
                if "unanswered" in replay else report.replay_output[-3000:])
        failures.append(f"nexus replay --join exited {report.replay_exit_code} (0: every request answered); {said}")
    for pattern in ("Task exception was never retrieved", "Traceback"):
        found = report.worker_problems(pattern)
        if found:
            failures.append(f"{len(found)} worker log line(s) with {pattern!r}:\n"
                            + "\n".join("\n".join(p.context) for p in found[:10]))
    # At least once: only answers in flight when a worker stopped (or the group rebalanced) may
    # be written again.
    if report.duplicate_responses > duplicate_bound:
        failures.append(f"{report.duplicate_responses} duplicate responses exceed the bound {duplicate_bound}")
    if failures:
        kept = report.keep_logs(KEPT_LOGS)  # the session's logs_dir is deleted at its end
        pytest.fail("\n\n".join(failures) + f"\n\n{report.summary()}\n\nevery role's log is kept in {kept}; "
                    f"the workers' tails:\n{report.worker_log_tails()}", pytrace=False)
