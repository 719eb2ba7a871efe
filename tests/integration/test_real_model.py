"""Nexus answering with a real model: Ollama 0.17.4 serving SmolLM2-135M (see localdev/ollama.py).

A worker and a gateway on topics of their own, configured with the real Ollama as the one
endpoint of ``smollm2:135m``. What only a real model server shows is checked here: its own
token counts and stop reasons, determinism under a seed, its "server busy" when its queue is
full. Generations are a few tokens, so the tier takes about a minute.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, UTC
from pathlib import Path
from typing import Any, Literal

import httpx
import ollama
import openai
import pydantic
import pytest
from prometheus_client.parser import text_string_to_metric_families

from localdev.ollama import MODEL_NAME, LocalOllama, free_port
from nexus.kafka.topics import ensure_topics
from nexus.settings import KafkaSettings
from producers import RequestProducer
from schemas import decode_token
from tests.eventually import eventually
from tests.integration.support import CODEC, Role, TopicReader, stack_env, start_gateway, wait_for_responses

FEW = {"temperature": 0, "seed": 42, "max_tokens": 4}


async def _stack(bootstrap: str, endpoint: str, logs_dir: Path, config_dir: Path, max_concurrency: int = 2,
                 ) -> tuple[dict[str, str], list[Role]]:
    run = uuid.uuid4().hex[:8]
    config = config_dir / f"nexus-{run}.toml"
    config.write_text(
        f'[models."{MODEL_NAME}"]\n'
        f'endpoints = [{{ url = "{endpoint}", max_concurrency = {max_concurrency} }}]\n'
        "timeout_s = 120\n"
    )
    topics = {key: f"real{run}.{key}" for key in ("requests", "responses", "dlq", "tokens", "state")}
    env = stack_env(bootstrap, endpoint, NEXUS_CONFIG=str(config), NEXUS_KAFKA_PARTITIONS="2",
                    NEXUS_WORKER_APP_ID=f"nexus-real-{run}",
                    **{f"NEXUS_KAFKA_{key.upper()}_TOPIC": name for key, name in topics.items()})
    await ensure_topics(KafkaSettings(bootstrap=bootstrap, partitions=2,
                                      **{f"{key}_topic": name for key, name in topics.items()}))
    worker = Role(f"worker-real-{run}", ["worker"], env, logs_dir).start()
    gateway = start_gateway(env, logs_dir)
    return {**env, "GATEWAY_URL": gateway.url, **topics}, [gateway, worker]


@pytest.fixture()
async def real_stack(bootstrap: str, real_ollama: str, logs_dir: Path, tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    env, roles = await _stack(bootstrap, real_ollama, logs_dir, tmp_path)
    try:
        yield env
    finally:
        for role in roles:
            role.stop()


async def _metric(env: dict[str, str], name: str) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{env['NEXUS_WORKER_WEB_PORT']}/metrics", timeout=5)).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


async def test_infer_with_the_real_model_echoes_the_context_and_repeats_from_the_cache(
    real_stack: dict[str, str],
) -> None:
    gateway, run = real_stack["GATEWAY_URL"], uuid.uuid4().hex[:6]
    context = {"session_id": f"s-{run}", "metadata": {"user": "alice", "lang": "en"}}
    body = {"model_id": MODEL_NAME, "input": "The capital of France is", "context": context, "options": FEW}
    async with TopicReader(real_stack["NEXUS_KAFKA_BOOTSTRAP"], real_stack["responses"]) as responses, \
            httpx.AsyncClient(base_url=gateway, timeout=30) as http:
        assert (await http.post("/infer", json={"id": f"first-{run}", **body})).status_code == 202
        first = (await wait_for_responses(responses, {f"first-{run}"}, timeout=180)).by_id[f"first-{run}"][0]
        await eventually(lambda: _metric(real_stack, "nexus_worker_cache_entries"), "the answer is in the cache")
        assert (await http.post("/infer", json={"id": f"again-{run}", **body})).status_code == 202
        again = (await wait_for_responses(responses, {f"again-{run}"}, timeout=60)).by_id[f"again-{run}"][0]
    assert first.status == "ok", first.error
    assert first.output.strip() and "simulated" not in first.output
    assert first.context.session_id == f"s-{run}" and first.context.metadata == context["metadata"]
    assert 0 < first.completion_tokens <= FEW["max_tokens"] and first.prompt_tokens > 0
    assert first.done_reason == "length" and not first.cached
    assert (again.status, again.output, again.cached) == ("ok", first.output, True)


async def test_the_ollama_and_openai_clients_get_real_answers_whole_and_streamed(real_stack: dict[str, str]) -> None:
    gateway = real_stack["GATEWAY_URL"]
    client = ollama.AsyncClient(host=gateway)
    options = {"temperature": 0, "seed": 7, "num_predict": 4}
    whole = await client.generate(model=MODEL_NAME, prompt="Name a colour.", options=options)
    parts = [part async for part in await client.chat(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Name a fruit."}], options=options, stream=True)]
    assert whole.response.strip() and whole.done and 0 < whole.eval_count <= 4
    assert parts[-1].done and "".join(p.message.content for p in parts).strip()

    oa = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="unused")
    chat = await oa.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Say hi."}],
                                            max_tokens=4, temperature=0, seed=3)
    assert chat.choices[0].message.content and chat.usage is not None and 0 < chat.usage.completion_tokens <= 4
    stream = await oa.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Say bye."}],
                                              max_tokens=4, temperature=0, seed=3, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text.strip()


@pytest.fixture()
def busy_ollama(logs_dir: Path) -> Iterator[str]:
    """A second real Ollama with one slot and a queue of one: it answers 503 "server busy" early."""
    server = LocalOllama(port=free_port(), env={"OLLAMA_NUM_PARALLEL": "1", "OLLAMA_MAX_QUEUE": "1"},
                         log_path=logs_dir / "busy-ollama.log")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


async def test_a_busy_ollama_is_backed_off_and_every_request_is_answered(
    bootstrap: str, busy_ollama: str, logs_dir: Path, tmp_path: Path
) -> None:
    env, roles = await _stack(bootstrap, busy_ollama, logs_dir, tmp_path, max_concurrency=6)
    run, count = uuid.uuid4().hex[:6], 8
    ids = {f"busy-{run}-{i}" for i in range(count)}
    try:
        async with TopicReader(bootstrap, env["responses"]) as responses, \
                httpx.AsyncClient(base_url=env["GATEWAY_URL"], timeout=30) as http:
            replies = await asyncio.gather(*(http.post("/infer", json={
                "id": i, "model_id": MODEL_NAME, "input": f"Count to three ({i}).",
                "options": {"max_tokens": 4, "temperature": 0, "seed": 1}}) for i in sorted(ids)))
            assert all(r.status_code == 202 for r in replies)
            answers = await wait_for_responses(responses, ids, timeout=240)
            models: dict[str, Any] = (await http.get("/models")).json()
    finally:
        for role in roles:
            role.stop()
    statuses = {i: answers.by_id[i][0].status for i in ids}
    assert set(statuses.values()) == {"ok"}, {i: answers.by_id[i][0].error for i in ids}
    [live] = [e["live"] for m in models["models"] if m["id"] == MODEL_NAME for e in m["endpoints"]]
    # Ollama said "server busy" (queue of 1 behind 1 slot, 6 sent at once): Nexus lowered its limit.
    assert live.get("concurrency_limit") is not None and live["concurrency_limit"] < 6, live


@pytest.fixture()
def killable_ollama(logs_dir: Path) -> Iterator[LocalOllama]:
    """A real Ollama of this test's own, which the test kills and starts again on the same port."""
    server = LocalOllama(port=free_port(), log_path=logs_dir / "killable-ollama.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_the_endpoint_killed_mid_stream_and_restarted_ends_that_request_clearly_and_loses_nothing(
    bootstrap: str, killable_ollama: LocalOllama, logs_dir: Path, tmp_path: Path
) -> None:
    env, roles = await _stack(bootstrap, killable_ollama.url, logs_dir, tmp_path)
    run = uuid.uuid4().hex[:6]
    streamed, later = f"cut-{run}", {f"later-{run}-{i}" for i in range(3)}
    try:
        async with TopicReader(bootstrap, env["responses"]) as responses, \
                TopicReader(bootstrap, env["tokens"]) as tokens, \
                httpx.AsyncClient(base_url=env["GATEWAY_URL"], timeout=30) as http:
            reply = await http.post("/infer", json={
                "id": streamed, "model_id": MODEL_NAME, "stream": True,
                "input": "Tell a long story about a lighthouse keeper and the sea.",
                "options": {"max_tokens": 400, "temperature": 0, "seed": 5}})
            assert reply.status_code == 202, reply.text
            # Tokens are flowing: the generation is under way when its server dies.
            await tokens.read_until(lambda records: any(decode_token(CODEC, r.value).id == streamed
                                                        for r in records), timeout=180)
            os.killpg(killable_ollama.pid or 0, signal.SIGKILL)
            killable_ollama.wait(timeout=30)
            # Accepted while the endpoint is down: they wait for it, not fail.
            for i in sorted(later):
                reply = await http.post("/infer", json={
                    "id": i, "model_id": MODEL_NAME, "input": f"Say a number ({i}).",
                    "options": {"max_tokens": 3, "temperature": 0, "seed": 1}})
                assert reply.status_code == 202, reply.text
            cut = (await wait_for_responses(responses, {streamed}, timeout=60)).by_id[streamed]
            killable_ollama.start()
            answers = await wait_for_responses(responses, later | {streamed}, timeout=180)
    finally:
        for role in roles:
            role.stop()
    # The cut stream cannot be retried (its tokens were out): it ends once, as an error naming why.
    [first] = cut
    assert first.status == "error" and killable_ollama.url in (first.error or ""), first.error
    assert first.output == ""
    for i in later:
        [answer] = answers.by_id[i]
        assert answer.status == "ok" and answer.output.strip(), answer.error
    assert answers.by_id[streamed] == cut, "the cut request is answered once"


class Colour(pydantic.BaseModel):
    colour: Literal["red", "green", "blue"]


async def test_structured_output_and_json_mode_are_enforced_by_the_real_model(real_stack: dict[str, str]) -> None:
    """Ollama enforces a JSON schema ``format`` with constrained decoding for any model, the 135M one too."""
    gateway = real_stack["GATEWAY_URL"]
    client = ollama.AsyncClient(host=gateway)
    options = {"temperature": 0, "seed": 11, "num_predict": 24}
    reply = await client.chat(model=MODEL_NAME, messages=[{"role": "user", "content": "Name a colour of the sky."}],
                              format=Colour.model_json_schema(), options=options)
    assert Colour.model_validate_json(reply.message.content).colour in ("red", "green", "blue")

    oa = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)
    parsed = await oa.chat.completions.parse(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Name a colour of grass."}], response_format=Colour,
        max_tokens=24, temperature=0, seed=11)
    assert parsed.choices[0].message.parsed is not None and parsed.choices[0].message.parsed.colour in (
        "red", "green", "blue")

    # JSON mode lets the model write any JSON; this one rambles past a few tokens, so the answer is
    # checked as JSON cut short: it opens an object where the same question unconstrained gets prose.
    question = [{"role": "user", "content": "What colour is the sky?"}]
    json_mode = await oa.chat.completions.create(
        model=MODEL_NAME, messages=question, response_format={"type": "json_object"}, max_tokens=8, temperature=0, seed=11)
    prose = await oa.chat.completions.create(model=MODEL_NAME, messages=question, max_tokens=8, temperature=0, seed=11)
    constrained = json_mode.choices[0]
    assert (constrained.message.content or "").lstrip().startswith("{"), constrained.message.content
    assert not (prose.choices[0].message.content or "").lstrip().startswith("{"), prose.choices[0].message.content
    if constrained.finish_reason == "stop":
        assert isinstance(json.loads(constrained.message.content or ""), dict)


async def test_a_model_without_tools_refuses_them_with_its_own_error_in_each_clients_shape(
    real_stack: dict[str, str],
) -> None:
    gateway = real_stack["GATEWAY_URL"]
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    with pytest.raises(ollama.ResponseError) as ollama_refused:
        await ollama.AsyncClient(host=gateway).chat(model=MODEL_NAME, messages=messages, tools=[tool])
    assert ollama_refused.value.status_code == 400
    assert "does not support tools" in ollama_refused.value.error
    oa = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as openai_refused:
        await oa.chat.completions.create(model=MODEL_NAME, messages=messages, tools=[tool])  # type: ignore[arg-type,list-item]
    assert "does not support tools" in openai_refused.value.message


GIN_LINE = re.compile(r'\[GIN\] (\d{4}/\d\d/\d\d - \d\d:\d\d:\d\d) \| +(\d+) \| +([\d.]+)(µs|ms|s) \|.*POST +"/api/generate"')


def generate_calls(log: Path) -> list[tuple[datetime, float]]:
    """(when it ended, how long it took in seconds) of each /api/generate call in an Ollama log."""
    units = {"µs": 1e-6, "ms": 1e-3, "s": 1.0}
    return [
        (datetime.strptime(m[1], "%Y/%m/%d - %H:%M:%S").replace(tzinfo=UTC), float(m[3]) * units[m[4]])
        for m in GIN_LINE.finditer(log.read_text(errors="replace"))
    ]


@pytest.fixture()
def one_slot_ollama(logs_dir: Path) -> Iterator[LocalOllama]:
    """A real Ollama of this test's own with one slot: a second generation waits for the first."""
    server = LocalOllama(port=free_port(), env={"OLLAMA_NUM_PARALLEL": "1"}, log_path=logs_dir / "one-slot-ollama.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_cancelling_a_streamed_answer_stops_the_real_models_generation(
    bootstrap: str, one_slot_ollama: LocalOllama, logs_dir: Path, tmp_path: Path
) -> None:
    """A generation asked for 600 tokens of counting is cancelled once its tokens flow: Nexus closes
    the stream, Ollama ends the call then (its log says when, and how long it ran), not 600 tokens
    later; the answer is ``cancelled`` with what was streamed; a request behind it is answered."""
    env, roles = await _stack(bootstrap, one_slot_ollama.url, logs_dir, tmp_path, max_concurrency=1)
    run = uuid.uuid4().hex[:6]
    long, short = f"long-{run}", f"short-{run}"
    kafka = KafkaSettings(bootstrap=bootstrap, requests_topic=env["requests"])
    try:
        async with TopicReader(bootstrap, env["responses"]) as responses, \
                TopicReader(bootstrap, env["tokens"]) as tokens, \
                RequestProducer(kafka) as producer, \
                httpx.AsyncClient(base_url=env["GATEWAY_URL"], timeout=30) as http:
            reply = await http.post("/infer", json={
                "id": long, "model_id": MODEL_NAME, "stream": True,
                "input": "Count from 1 to 1000, one number per line.",
                "options": {"max_tokens": 600, "temperature": 0, "seed": 5}})
            assert reply.status_code == 202, reply.text
            await tokens.read_until(lambda records: any(decode_token(CODEC, r.value).id == long
                                                        for r in records), timeout=180)
            cancelled_at = datetime.now(UTC)
            await producer.cancel(long, reason="the user closed the tab")
            reply = await http.post("/infer", json={
                "id": short, "model_id": MODEL_NAME, "input": "Say yes.",
                "options": {"max_tokens": 3, "temperature": 0, "seed": 1}})
            assert reply.status_code == 202, reply.text
            answers = await wait_for_responses(responses, {long, short}, timeout=180)
            streamed = "".join(t.text for t in sorted(
                (decode_token(CODEC, r.value) for r in await tokens.drain()
                 if decode_token(CODEC, r.value).id == long), key=lambda t: t.seq))
    finally:
        for role in roles:
            role.stop()
    [cancelled] = answers.by_id[long]
    assert cancelled.status == "cancelled" and cancelled.error == "cancelled: the user closed the tab"
    assert cancelled.output and cancelled.output == streamed, "the answer holds what was streamed, all of it"
    [answered] = answers.by_id[short]
    assert answered.status == "ok" and answered.output.strip(), answered.error
    calls = generate_calls(one_slot_ollama.log_path)
    assert len(calls) >= 2, calls
    ended, _ = calls[0]  # the long one: the first generation this Ollama ever ran
    # Ended by the closed stream, seconds after the cancel (second resolution in the log), instead
    # of running on to its 600 tokens while the next request waited for its only slot.
    assert (ended - cancelled_at).total_seconds() < 5, (ended, cancelled_at, calls, len(streamed))
