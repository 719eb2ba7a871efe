"""Arguments and output of ``nexus replay``; the work is in :mod:`consumers.replay.reader`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import TextIO

from typing import TYPE_CHECKING

from nexus.settings import Settings

from consumers.replay.audit import DEFAULT_GRACE_MS, STATUSES, TOPIC_CHOICES, RecordFilter, parse_time
from consumers.replay.errors import ReplayArgumentError, ReplayError, ReplayKafkaError
from consumers.replay.render import FORMATS, jsonl_line, progress_line, table_header, table_row

if TYPE_CHECKING:  # the Kafka shell is imported when the command runs, not when `nexus` parses
    from consumers.replay.reader import ReplayOptions

EXIT_INCOMPLETE = 1  # --join: some request in the range has no response
EXIT_USAGE = 2
EXIT_KAFKA = 3  # Kafka unreachable, a topic missing, or it stopped delivering; or resubmitting failed


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", help="start of the range, inclusive: ISO-8601 (UTC unless an offset is "
                   "given), epoch ms, or -15m/-1h/-2d before now (default: the oldest record)")
    p.add_argument("--until", help="end of the range, exclusive, same forms (default: the end when the "
                   "replay starts)")
    p.add_argument("--session", action="append", default=[], metavar="ID", help="only this session (repeatable)")
    p.add_argument("--model", action="append", default=[], metavar="ID", help="only this model (repeatable)")
    p.add_argument("--request-id", action="append", default=[], metavar="ID",
                   help="only this request id (repeatable)")
    p.add_argument("--status", action="append", default=[], choices=STATUSES,
                   help="only responses (and dead letters) with this status")
    p.add_argument("--topics", default="requests,responses",
                   help=f"comma-separated, of {','.join(TOPIC_CHOICES)} (default: requests,responses; "
                   "requests is both lanes, interactive and batch)")
    p.add_argument("--format", choices=FORMATS, help="jsonl or table (default: table on a terminal, else jsonl)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--join", action="store_true",
                      help="pair requests with responses and print a report: unanswered requests, "
                      "orphan responses, duplicates, latency percentiles per model; exit 1 if any "
                      "request in the range has no response")
    mode.add_argument("--resubmit", action="store_true",
                      help="submit the selected requests again with new ids (original_id links back); "
                      "prints the new ids")
    p.add_argument("--grace", type=float, default=DEFAULT_GRACE_MS / 1000, metavar="SECONDS",
                   help="--join: look this far past --until for answers and before --since for "
                   "requests (default: 600)")
    p.add_argument("--resubmit-model", metavar="ID", help="--resubmit: send the copies to this model instead")
    progress = p.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None,
                          help="progress bar on stderr (default: when stderr is a terminal)")
    progress.add_argument("--no-progress", dest="progress", action="store_false")


def options_from_args(args: argparse.Namespace) -> ReplayOptions:
    """Validate the arguments; raises :class:`ReplayArgumentError` with what to change."""
    from consumers.replay.reader import ReplayOptions

    topics = tuple(t.strip() for t in args.topics.split(",") if t.strip())
    if not topics:
        raise ReplayArgumentError(f"--topics is empty; choose from {', '.join(TOPIC_CHOICES)}")
    if args.resubmit_model and not args.resubmit:
        raise ReplayArgumentError("--resubmit-model needs --resubmit")
    selection = RecordFilter(
        since_ms=parse_time(args.since) if args.since else None,
        until_ms=parse_time(args.until) if args.until else None,
        sessions=frozenset(args.session),
        models=frozenset(args.model),
        request_ids=frozenset(args.request_id),
        statuses=frozenset(args.status),
    )
    return ReplayOptions(topics=topics, selection=selection, grace_ms=int(args.grace * 1000))


class ProgressBar:
    """Redraws one line on a terminal; on a file, writes a line at most every few seconds."""

    def __init__(self, stream: TextIO, tty: bool, min_interval_s: float = 0.2) -> None:
        self._stream = stream
        self._tty = tty
        self._interval = min_interval_s if tty else 5.0
        self._last = 0.0
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < self._interval:
            return
        self._last = now
        line = progress_line(done, total)
        self._stream.write(f"\r{line}" if self._tty else f"replay {line}\n")
        self._stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn and self._tty:
            self._stream.write("\n")


def run(args: argparse.Namespace, settings: Settings, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    from producers.client import ProducerError

    try:
        options = options_from_args(args)
    except ReplayError as exc:
        print(f"nexus replay: {exc}", file=err)
        return EXIT_USAGE
    table = args.format == "table" or (args.format is None and out.isatty())
    show_progress = args.progress if args.progress is not None else err.isatty()
    bar = ProgressBar(err, err.isatty()) if show_progress else None
    try:
        return asyncio.run(_run(args, settings, options, table, out, bar))
    except (ReplayError, ProducerError) as exc:
        print(f"nexus replay: {exc}", file=err)
        return EXIT_USAGE if isinstance(exc, ReplayError) and not isinstance(exc, ReplayKafkaError) else EXIT_KAFKA
    finally:
        if bar:
            bar.close()


async def _run(
    args: argparse.Namespace,
    settings: Settings,
    options: ReplayOptions,
    table: bool,
    out: TextIO,
    bar: ProgressBar | None,
) -> int:
    from consumers.replay.reader import join_report, replay_records, resubmit

    kafka = settings.kafka
    if args.join:
        report = await join_report(kafka, options, bar)
        out.write((report.to_text() if table else json.dumps(report.to_json())) + "\n")
        return 0 if report.complete else EXIT_INCOMPLETE
    if args.resubmit:
        done = await resubmit(kafka, options, model_id=args.resubmit_model, progress=bar)
        for r in done:
            out.write(f"{r.id}\t{r.original_id}\n" if table else json.dumps(
                {"id": r.id, "original_id": r.original_id, "model_id": r.model_id}) + "\n")
        return 0
    if not table:  # streamed as fetched: in offset order per partition
        async for record in replay_records(kafka, options, bar):
            out.write(jsonl_line(record) + "\n")
        return 0
    # For people: in time order across topics and partitions (so held in memory first).
    records = [record async for record in replay_records(kafka, options, bar)]
    records.sort(key=lambda r: (r.timestamp, r.topic, r.partition, r.offset))
    out.write(table_header() + "\n")
    for record in records:
        out.write(table_row(record) + "\n")
    return 0
