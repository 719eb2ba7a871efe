"""An endpoint of kind ``openai``: the worker calls the real Ollama through its OpenAI-compatible ``/v1``.

The gateway and a worker on topics of their own, configured with one endpoint of kind
``openai`` at the real Ollama's base URL given with ``/v1`` (the settings strip it); answers
through ``POST /infer``, whole and streamed, with usage, the deterministic repeat from the
cache, and a model the server lacks. Generations are a few tokens.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from localdev.ollama import MODEL_NAME
from nexus.kafka.topics import ensure_topics
from nexus.settings import KafkaSettings
from schemas import decode_token
from tests.eventually import eventually
from tests.integration.support import CODEC, Role, TopicReader, stack_env, start_gateway, wait_for_responses

pytestmark = pytest.mark.integration

OPTIONS = {"temperature": 0, "seed": 42, "max_tokens": 4}


async def _cache_entries(env: dict[str, str]) -> float:
    """The worker's ``nexus_worker_cache_entries``: an answer is stored through a topic, later."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{env['NEXUS_WORKER_WEB_PORT']}/metrics", timeout=5)).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "nexus_worker_cache_entries")


@pytest.fixture()
async def openai_stack(
    bootstrap: str, real_ollama: str, logs_dir: Path, tmp_path: Path
) -> AsyncIterator[dict[str, str]]:
    run = uuid.uuid4().hex[:8]
    config = tmp_path / f"nexus-{run}.toml"
    config.write_text(
        f'[models."{MODEL_NAME}"]\n'
        f'endpoints = [{{ url = "{real_ollama}/v1", kind = "openai", max_concurrency = 2 }}]\n'
        f"timeout_s = 120\n"
        f'[models."not-pulled"]\n'
        f'endpoints = [{{ url = "{real_ollama}", kind = "openai" }}]\n'
        f"retries = 0\n"
    )
    topics = {key: f"t{run}.{key}" for key in ("requests", "responses", "dlq", "tokens", "state")}
    env = stack_env(
        bootstrap,
        "http://127.0.0.1:1",  # every model names its endpoints in the config
        NEXUS_CONFIG=str(config),
        NEXUS_KAFKA_PARTITIONS="2",
        NEXUS_WORKER_APP_ID=f"nexus-openai-{run}",
        **{f"NEXUS_KAFKA_{key.upper()}_TOPIC": name for key, name in topics.items()},
    )
    kafka = KafkaSettings(
        bootstrap=bootstrap, partitions=2, requests_topic=topics["requests"], responses_topic=topics["responses"],
        dlq_topic=topics["dlq"], tokens_topic=topics["tokens"], state_topic=topics["state"],
    )
    await ensure_topics(kafka)
    worker = Role(f"worker-openai-{run}", ["worker"], env, logs_dir).start()
    gateway = start_gateway(env, logs_dir)
    try:
        yield {**env, "GATEWAY_URL": gateway.url, "OLLAMA": real_ollama, **topics}
    finally:
        gateway.stop()
        worker.stop()


async def test_infer_is_answered_and_streamed_by_an_openai_kind_endpoint(openai_stack: dict[str, str]) -> None:
    bootstrap, gateway = openai_stack["NEXUS_KAFKA_BOOTSTRAP"], openai_stack["GATEWAY_URL"]
    run = uuid.uuid4().hex[:6]
    ids = {"whole": f"whole-{run}", "streamed": f"streamed-{run}", "again": f"again-{run}",
           "missing": f"missing-{run}"}
    context = {"session_id": f"s-{run}", "metadata": {"user": "alice"}}
    async with TopicReader(bootstrap, openai_stack["responses"]) as responses, TopicReader(
        bootstrap, openai_stack["tokens"]
    ) as tokens:
        async with httpx.AsyncClient(base_url=gateway, timeout=30) as http:

            async def infer(key: str, **body: object) -> None:
                reply = await http.post("/infer", json={"id": ids[key], "model_id": MODEL_NAME, "context": context,
                                                        "input": "The capital of France is", **body})
                assert reply.status_code == 202, reply.text

            await infer("whole", options=OPTIONS)
            await infer("streamed", options={**OPTIONS, "seed": 43}, stream=True)
            # The first answer takes the model's load; the repeat comes after it, from the cache.
            first = await wait_for_responses(responses, {ids["whole"], ids["streamed"]}, timeout=180)
            await eventually(lambda: _cache_entries(openai_stack), "the first answer is in the cache")
            await infer("again", options=OPTIONS)
            await infer("missing", model_id="not-pulled", options=OPTIONS)
            later = await wait_for_responses(responses, {ids["again"], ids["missing"]}, timeout=120)
        await tokens.read_until(lambda records: any(decode_token(CODEC, r.value).id == ids["streamed"]
                                                    for r in records), timeout=10)
        chunks = sorted((t for t in (decode_token(CODEC, r.value) for r in await tokens.drain())
                         if t.id == ids["streamed"]), key=lambda t: t.seq)

    [whole] = first.by_id[ids["whole"]]
    [streamed] = first.by_id[ids["streamed"]]
    [again] = later.by_id[ids["again"]]
    [missing] = later.by_id[ids["missing"]]
    for answer in (whole, streamed):
        assert answer.status == "ok", answer.error
        assert answer.output.strip() and answer.endpoint == openai_stack["OLLAMA"]  # "/v1" stripped
        assert answer.context.metadata == {"user": "alice"}
        assert 0 < answer.completion_tokens <= OPTIONS["max_tokens"] and answer.prompt_tokens > 0
        assert answer.done_reason in ("stop", "length")
    assert chunks and "".join(c.text for c in chunks) == streamed.output
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert streamed.time_to_first_token_ms is not None
    assert (again.status, again.output, again.cached) == ("ok", whole.output, True)
    assert missing.status == "error" and "not-pulled" in (missing.error or ""), missing.error
