"""The official ``ollama`` and ``openai`` Python clients, unchanged, against Nexus on a real broker.

Every call goes gateway -> inference.requests -> worker -> simulator -> inference.responses
(and inference.tokens when streamed) -> the gateway's reply reader -> the client. The
simulator answers ``[simulated <model>] You said: <prompt>``, so each answer is checkable.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from schemas import decode_request, decode_response
from tests.integration.support import CODEC, Role, TopicReader, stack_env, start_gateway, start_simulator


def said(prompt: str, model: str = "llama3.1") -> str:
    return f"[simulated {model}] You said: {prompt}"


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex[:8]}"


def openai_client(url: str, **kwargs: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- Ollama's client


async def test_ollama_generate_carries_the_session_headers_into_the_pipeline(gateway_url: str, stack: dict[str, str]) -> None:
    prompt, session = unique("Hello, Nexus"), f"s-{uuid.uuid4().hex}"
    client = ollama.AsyncClient(host=gateway_url, headers={"X-Nexus-Session": session, "X-Nexus-Meta-User": "alice"})
    async with TopicReader(stack["NEXUS_KAFKA_BOOTSTRAP"], "inference.requests") as requests:
        reply = await client.generate(model="llama3.1", prompt=prompt, options={"temperature": 0, "seed": 1})
        records = await requests.read_until(
            lambda rs: any(decode_request(CODEC, r.value).input == prompt for r in rs), timeout=10)
    assert reply.response == said(prompt)
    assert reply.done and reply.done_reason == "stop" and reply.model == "llama3.1"
    assert reply.eval_count and reply.prompt_eval_count and reply.total_duration and reply.total_duration > 0
    request = next(decode_request(CODEC, r.value) for r in records if decode_request(CODEC, r.value).input == prompt)
    assert request.context.session_id == session and request.context.metadata == {"user": "alice"}
    assert request.reply_to and request.reply_to.startswith("gateway-")
    assert (request.options.temperature, request.options.seed, request.stream) == (0.0, 1, False)


def test_ollama_chat_stream_concatenates_to_the_non_streamed_answer(gateway_url: str) -> None:
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": unique("Hi there")}]
    expected = said(messages[1]["content"])  # the conversation reached /api/chat: the last user turn is echoed
    whole = ollama.Client(host=gateway_url).chat(model="llama3.1", messages=messages, options={"temperature": 0})
    assert whole.message.role == "assistant" and whole.message.content == expected
    # no-cache: the streamed answer comes from the model, not from the cache the first call filled.
    streaming = ollama.Client(host=gateway_url, headers={"X-Nexus-Cache": "no-cache"})
    parts = list(streaming.chat(model="llama3.1", messages=messages, options={"temperature": 0}, stream=True))
    assert parts[-1].done and parts[-1].done_reason == "stop" and parts[-1].eval_count
    assert all(not p.done for p in parts[:-1]) and len(parts) >= 2
    assert "".join(p.message.content or "" for p in parts) == whole.message.content


def test_ollama_generate_stream(gateway_url: str) -> None:
    prompt = unique("stream me")
    parts = list(ollama.Client(host=gateway_url).generate(model="mistral:latest", prompt=prompt, stream=True))
    assert "".join(p.response or "" for p in parts) == said(prompt, "mistral")
    assert parts[-1].done and parts[-1].model == "mistral:latest"  # echoed as the client spelled it


def test_ollama_lists_models_and_refuses_unknown_ones(gateway_url: str) -> None:
    client = ollama.Client(host=gateway_url)
    assert [m.model for m in client.list().models] == ["llama3.1", "mistral"]
    for stream in (False, True):
        with pytest.raises(ollama.ResponseError) as err:
            result = client.generate(model="no-such-model", prompt="x", stream=stream)
            if stream:
                list(result)  # type: ignore[arg-type]
        assert err.value.status_code == 404 and err.value.error == "model 'no-such-model' not found"


def test_root_is_ollamas_greeting_for_clients_and_the_page_for_browsers(gateway_url: str) -> None:
    plain = httpx.get(gateway_url + "/")
    assert plain.status_code == 200 and plain.text == "Ollama is running"
    page = httpx.get(gateway_url + "/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<html" in page.text.lower()
    assert httpx.get(gateway_url + "/api/version").json()["version"]


# --------------------------------------------------------------------------- OpenAI's client


def test_openai_chat_completion_and_completion(gateway_url: str) -> None:
    client = openai_client(gateway_url)
    question = unique("What is Kafka?")
    chat = client.chat.completions.create(
        model="llama3.1", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=200)
    assert chat.choices[0].message.content == said(question)
    assert chat.choices[0].finish_reason == "stop" and chat.object == "chat.completion"
    assert chat.usage is not None and chat.usage.completion_tokens > 0
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    prompt = unique("Once upon a time")
    text = client.completions.create(model="mistral", prompt=prompt, max_tokens=2)
    assert text.choices[0].text == "[simulated mistral]"  # two tokens, cut short
    assert text.choices[0].finish_reason == "length"
    assert [m.id for m in client.models.list()] == ["llama3.1", "mistral"]
    assert client.models.retrieve("mistral").owned_by == "nexus"


def test_openai_stream_with_usage_concatenates_to_the_non_streamed_answer(gateway_url: str) -> None:
    client = openai_client(gateway_url)
    messages = [{"role": "user", "content": unique("Stream this")}]
    whole = client.chat.completions.create(model="llama3.1", messages=messages, temperature=0)  # type: ignore[arg-type]
    chunks = list(client.chat.completions.create(
        model="llama3.1", messages=messages, temperature=0, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True}, extra_headers={"X-Nexus-Cache": "no-cache"}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    completion = list(client.completions.create(model="llama3.1", prompt="abc", stream=True))
    assert "".join(c.choices[0].text for c in completion) == said("abc")


def test_openai_errors_have_openais_shape(gateway_url: str) -> None:
    client = openai_client(gateway_url)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    assert "gpt-4o" in missing.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="llama3.1", messages=[{"role": "user", "content": "x"}], n=2)
    assert bad.value.type == "invalid_request_error" and bad.value.param == "n"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="llama3.1", input="x")  # not a route of Nexus: still OpenAI's shape
    raw = httpx.post(f"{gateway_url}/v1/chat/completions", content=b"{not json")
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}


def test_the_openapi_document_describes_the_real_answers(gateway_url: str) -> None:
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    spec = httpx.get(f"{gateway_url}/openapi.json").json()
    registry = Registry().with_resource("urn:spec", Resource.from_contents(spec, default_specification=DRAFT202012))
    chat = [{"role": "user", "content": "x"}]
    cases = [
        ("post", "/api/generate", {"model": "llama3.1", "prompt": "x", "stream": False}, 200),
        ("post", "/api/generate", {"model": "nope", "prompt": "x"}, 404),
        ("post", "/api/generate", {"model": "llama3.1", "prompt": "x", "images": ["aGk="], "stream": False}, 200),
        ("post", "/api/generate", {"model": "llama3.1", "prompt": "x", "raw": True}, 400),
        ("post", "/api/chat", {"model": "llama3.1", "messages": chat, "stream": False}, 200),
        ("get", "/api/tags", None, 200),
        ("get", "/api/version", None, 200),
        ("post", "/v1/chat/completions", {"model": "llama3.1", "messages": chat}, 200),
        ("post", "/v1/chat/completions", {"model": "gpt-4o", "messages": chat}, 404),
        ("post", "/v1/completions", {"model": "llama3.1", "prompt": "x", "max_tokens": 2}, 200),
        ("post", "/v1/completions", {"model": "llama3.1", "prompt": 5}, 400),
        ("get", "/v1/models", None, 200),
        ("post", "/api/chat", {"model": "llama3.1", "messages": [{"role": "user", "content": "x" * 2**20}]}, 413),
        ("post", "/v1/chat/completions", {"model": "llama3.1", "messages": [{"role": "user", "content": "x" * 2**20}]},
         413),
    ]
    for method, path, body, status in cases:
        reply = httpx.request(method.upper(), gateway_url + path, json=body)
        assert reply.status_code == status, (path, reply.text)
        documented = spec["paths"][path][method]["responses"][str(status)]
        schema = documented["content"]["application/json"]["schema"]
        validator = Draft202012Validator({"$ref": "urn:spec" + schema["$ref"]}, registry=registry)
        assert not list(validator.iter_errors(reply.json())), (path, reply.json())
        if status == 200 and body is not None:
            request_schema = spec["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
            assert Draft202012Validator({"$ref": "urn:spec" + request_schema["$ref"]}, registry=registry).is_valid(body)


# --------------------------------------------------------------------------- two gateways, 100 callers


async def test_hundred_concurrent_calls_through_two_gateways_each_get_their_own_answer(
    stack: dict[str, str], logs_dir: Path
) -> None:
    bootstrap = stack["NEXUS_KAFKA_BOOTSTRAP"]
    second = start_gateway(stack, logs_dir)
    urls = [stack["GATEWAY_URL"], second.url]
    run = uuid.uuid4().hex[:8]
    try:
        async with TopicReader(bootstrap, "inference.requests") as requests, \
                TopicReader(bootstrap, "inference.responses") as responses:

            async def call(i: int) -> tuple[str, str]:
                url, prompt = urls[i % 2], f"caller {i} of run {run}"
                kind = (i // 2) % 4
                if kind == 0:
                    reply = await ollama.AsyncClient(host=url).generate(model="llama3.1", prompt=prompt)
                    return prompt, reply.response or ""
                if kind == 1:
                    stream = await ollama.AsyncClient(host=url).chat(
                        model="llama3.1", messages=[{"role": "user", "content": prompt}], stream=True)
                    return prompt, "".join([p.message.content or "" async for p in stream])
                client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
                if kind == 2:
                    chat = await client.chat.completions.create(
                        model="llama3.1", messages=[{"role": "user", "content": prompt}])
                    return prompt, chat.choices[0].message.content or ""
                chunks = await client.completions.create(model="llama3.1", prompt=prompt, stream=True)
                return prompt, "".join([c.choices[0].text async for c in chunks])

            answers = await asyncio.wait_for(asyncio.gather(*(call(i) for i in range(100))), timeout=60)
            for prompt, answer in answers:
                assert answer == said(prompt)

            # The audit log holds them like POST /infer requests: each once, addressed to its gateway.
            def mine(records: list) -> list:  # type: ignore[type-arg]
                return [r for r in map(lambda r: decode_request(CODEC, r.value), records) if run in r.input]

            await requests.read_until(lambda rs: len(mine(rs)) >= 100, timeout=10)
            logged = mine(await requests.drain())
            assert sorted(r.input for r in logged) == sorted(p for p, _ in answers)
            by_gateway = Counter(r.reply_to for r in logged)
            assert len(by_gateway) == 2 and set(by_gateway.values()) == {50}
            ids = {r.id for r in logged}
            await responses.read_until(lambda rs: ids <= {decode_response(CODEC, r.value).id for r in rs}, 10)

        for url in urls:  # each reader decoded its own answers and skipped the other's unread
            metrics = httpx.get(f"{url}/metrics").text
            skipped = float(re.search(r'nexus_gateway_reply_records\{outcome="skipped"\} (\S+)', metrics).group(1))
            assert skipped >= 50
    finally:
        second.stop()


# --------------------------------------------------------------------------- a slow model: timeouts


@pytest.fixture(scope="module")
def slow_stack(bootstrap: str, logs_dir: Path) -> Iterator[dict[str, str]]:
    """A worker and gateway on topics of their own, with a simulator taking 2 s to the first token."""
    simulator = start_simulator(logs_dir, ["--ttft-ms", "2000", "--tokens-per-s", "60", "--parallel", "8"])
    run = uuid.uuid4().hex[:8]
    env = stack_env(
        bootstrap, simulator.url,
        NEXUS_KAFKA_REQUESTS_TOPIC=f"slow{run}.requests", NEXUS_KAFKA_RESPONSES_TOPIC=f"slow{run}.responses",
        NEXUS_KAFKA_TOKENS_TOPIC=f"slow{run}.tokens", NEXUS_KAFKA_DLQ_TOPIC=f"slow{run}.dlq",
        NEXUS_KAFKA_STATE_TOPIC=f"slow{run}.state", NEXUS_KAFKA_PARTITIONS="2",
        NEXUS_WORKER_APP_ID=f"nexus-slow-{run}",
    )
    worker = Role("worker", ["worker"], env, logs_dir).start()
    gateway = start_gateway(env, logs_dir)
    try:
        yield {**env, "GATEWAY_URL": gateway.url}
    finally:
        gateway.stop()
        worker.stop()
        simulator.stop()


async def test_a_late_answer_is_a_clear_timeout_and_still_reaches_the_audit_log(slow_stack: dict[str, str]) -> None:
    url, bootstrap = slow_stack["GATEWAY_URL"], slow_stack["NEXUS_KAFKA_BOOTSTRAP"]
    fast = {"X-Nexus-Timeout-Ms": "300"}
    async with TopicReader(bootstrap, slow_stack["NEXUS_KAFKA_RESPONSES_TOPIC"]) as responses, \
            TopicReader(bootstrap, slow_stack["NEXUS_KAFKA_REQUESTS_TOPIC"]) as requests:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ollama.ResponseError) as plain:
            await ollama.AsyncClient(host=url, headers=fast).generate(model="llama3.1", prompt="too slow")
        assert loop.time() - started < 1.5
        assert plain.value.status_code == 504 and "no answer to request" in plain.value.error
        with pytest.raises(ollama.ResponseError) as streamed:
            async for _ in await ollama.AsyncClient(host=url, headers=fast).generate(
                    model="llama3.1", prompt="too slow, streamed", stream=True):
                pass
        assert streamed.value.status_code == 504
        # OpenAI's client would retry a 504; Nexus says not to, as the request is still being answered.
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=2, default_headers=fast)
        with pytest.raises(openai.InternalServerError) as late:
            await client.chat.completions.create(model="llama3.1", messages=[{"role": "user", "content": "slow"}])
        assert late.value.status_code == 504 and late.value.code == "timeout" and late.value.type == "timeout_error"

        timed_out = {re.search(r"request (\w+)", e.value.error).group(1) for e in (plain, streamed)}  # type: ignore[union-attr]
        timed_out.add(late.value.response.headers["X-Nexus-Request-Id"])
        await responses.read_until(
            lambda rs: timed_out <= {decode_response(CODEC, r.value).id for r in rs}, timeout=60)
        late_answers = [decode_response(CODEC, r.value) for r in responses.records]
        assert {a.id for a in late_answers if a.status == "ok" and a.output.startswith("[simulated")} >= timed_out
        sent = [decode_request(CODEC, r.value) for r in await requests.drain()]
        assert sum(r.input == "slow" for r in sent) == 1  # no retry


def test_a_slow_stream_arrives_in_several_chunks_that_make_the_answer(slow_stack: dict[str, str]) -> None:
    prompt = unique("one two three four five six seven eight")
    parts = list(ollama.Client(host=slow_stack["GATEWAY_URL"]).generate(model="llama3.1", prompt=prompt, stream=True))
    chunks = [p.response for p in parts if not p.done]
    assert len(chunks) >= 3  # tokens were relayed as they came, not all at the end
    assert "".join(chunks) == said(prompt)
    assert parts[-1].prompt_eval_duration and parts[-1].prompt_eval_duration >= 1_500_000_000  # the time to first token


# --------------------------------------------------------------------------- a model missing on the backend


@pytest.fixture()
def missing_model_stack(bootstrap: str, logs_dir: Path, tmp_path: Path) -> Iterator[dict[str, str]]:
    """A simulator serving only ``llama3.1``, and a worker and gateway of their own (own topics)
    configured with ``llama3.1`` and ``absent`` on it."""
    from nexus.kafka.topics import ensure_topics
    from nexus.settings import KafkaSettings

    sim = start_simulator(logs_dir, ["--models", "llama3.1", "--ttft-ms", "0", "--tokens-per-s", "0"])
    run = uuid.uuid4().hex[:8]
    config = tmp_path / "nexus.toml"
    config.write_text(
        f'[models."llama3.1"]\nendpoints = ["{sim.url}"]\n'
        f'[models."absent"]\nendpoints = ["{sim.url}"]\nretries = 0\n'
    )
    topics = {key: f"t{run}.{key}" for key in ("requests", "responses", "dlq", "tokens", "state")}
    env = stack_env(
        bootstrap, sim.url, NEXUS_CONFIG=str(config), NEXUS_KAFKA_PARTITIONS="2", NEXUS_WORKER_APP_ID=f"nexus-404-{run}",
        **{f"NEXUS_KAFKA_{key.upper()}_TOPIC": name for key, name in topics.items()},
    )
    kafka = KafkaSettings(bootstrap=bootstrap, partitions=2, **{f"{k}_topic": v for k, v in topics.items()})
    asyncio.run(ensure_topics(kafka))
    worker = Role("worker-404", ["worker"], env, logs_dir).start()
    gateway = start_gateway(env, logs_dir)
    try:
        yield {**env, "GATEWAY_URL": gateway.url, "RESPONSES": topics["responses"]}
    finally:
        gateway.stop()
        worker.stop()
        sim.stop()


async def test_a_model_missing_on_the_backend_is_404_in_all_three_apis(missing_model_stack: dict[str, str]) -> None:
    url = missing_model_stack["GATEWAY_URL"]
    # The configured model on the endpoint answers (and proves the worker consumes).
    reply = await ollama.AsyncClient(host=url, timeout=90).generate(model="llama3.1", prompt="hi")
    assert reply.response == said("hi")

    client = ollama.AsyncClient(host=url, timeout=30)
    for stream in (False, True):
        with pytest.raises(ollama.ResponseError) as err:
            result = await client.generate(model="absent", prompt="x", stream=stream)
            if stream:
                [part async for part in result]  # type: ignore[union-attr]
        assert err.value.status_code == 404 and err.value.error == "model 'absent' not found"
    with pytest.raises(ollama.ResponseError) as err:
        await client.chat(model="absent", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 404 and err.value.error == "model 'absent' not found"

    oai = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as nf:
            result = await oai.chat.completions.create(
                model="absent", messages=[{"role": "user", "content": "x"}], stream=stream)
            if stream:
                [chunk async for chunk in result]  # type: ignore[union-attr]
        assert nf.value.status_code == 404 and nf.value.code == "model_not_found"
        body = nf.value.body
        assert isinstance(body, dict) and body["type"] == "invalid_request_error" and body["param"] == "model"
        assert "is not on any endpoint of 'absent'" in body["message"] and "['llama3.1']" in body["message"]

    # POST /infer: accepted (the gateway knows the model); the answer says model_not_found.
    async with TopicReader(missing_model_stack["NEXUS_KAFKA_BOOTSTRAP"], missing_model_stack["RESPONSES"]) as responses:
        async with httpx.AsyncClient() as http:
            submitted = await http.post(f"{url}/infer", json={"model_id": "absent", "input": "x"}, timeout=10)
        assert submitted.status_code == 202
        rid = submitted.json()["id"]
        records = await responses.read_until(
            lambda rs: any(decode_response(CODEC, r.value).id == rid for r in rs), timeout=30)
    answer = next(decode_response(CODEC, r.value) for r in records if decode_response(CODEC, r.value).id == rid)
    assert answer.status == "error" and answer.error_kind == "model_not_found"
    assert answer.to_json()["error_kind"] == "model_not_found"

    async with httpx.AsyncClient() as http:
        async def absent() -> dict:
            models = (await http.get(f"{url}/models", timeout=5)).json()["models"]
            return next(m for m in models if m["id"] == "absent")

        from tests.eventually import eventually

        async def shown() -> bool:
            return (await absent())["missing_on"] != []

        await eventually(shown, "GET /models shows where 'absent' is missing", timeout=20, interval=0.2)
        model = await absent()
    assert model["missing_on"] == [missing_model_stack["OLLAMA_HOST"]] and model["available"] is False
    live = model["endpoints"][0]["live"]
    assert live["has_model"] is False and live["models"] == ["llama3.1"]
    # The gateway's /health: the endpoint answers, but not having the model is not ok, and says why.
    async with httpx.AsyncClient(timeout=30) as http:
        health = await http.get(f"{url}/health")
    assert health.status_code == 503
    checks = health.json()["checks"]
    assert checks["model:llama3.1"]["status"] == "ok"
    assert checks["model:absent"]["status"] == "down"
    assert "does not have model 'absent'" in checks["model:absent"]["reason"]
    assert "llama3.1:latest" in checks["model:absent"]["reason"]

