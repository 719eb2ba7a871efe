"""Restart torture: is every request the gateway accepted (HTTP 202) answered, across many restarts?

    .venv/bin/python bench/restarts.py [--cycles 20] [--per-cycle 200] [--seed N] [--bootstrap HOST:PORT]

Starts (unless --bootstrap) a local broker, then runs tests/integration/torture.py: each cycle floods
``POST /infer`` with --per-cycle requests (client-chosen ids; 503s retried with the same id),
waits until a worker answers, then stops roles with answers in flight, cycling (seeded
order) through SIGINT and SIGKILL to the worker alone, SIGINT and SIGKILL to the worker
and the gateway, and a second worker joining while one of the two leaves (SIGTERM). A final
worker must then answer every accepted id; ``nexus replay --join`` must agree.

Prints one line per cycle as it ends, then the report: requests accepted and answered,
duplicates (ids answered more than once), the time from each worker (re)start to its first
answer, the longest stall while a worker answered and work waited, and every role log line
with "Task exception was never retrieved", "Traceback" or "KeyError". The role logs stay in
--logs (default .cache/bench-logs/restarts/). Exit status 0 when every accepted request was
answered, ``nexus replay --join`` agreed and no worker log has a traceback; else 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import REPO, run_on_broker

sys.path.insert(0, str(REPO))  # tests/ is not an installed package

from tests.integration.torture import KINDS, TortureReport, torture

LOGS_DIR = REPO / ".cache" / "bench-logs" / "restarts"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--per-cycle", type=int, default=200, help="requests flooded per cycle")
    parser.add_argument("--seed", type=int, help="order of stops and their delays (default: from the clock)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {','.join(KINDS)}")
    parser.add_argument("--max-stop-delay-ms", type=float, default=400,
                        help="stop roles up to this long after a worker's first answer of the cycle")
    parser.add_argument("--ttft-ms", type=float, default=50, help="simulated time to first token")
    parser.add_argument("--tokens-per-s", type=float, default=100,
                        help="simulated speed; prompts of 1-20 words: answers take ttft + 5-24 tokens")
    parser.add_argument("--final-timeout", type=float, default=120,
                        help="seconds the final worker gets to answer every accepted request")
    parser.add_argument("--env", action="append", default=[], metavar="NEXUS_X=V",
                        help="extra setting for every role, e.g. NEXUS_WORKER_MAX_IN_FLIGHT=16 (repeatable)")
    parser.add_argument("--bootstrap", help="an existing cluster (default: a local broker started for the run)")
    parser.add_argument("--logs", type=Path, default=LOGS_DIR, help="directory for the roles' logs")
    parser.add_argument("--log-tail", type=int, default=0, metavar="LINES",
                        help="also print the last LINES lines of the last workers' logs")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else int(time.time()) % 100_000
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    if any("=" not in item for item in args.env):
        parser.error("--env takes NAME=VALUE")
    extra_env = dict(item.split("=", 1) for item in args.env)
    args.logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    reports: list[TortureReport] = []

    async def measure(bootstrap: str) -> None:
        print(f"restart torture: {args.cycles} cycles x {args.per_cycle} requests, seed {seed}, "
              f"broker {bootstrap}, logs in {args.logs}" + (f", {extra_env}" if extra_env else ""), flush=True)
        reports.append(await torture(
            bootstrap, args.logs, cycles=args.cycles, per_cycle=args.per_cycle, seed=seed, kinds=kinds,
            stop_delay_s=(0.0, args.max_stop_delay_ms / 1000), ttft_ms=args.ttft_ms,
            tokens_per_s=args.tokens_per_s, final_timeout_s=args.final_timeout, extra_env=extra_env,
            progress=lambda line: print(f"[{time.monotonic() - started:6.1f}s] {line}", flush=True),
        ))

    run_on_broker(measure, args.bootstrap)
    [report] = reports
    print()
    print(report.summary())
    if report.replay_report is None:  # the command failed or printed no report: show what it said
        print(f"\n{report.replay_output[-3000:]}")
    if args.log_tail:
        print(f"\n{report.worker_log_tails(lines=args.log_tail)}")
    ok = (not report.unanswered and report.replay_exit_code == 0
          and not report.worker_problems("Traceback") and not report.worker_problems("Task exception was never retrieved"))
    print(f"\n{'PASS' if ok else 'FAIL'}: {len(report.accepted)} accepted, {report.answered} answered, "
          f"{report.duplicate_responses} duplicate responses, replay exit {report.replay_exit_code}, "
          f"{len(report.log_problems)} log problem lines; {time.monotonic() - started:.0f}s in all")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
