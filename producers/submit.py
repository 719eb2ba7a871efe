"""``nexus submit``: send one prompt, or many JSON requests from stdin, and print the answers.

    nexus submit --model llama3.1 "Hello!"               # prints the answer
    nexus submit --no-wait --model llama3.1 "Hello!"     # prints the id
    nexus submit - < requests.jsonl                      # one POST /infer body per line

Every request is validated exactly as ``POST /infer`` validates its body
(:func:`schemas.validation.request_from_json`); with ``-``, nothing is submitted
unless every line is valid.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Collection, Iterable
from typing import Any, TextIO

from nexus.settings import Settings
from schemas import InferenceRequest

from schemas.validation import RejectedRequest, request_from_json
from nexus.errors import NexusError

DEFAULT_WAIT_S = 120.0
EXIT_ERROR = 1  # an answer with status error, a timeout, Kafka unavailable
EXIT_INVALID = 2


class InvalidInputError(NexusError, ValueError):
    """A request given to ``nexus submit`` is not valid; the message says where."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help='the prompt, or "-" to read one JSON request per line from stdin')
    p.add_argument("--model", help="model id (required with a prompt)")
    p.add_argument("--session", help="session id of the model context (default: a new session)")
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                   help="metadata of the model context (repeatable)")
    p.add_argument("--id", help="request id (default: generated)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--no-wait", action="store_true", help="print the ids once Kafka acknowledged, do not wait")
    p.add_argument("--timeout", type=float, default=DEFAULT_WAIT_S, metavar="SECONDS",
                   help=f"how long to wait for the answers (default: {DEFAULT_WAIT_S:g})")
    p.add_argument("--json", action="store_true", help="print whole responses as JSON lines (default for -)")


def body_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``POST /infer`` body the arguments describe."""
    if not args.model:
        raise InvalidInputError("--model is required with a prompt")
    body: dict[str, Any] = {"model_id": args.model, "input": args.prompt}
    if args.id:
        body["id"] = args.id
    metadata = {}
    for item in args.meta:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidInputError(f"--meta {item!r}: expected KEY=VALUE")
        metadata[key] = value
    if args.session or metadata:
        body["context"] = {"session_id": args.session, "metadata": metadata}
    options = {k: v for k, v in (("temperature", args.temperature), ("max_tokens", args.max_tokens),
                                 ("seed", args.seed)) if v is not None}
    if options:
        body["options"] = options
    return body


def requests_from_lines(lines: Iterable[str], known_models: Collection[str]) -> list[InferenceRequest]:
    """One request per non-blank line of JSON; the first bad line stops everything."""
    requests = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            requests.append(request_from_json(json.loads(line), known_models))
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"line {number}: not valid JSON: {exc}") from None
        except RejectedRequest as exc:
            raise InvalidInputError(f"line {number}: {exc.message}") from None
    if not requests:
        raise InvalidInputError("no requests on stdin (expected one JSON object per line)")
    return requests


def run(args: argparse.Namespace, settings: Settings, stdin: TextIO = sys.stdin,
        out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    bulk = args.prompt == "-"
    try:
        if bulk:
            requests = requests_from_lines(stdin, settings.model_ids)
        else:
            requests = [request_from_json(body_from_args(args), settings.model_ids)]
    except InvalidInputError as exc:
        print(f"nexus submit: {exc}", file=err)
        return EXIT_INVALID
    except RejectedRequest as exc:
        print(f"nexus submit: {exc.message}", file=err)
        return EXIT_INVALID
    from producers.client import ProducerError  # Kafka is loaded when the command runs, not when `nexus` parses

    try:
        return asyncio.run(_submit(settings, requests, args, bulk or args.json, out, err))
    except ProducerError as exc:
        print(f"nexus submit: {exc}", file=err)
        return EXIT_ERROR


async def _submit(settings: Settings, requests: list[InferenceRequest], args: argparse.Namespace,
                  as_json: bool, out: TextIO, err: TextIO) -> int:
    from producers.client import RequestProducer

    async with RequestProducer(settings.kafka) as producer:
        if args.no_wait:
            for request_id in await producer.submit_many(requests):
                out.write(request_id + "\n")
            return 0
        responses = await producer.submit_many_and_wait(requests, args.timeout)
    failed = 0
    for response in responses:
        failed += response.status != "ok"
        if as_json:
            out.write(json.dumps(response.to_json(), ensure_ascii=False) + "\n")
        elif response.status == "ok":
            out.write(response.output + "\n")
        else:
            print(f"nexus submit: {response.model_id} answered with an error: {response.error}", file=err)
    return EXIT_ERROR if failed else 0
