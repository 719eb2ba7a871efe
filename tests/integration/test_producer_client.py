"""The producer API for other systems, and ``nexus submit``, on the real broker."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import textwrap
import threading
import uuid

import pytest

from localdev.broker import free_port
from nexus.settings import KafkaSettings
from nexus.kafka.topics import ensure_topics
from producers import (
    ProducerClosedError,
    RequestProducer,
    ResponsesUnavailableError,
    ResponseTimeoutError,
    SubmitError,
    SyncRequestProducer,
)
from schemas import InferenceRequest, ModelContext
from tests.integration.support import REPO, TopicReader


def simulated(model: str, prompt: str) -> str:
    return f"[simulated {model}] You said: {prompt}"


def _request(text: str, model: str = "llama3.1") -> InferenceRequest:
    return InferenceRequest(uuid.uuid4().hex, model, text, ModelContext(f"client-{uuid.uuid4().hex[:6]}", {"k": "v"}))


def _private_topics(bootstrap: str) -> KafkaSettings:
    run = uuid.uuid4().hex[:8]
    return KafkaSettings(bootstrap=bootstrap, partitions=2, requests_topic=f"c-{run}.requests",
                         responses_topic=f"c-{run}.responses", dlq_topic=f"c-{run}.dlq",
                         tokens_topic=f"c-{run}.tokens")


async def test_submit_and_wait_returns_the_answer_read_from_kafka(stack: dict[str, str]) -> None:
    kafka = KafkaSettings(bootstrap=stack["NEXUS_KAFKA_BOOTSTRAP"])
    async with RequestProducer(kafka) as producer:
        request = _request("Hello, world!")
        response = await producer.submit_and_wait(request, timeout_s=30)
        assert (response.id, response.status, response.output) == (
            request.id, "ok", simulated("llama3.1", "Hello, world!"))
        assert response.context == request.context
        # An error answer is returned, not raised: it is the answer.
        unknown = await producer.submit_and_wait(_request("x", model="no-such-model"), timeout_s=30)
        assert unknown.status == "error" and "no-such-model" in (unknown.error or "")
        # Many at once, answers in the order asked; the listener is shared.
        batch = [_request(f"q{i}", model=("llama3.1", "mistral")[i % 2]) for i in range(20)]
        answers = await producer.submit_many_and_wait(batch, timeout_s=30)
        assert [a.id for a in answers] == [r.id for r in batch]
        assert [a.output for a in answers] == [simulated(r.model_id, r.input) for r in batch]
        # The answers are addressed to this producer, so its reader skips everyone else's unread.
        assert {a.reply_to for a in answers} == {producer.name} and producer.name.startswith("producer-")
        with pytest.raises(ValueError, match="leave reply_to unset"):
            await producer.submit_and_wait(dataclasses.replace(_request("x"), reply_to="gateway-other"))


async def test_no_answer_in_time_is_a_typed_timeout_and_the_request_stays_submitted(bootstrap: str) -> None:
    kafka = _private_topics(bootstrap)  # no worker reads these topics
    await ensure_topics(kafka)
    async with TopicReader(bootstrap, kafka.requests_topic) as requests:
        async with RequestProducer(kafka) as producer:
            request = _request("anyone?")
            with pytest.raises(ResponseTimeoutError) as info:
                await producer.submit_and_wait(request, timeout_s=0.5)
        assert isinstance(info.value, TimeoutError)
        assert info.value.request_id == request.id and "not answered within 0.5s" in str(info.value)
        await requests.read_until(lambda records: len(records) == 1, timeout=10)


async def test_unreadable_responses_topic_and_unreachable_kafka_are_typed_errors(bootstrap: str) -> None:
    kafka = _private_topics(bootstrap)  # never created
    async with RequestProducer(kafka) as producer:
        with pytest.raises(ResponsesUnavailableError, match="does not exist.*start a Nexus worker"):
            await producer.submit_and_wait(_request("x"), timeout_s=1)
    with pytest.raises(SubmitError, match=f"127.0.0.1:{(port := free_port())}"):
        async with RequestProducer(KafkaSettings(bootstrap=f"127.0.0.1:{port}")):
            pass


def test_sync_producer_works_without_an_event_loop(stack: dict[str, str]) -> None:
    kafka = KafkaSettings(bootstrap=stack["NEXUS_KAFKA_BOOTSTRAP"])
    results: dict[str, object] = {}

    def plain_thread() -> None:  # no asyncio anywhere in the caller
        with SyncRequestProducer(kafka) as producer:
            results["id"] = producer.submit(_request("fire and forget"))
            results["answer"] = producer.submit_and_wait(_request("sync?"), timeout_s=30)
            results["many"] = producer.submit_many_and_wait([_request("a"), _request("b", "mistral")], timeout_s=30)
        try:
            producer.submit(_request("too late"))
        except ProducerClosedError as exc:
            results["closed"] = exc
        producer.close()  # twice is fine

    thread = threading.Thread(target=plain_thread)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert isinstance(results["id"], str)
    assert results["answer"].output == simulated("llama3.1", "sync?")  # type: ignore[attr-defined]
    assert [a.output for a in results["many"]] == [  # type: ignore[attr-defined]
        simulated("llama3.1", "a"), simulated("mistral", "b")]
    assert isinstance(results["closed"], ProducerClosedError)


def test_client_needs_only_schemas_settings_and_aiokafka(stack: dict[str, str]) -> None:
    """Another system's process: the worker, gateway, bridge and their dependencies are not importable."""
    script = textwrap.dedent(f"""
        import sys
        BLOCKED = ("streams", "consumers", "localdev", "faust", "aiohttp", "httpx", "prometheus_client",
                   "websockets", "producers.gateway.app", "producers.gateway.dropin", "producers.gateway.models",
                   "producers.gateway.openapi", "producers.gateway.page", "producers.gateway.access",
                   "producers.submit", "schemas.validation")
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.startswith(BLOCKED):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from nexus.settings import KafkaSettings
        from producers import SyncRequestProducer
        from schemas import InferenceRequest, ModelContext, new_id
        with SyncRequestProducer(KafkaSettings(bootstrap={stack["NEXUS_KAFKA_BOOTSTRAP"]!r})) as producer:
            response = producer.submit_and_wait(
                InferenceRequest(new_id(), "mistral", "standalone", ModelContext(new_id())), timeout_s=30)
        print(response.output)
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("producers", "nexus", "schemas")))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    output, modules = done.stdout.splitlines()
    assert output == simulated("mistral", "standalone")
    assert "producers.gateway.app" not in modules and "'streams" not in modules


# --- nexus submit ---------------------------------------------------------------------------------


def _submit(stack: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nexus", "submit", "--bootstrap", stack["NEXUS_KAFKA_BOOTSTRAP"], *args],
        cwd=REPO, input=stdin, capture_output=True, text=True, timeout=60,
        env={k: v for k, v in stack.items() if k != "NEXUS_WORKER_WEB_PORT"},
    )


def test_submit_command_prints_the_answer_or_the_id(stack: dict[str, str]) -> None:
    done = _submit(stack, "--model", "llama3.1", "--session", "cli", "--meta", "user=alice", "Hello from the CLI")
    assert done.returncode == 0, done.stderr
    assert done.stdout == simulated("llama3.1", "Hello from the CLI") + "\n"

    as_json = _submit(stack, "--model", "mistral", "--json", "--meta", "user=bob", "hi")
    response = json.loads(as_json.stdout)
    assert response["output"] == simulated("mistral", "hi") and response["context"]["metadata"] == {"user": "bob"}

    no_wait = _submit(stack, "--model", "mistral", "--no-wait", "--id", "cli-no-wait-1", "later")
    assert no_wait.returncode == 0 and no_wait.stdout == "cli-no-wait-1\n"


def test_submit_command_reads_json_lines_from_stdin(stack: dict[str, str]) -> None:
    run = uuid.uuid4().hex[:8]
    lines = [
        {"id": f"{run}-1", "model_id": "llama3.1", "input": "one"},
        {"id": f"{run}-2", "model_id": "mistral", "input": "two", "context": {"session_id": run, "metadata": {}}},
        {"id": f"{run}-3", "model_id": "llama3.1", "input": "three", "options": {"temperature": 0}},
    ]
    done = _submit(stack, "-", stdin="\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]  # in the order they arrived
    assert sorted((a["id"], a["output"]) for a in answers) == sorted(
        (x["id"], simulated(x["model_id"], x["input"])) for x in lines)

    no_wait = _submit(stack, "-", "--no-wait", stdin=json.dumps({"id": f"{run}-4", "model_id": "mistral", "input": "x"}))
    assert no_wait.stdout == f"{run}-4\n"


async def test_submit_command_refuses_bad_input_and_submits_nothing(stack: dict[str, str]) -> None:
    run = uuid.uuid4().hex[:8]
    good = json.dumps({"id": f"{run}-good", "model_id": "llama3.1", "input": "fine"})
    async with TopicReader(stack["NEXUS_KAFKA_BOOTSTRAP"], "inference.requests") as requests:
        cases = [
            (["-"], good + "\n{not json\n", "line 2: not valid JSON"),
            (["-"], good + '\n{"model_id": "gpt-17", "input": "x"}\n', "line 2: unknown model 'gpt-17'"),
            (["-"], good + '\n{"model_id": "llama3.1"}\n', "line 2: missing required field 'input'"),
            (["-"], "\n", "no requests on stdin"),
            (["hi"], None, "--model is required"),
            (["--model", "gpt-17", "hi"], None, "unknown model 'gpt-17'"),
            (["--model", "llama3.1", "--meta", "novalue", "hi"], None, "expected KEY=VALUE"),
        ]
        for args, stdin, message in cases:
            done = await asyncio.to_thread(_submit, stack, *args, stdin=stdin)
            assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
            assert done.stdout == ""
        written = await requests.drain()
    assert not [r for r in written if run.encode() in r.value]
