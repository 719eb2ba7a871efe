"""``nexus submit``: send one prompt, or many JSON requests from stdin, and print the answers.

    nexus submit --model llama3.1 "Hello!"               # prints the answer
    nexus submit --no-wait --model llama3.1 "Hello!"     # prints the id
    nexus submit - < requests.jsonl                      # one POST /infer body per line
    nexus submit --priority batch --tenant team-a - < requests.jsonl   # defaults for the lines

Every request is validated exactly as ``POST /infer`` validates its body
(:func:`schemas.validation.request_from_json`): a line may be a prompt (``input``) or a
conversation (``messages``, ``tools``, ``tool_choice``, ``format``, ``keep_alive``, ``options``).
With ``-``, nothing is submitted unless every line is valid and fits one Kafka record
(:data:`schemas.limits.MAX_RECORD_BYTES`), and no two lines share an id. Answers are printed as
they arrive, not in input order; ``--timeout`` bounds each request's wait, and one that times
out is reported on stderr while the others still print. An answer's tool calls are printed
after its text, one ``[tool call] name({...arguments...})`` line each.

``--priority`` and ``--tenant`` set a request's scheduling class and tenant; with ``-`` they are the
defaults of the lines that do not give ``priority`` or ``tenant`` themselves. Without a tenant, a
request counts against its session (:func:`schemas.validation.effective_tenant`, as at the gateway
without API keys). Batch requests go to the batch lane (``inference.requests.batch``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Any, TextIO

from nexus.settings import Settings
from schemas import PRIORITIES, Codec, InferenceRequest, InferenceResponse, encode_request
from schemas.limits import MAX_RECORD_BYTES

from schemas.validation import RejectedRequest, effective_tenant, request_from_json
from nexus.errors import NexusError

if TYPE_CHECKING:  # Kafka is loaded when the command runs, not when `nexus` parses
    from producers.client import RequestProducer

DEFAULT_WAIT_S = 120.0
EXIT_ERROR = 1  # an answer with status error, a timeout, Kafka unavailable
EXIT_INVALID = 2


class InvalidInputError(NexusError, ValueError):
    """A request given to ``nexus submit`` is not valid; the message says where."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help='the prompt, or "-" to read one JSON request per line from stdin (a POST /infer '
                   'body: a prompt in "input", or a conversation in "messages" with "tools", "format"...)')
    p.add_argument("--model", help="model id (required with a prompt)")
    p.add_argument("--session", help="session id of the model context (default: a new session)")
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE",
                   help="metadata of the model context (repeatable)")
    p.add_argument("--id", help="request id (default: generated)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--priority", choices=PRIORITIES,
                   help="scheduling class (default: interactive; with -, for lines without 'priority')")
    p.add_argument("--tenant", help="who the request counts against in fair sharing and limits "
                   "(default: its session; with -, for lines without 'tenant')")
    p.add_argument("--no-wait", action="store_true", help="print the ids once Kafka acknowledged, do not wait")
    p.add_argument("--timeout", type=float, default=DEFAULT_WAIT_S, metavar="SECONDS",
                   help=f"how long to wait for each answer, from its submission (default: {DEFAULT_WAIT_S:g}); "
                   "one that times out is reported on stderr, the others still print, and the exit code is 1")
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
    return with_defaults(body, args)


def with_defaults(body: Any, args: argparse.Namespace) -> Any:
    """``body`` with ``--priority`` and ``--tenant`` filled in where it gives none."""
    if not isinstance(body, dict):
        return body  # request_from_json says what is wrong with it
    defaults = {"priority": getattr(args, "priority", None), "tenant": getattr(args, "tenant", None)}
    return {**{k: v for k, v in defaults.items() if v is not None}, **body}


def with_tenant(request: InferenceRequest) -> InferenceRequest:
    """The tenant the request counts against, as an edge without API keys picks it."""
    return dataclasses.replace(
        request, tenant=effective_tenant(request.key_name, request.tenant, request.context.session_id))


def requests_from_lines(
    lines: Iterable[str], known_models: Collection[str], codec: Codec | None = None,
    args: argparse.Namespace | None = None,
) -> list[InferenceRequest]:
    """One request per non-blank line of JSON; the first bad line stops everything.

    With ``codec``, a request whose encoding would not fit one Kafka record is a bad line too.
    With ``args``, its ``--priority`` and ``--tenant`` are the defaults of the lines.
    """
    requests = []
    lines_of: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            body = json.loads(line)
            request = with_tenant(request_from_json(body if args is None else with_defaults(body, args),
                                                    known_models))
        except (json.JSONDecodeError, RecursionError) as exc:
            raise InvalidInputError(f"line {number}: not valid JSON: {exc}") from None
        except RejectedRequest as exc:
            raise InvalidInputError(f"line {number}: {exc.message}") from None
        if codec is not None:
            check_size(codec, request, f"line {number}: ")
        if request.id in lines_of:
            raise InvalidInputError(f"line {number}: request id {request.id!r} is also on line "
                                    f"{lines_of[request.id]}; each request needs its own id")
        lines_of[request.id] = number
        requests.append(request)
    if not requests:
        raise InvalidInputError("no requests on stdin (expected one JSON object per line)")
    return requests


def check_size(codec: Codec, request: InferenceRequest, where: str = "") -> None:
    """Refuse, before anything is submitted, a request the producer would refuse as too large."""
    size = len(encode_request(codec, request))
    if size > MAX_RECORD_BYTES:
        raise InvalidInputError(
            f"{where}request {request.id} is {size} bytes encoded; the limit is {MAX_RECORD_BYTES} "
            "(a request must fit one Kafka record)"
        )


def answer_lines(response: InferenceResponse) -> list[str]:
    """What ``nexus submit`` prints for an answer: its text (when there is some), then one
    ``[tool call] name({...})`` line per tool call, arguments as JSON."""
    lines = [response.output] if response.output or not response.tool_calls else []
    for call in response.tool_calls:
        arguments = call.to_json()["arguments"]
        shown = json.dumps(arguments, ensure_ascii=False) if isinstance(arguments, dict) else arguments
        lines.append(f"[tool call] {call.name}({shown})")
    return lines


def run(args: argparse.Namespace, settings: Settings, stdin: TextIO = sys.stdin,
        out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    bulk = args.prompt == "-"
    try:
        codec = Codec.from_directory()
        if bulk:
            requests = requests_from_lines(stdin, settings.model_ids, codec, args)
        else:
            requests = [with_tenant(request_from_json(body_from_args(args), settings.model_ids))]
            check_size(codec, requests[0])
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
        return await print_as_answered(producer, requests, args.timeout, as_json, out, err)


async def print_as_answered(producer: RequestProducer, requests: list[InferenceRequest], timeout_s: float,
                            as_json: bool, out: TextIO, err: TextIO) -> int:
    """Submit every request and print each answer as it arrives, in the order they arrive.

    Each request waits ``timeout_s`` from its submission; one unanswered by then is reported on
    ``err`` (it stays submitted) while the others still print. Returns the exit code: 1 if any
    request timed out, could not be submitted, or was answered with another status than ok.
    """
    from producers.client import ProducerError, ResponseTimeoutError

    async def answer(request: InferenceRequest) -> tuple[InferenceRequest, InferenceResponse | ProducerError]:
        try:
            return request, await producer.submit_and_wait(request, timeout_s)
        except ProducerError as exc:
            return request, exc

    failed = 0
    # Started in input order, so the requests are produced in that order.
    for next_answer in asyncio.as_completed([asyncio.ensure_future(answer(r)) for r in requests]):
        request, outcome = await next_answer
        if isinstance(outcome, ResponseTimeoutError):
            failed += 1
            print(f"nexus submit: request {request.id} ({request.model_id}): no answer within {timeout_s:g}s "
                  "(--timeout); it stays submitted", file=err, flush=True)
        elif isinstance(outcome, ProducerError):
            failed += 1
            print(f"nexus submit: request {request.id} ({request.model_id}): {outcome}", file=err, flush=True)
        else:
            failed += outcome.status != "ok"
            print_answer(outcome, as_json, out, err)
    return EXIT_ERROR if failed else 0


def print_answer(response: InferenceResponse, as_json: bool, out: TextIO, err: TextIO) -> None:
    """One answer: its JSON line, or its text and tool calls; an answer that is not ok on ``err``."""
    if as_json:
        out.write(json.dumps(response.to_json(), ensure_ascii=False) + "\n")
    elif response.status == "ok":
        out.write("".join(line + "\n" for line in answer_lines(response)))
    elif response.status == "error":
        print(f"nexus submit: {response.model_id} answered with an error: {response.error}", file=err)
    else:  # expired or cancelled
        print(f"nexus submit: {response.model_id} answered {response.status}: {response.error}", file=err)
    out.flush()  # a pipe reader sees each answer when it arrives, not at exit
    err.flush()
