"""The Ollama simulator: pure model logic, then the HTTP protocol against a live server."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, UTC
from typing import Any

import httpx
import pytest

from localdev.simulator.cli import add_arguments, config_from_args
from localdev.simulator.model import (
    BUSY_ERROR,
    Admission,
    MAX_ARRIVALS,
    SimulatorConfig,
    SimulatorStats,
    SlotQueue,
    canonical_model_name,
    chat_chunk,
    chat_final,
    compute_stats,
    embedding,
    generate_chunk,
    generate_final,
    prompt_token_count,
    reply_text,
    reply_tokens,
    resolve_model,
    rfc3339,
    should_fail,
    tags_response,
    tokenize,
)
from localdev.simulator.server import RunningSimulator, start_server

STAT_FIELDS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)
RFC3339_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


# =========================================================================== model.py


def test_reply_tokens_rebuild_exact_text_and_ignore_system() -> None:
    tokens, reason = reply_tokens("llama3.1", "tell me  a joke ", "SECRET SYSTEM", None)
    assert "".join(tokens) == "[simulated llama3.1] You said: tell me  a joke "
    assert reason == "stop"
    assert "SECRET" not in "".join(tokens)
    assert tokens[:3] == ["[simulated", " llama3.1]", " You"]


def test_reply_tokens_truncate_with_length_reason() -> None:
    tokens, reason = reply_tokens("m", "one two three four", None, 3)
    assert tokens == ["[simulated", " m]", " You"]
    assert reason == "length"
    for no_limit in (None, 0, -1, -2, 1000):
        full, reason = reply_tokens("m", "one two", None, no_limit)
        assert "".join(full) == reply_text("m", "one two")
        assert reason == "stop"


def test_tokenize_round_trips_and_counts_prompt_and_system() -> None:
    for text in ("", " ", "a", "  lead and trail  ", "tabs\tand\nnewlines"):
        assert "".join(tokenize(text)) == text
    assert prompt_token_count("hello world", "be brief", None) == 4


def test_model_names_latest_alias() -> None:
    assert canonical_model_name("Llama3.1") == "llama3.1:latest"
    assert canonical_model_name("host:5000/ns/m") == "host:5000/ns/m:latest"
    models = ("llama3.1", "mistral:7b")
    assert resolve_model("llama3.1:latest", models) == "llama3.1"
    assert resolve_model("llama3.1", models) == "llama3.1"
    assert resolve_model("mistral:7b", models) == "mistral:7b"
    assert resolve_model("mistral", models) is None


def test_slot_queue_admits_queues_rejects_and_hands_over_fifo() -> None:
    slots: SlotQueue[str] = SlotQueue(parallel=2, max_queue=2)
    assert [slots.admit(t) for t in "abcde"] == [
        Admission.RUN,
        Admission.RUN,
        Admission.WAIT,
        Admission.WAIT,
        Admission.REJECT,
    ]
    assert (slots.active, slots.waiting, slots.max_active) == (2, 2, 2)
    assert slots.withdraw("c") is True
    assert slots.withdraw("c") is False
    assert slots.release() == "d"  # slot handed over, still 2 active
    assert slots.active == 2
    assert slots.release() is None
    assert slots.release() is None
    assert slots.active == 0
    with pytest.raises(RuntimeError):
        slots.release()


def test_slot_queue_newcomer_cannot_jump_the_queue() -> None:
    slots: SlotQueue[str] = SlotQueue(parallel=1, max_queue=5)
    assert slots.admit("a") is Admission.RUN
    assert slots.admit("b") is Admission.WAIT
    assert slots.release() == "b"
    assert slots.admit("c") is Admission.WAIT


def test_compute_stats_follow_config() -> None:
    config = SimulatorConfig(ttft_ms=50, tokens_per_s=200)
    stats = compute_stats(config, prompt_eval_count=7, eval_count=10)
    assert stats.eval_duration == 50_000_000
    assert stats.load_duration + stats.prompt_eval_duration == 50_000_000
    assert stats.total_duration == 100_000_000
    assert stats.prompt_eval_count == 7 and stats.eval_count == 10
    assert all(isinstance(v, int) for v in stats.as_dict().values())
    assert compute_stats(config, 1, 1, elapsed_ns=10**9).total_duration == 10**9
    for instant in (0.0, math.inf):
        fast = SimulatorConfig(ttft_ms=0, tokens_per_s=instant)
        assert compute_stats(fast, 1, 100).eval_duration == 0
        assert fast.generation_seconds(100) == 0


def test_config_validation() -> None:
    for bad in (
        {"parallel": 0},
        {"max_queue": -1},
        {"fail_rate": 1.5},
        {"ttft_ms": -1},
        {"tokens_per_s": -1},
        {"models": ()},
    ):
        with pytest.raises(ValueError):
            SimulatorConfig(**bad)


def test_embedding_deterministic_and_normalised() -> None:
    a = embedding("m", "hello")
    assert a == embedding("m", "hello")
    assert a != embedding("m", "hello!") and a != embedding("other", "hello")
    assert len(a) == 8
    assert math.isclose(math.fsum(x * x for x in a), 1.0)


def test_should_fail_is_seeded() -> None:
    draws = [should_fail(random.Random(7), 0.5) for _ in range(3)]
    assert len(set(draws)) == 1
    rng = random.Random(1)
    assert not any(should_fail(rng, 0.0) for _ in range(100))
    assert all(should_fail(rng, 1.0) for _ in range(100))
    hits = sum(should_fail(rng, 0.3) for _ in range(2000))
    assert 450 < hits < 750


def test_response_builders_have_documented_shape() -> None:
    created = rfc3339(datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=UTC))
    assert created == "2024-01-02T03:04:05.000006Z"
    stats = compute_stats(SimulatorConfig(), 2, 3)
    assert generate_chunk("m", created, "hi") == {
        "model": "m",
        "created_at": created,
        "response": "hi",
        "done": False,
    }
    final = generate_final("m", created, "", "stop", [1, 2], stats)
    assert final["done"] is True and final["context"] == [1, 2]
    assert set(STAT_FIELDS) <= final.keys()
    assert chat_chunk("m", created, "x")["message"] == {"role": "assistant", "content": "x"}
    chat = chat_final("m", created, "", "length", stats)
    assert "context" not in chat and chat["done_reason"] == "length"
    tags = tags_response(SimulatorConfig(models=("a", "b:7b")), datetime.now(UTC))
    assert [m["name"] for m in tags["models"]] == ["a", "b:7b"]


def test_cli_arguments_build_config() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        "--port 1234 --models a,b --ttft-ms 0 --tokens-per-s 1000 --parallel 3 "
        "--max-queue 9 --fail-rate 0.25 --seed 5".split()
    )
    assert (args.host, args.port) == ("127.0.0.1", 1234)
    assert config_from_args(args) == SimulatorConfig(
        models=("a", "b"),
        ttft_ms=0,
        tokens_per_s=1000,
        parallel=3,
        max_queue=9,
        fail_rate=0.25,
        seed=5,
    )
    defaults = parser.parse_args([])
    assert defaults.port == 11434
    assert config_from_args(defaults) == SimulatorConfig()


# =========================================================================== HTTP protocol


@asynccontextmanager
async def running(**overrides: Any) -> AsyncIterator[tuple[httpx.AsyncClient, RunningSimulator]]:
    """A live simulator on a free port (instant by default) and a client pointed at it."""
    config = SimulatorConfig(**{"ttft_ms": 0.0, "tokens_per_s": 0.0, **overrides})
    async with await start_server(config, port=0) as sim:
        async with httpx.AsyncClient(base_url=sim.url, timeout=5.0) as client:
            yield client, sim


async def ndjson(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> list[dict]:
    async with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        assert response.headers["x-ollama-simulator"] == "nexus"
        return [json.loads(line) async for line in response.aiter_lines() if line]


def assert_final_stats(final: dict[str, Any]) -> None:
    for name in STAT_FIELDS:
        assert isinstance(final[name], int) and not isinstance(final[name], bool), name
    assert RFC3339_Z.match(final["created_at"])


async def test_generate_streams_ndjson() -> None:
    async with running() as (client, sim):
        chunks = await ndjson(
            client,
            "/api/generate",
            {"model": "llama3.1", "prompt": "Why is the sky blue?", "system": "SECRET"},
        )
    *tokens, final = chunks
    assert all(c["done"] is False and c["model"] == "llama3.1" for c in tokens)
    text = "".join(c["response"] for c in tokens)
    assert text == "[simulated llama3.1] You said: Why is the sky blue?"
    assert final["done"] is True and final["done_reason"] == "stop" and final["response"] == ""
    assert_final_stats(final)
    assert final["eval_count"] == len(tokens)
    assert final["prompt_eval_count"] == 6  # 5 prompt words + the system word
    assert all(isinstance(i, int) for i in final["context"]) and final["context"]
    assert sim.stats.served["/api/generate"] == 1
    assert sim.stats.served_by_model["llama3.1"] == 1


async def test_generate_without_streaming() -> None:
    async with running() as (client, _):
        r = await client.post(
            "/api/generate", json={"model": "mistral:latest", "prompt": "hi", "stream": False}
        )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["model"] == "mistral:latest"  # echoed as requested, like Ollama
    assert body["response"] == "[simulated mistral:latest] You said: hi"
    assert body["done"] is True and body["done_reason"] == "stop"
    assert_final_stats(body)


async def test_generate_num_predict_truncates() -> None:
    async with running() as (client, _):
        r = await client.post(
            "/api/generate",
            json={
                "model": "mistral",
                "prompt": "a b c d e f",
                "stream": False,
                "options": {"num_predict": 4, "temperature": 0.2, "seed": 1},
            },
        )
        chunks = await ndjson(
            client,
            "/api/generate",
            {"model": "mistral", "prompt": "x y", "options": {"num_predict": 2}},
        )
    body = r.json()
    assert body["response"] == "[simulated mistral] You said:"
    assert body["done_reason"] == "length" and body["eval_count"] == 4
    assert len(chunks) == 3 and chunks[-1]["done_reason"] == "length"


async def test_generate_empty_prompt_is_load_call() -> None:
    async with running() as (client, _):
        r = await client.post("/api/generate", json={"model": "llama3.1"})
    assert r.status_code == 200
    assert r.json() | {"created_at": ""} == {
        "model": "llama3.1",
        "created_at": "",
        "response": "",
        "done": True,
        "done_reason": "load",
    }


async def test_chat_streaming_and_not() -> None:
    messages = [
        {"role": "system", "content": "SECRET SYSTEM PROMPT"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": "second question"},
    ]
    async with running() as (client, _):
        chunks = await ndjson(client, "/api/chat", {"model": "mistral", "messages": messages})
        r = await client.post(
            "/api/chat", json={"model": "mistral", "messages": messages, "stream": False}
        )
        load = await client.post("/api/chat", json={"model": "mistral", "messages": []})
    expected = "[simulated mistral] You said: second question"
    *tokens, final = chunks
    assert all(c["message"]["role"] == "assistant" and not c["done"] for c in tokens)
    assert "".join(c["message"]["content"] for c in tokens) == expected
    assert final["message"] == {"role": "assistant", "content": ""}
    assert final["done_reason"] == "stop" and "context" not in final
    assert_final_stats(final)
    assert final["prompt_eval_count"] == 9
    body = r.json()
    assert body["message"] == {"role": "assistant", "content": expected}
    assert "SECRET" not in body["message"]["content"]
    assert_final_stats(body)
    assert load.json()["done_reason"] == "load"


async def test_embed() -> None:
    async with running() as (client, _):
        one = (await client.post("/api/embed", json={"model": "mistral", "input": "hi"})).json()
        many = (
            await client.post("/api/embed", json={"model": "mistral", "input": ["hi", "there"]})
        ).json()
        bad = await client.post("/api/embed", json={"model": "mistral", "input": [1]})
    assert one["model"] == "mistral" and len(one["embeddings"]) == 1
    assert many["embeddings"][0] == one["embeddings"][0]
    assert len(many["embeddings"]) == 2 and many["embeddings"][0] != many["embeddings"][1]
    for vector in many["embeddings"]:
        assert len(vector) == 8 and math.isclose(math.fsum(x * x for x in vector), 1.0)
    for name in ("total_duration", "load_duration", "prompt_eval_count"):
        assert isinstance(many[name], int)
    assert bad.status_code == 400


async def test_tags_ps_version_root() -> None:
    async with running(models=("llama3.1", "qwen2.5:7b")) as (client, _):
        tags = (await client.get("/api/tags")).json()
        ps = (await client.get("/api/ps")).json()
        version = await client.get("/api/version")
        root = await client.get("/")
        head = await client.head("/")
    assert [(m["name"], m["model"]) for m in tags["models"]] == [
        ("llama3.1", "llama3.1"),
        ("qwen2.5:7b", "qwen2.5:7b"),
    ]
    for m in tags["models"]:
        assert RFC3339_Z.match(m["modified_at"]) and isinstance(m["size"], int)
        assert re.fullmatch(r"[0-9a-f]{64}", m["digest"])
        assert m["details"]["format"] == "gguf"
        assert set(m["details"]) == {
            "parent_model",
            "format",
            "family",
            "families",
            "parameter_size",
            "quantization_level",
        }
    assert tags["models"][1]["details"]["family"] == "qwen"
    assert [m["name"] for m in ps["models"]] == ["llama3.1", "qwen2.5:7b"]
    for m in ps["models"]:
        assert {"name", "model", "size", "digest", "details", "expires_at", "size_vram"} <= m.keys()
    assert version.json() == {"version": "0.0.0-simulated"}
    assert root.text == "Ollama is running"
    assert root.headers["content-type"].startswith("text/plain")
    assert head.status_code == 200
    for response in (version, root, head):
        assert response.headers["x-ollama-simulator"] == "nexus"


async def test_client_errors() -> None:
    async with running() as (client, sim):
        invalid = await client.post("/api/generate", content=b"{not json")
        missing = await client.post("/api/generate", json={"prompt": "hi"})
        unknown = await client.post("/api/chat", json={"model": "gpt-9", "messages": []})
        unknown_embed = await client.post("/api/embed", json={"model": "nope:1b", "input": "x"})
        bad_stream = await client.post(
            "/api/generate", json={"model": "mistral", "prompt": "x", "stream": "yes"}
        )
        no_route = await client.get("/api/nothing")
    assert invalid.status_code == 400 and "error" in invalid.json()
    assert missing.status_code == 404 and missing.json() == {"error": "model '' not found"}  # as Ollama 0.17.4
    assert unknown.status_code == 404 and unknown.json() == {"error": "model 'gpt-9' not found"}
    assert unknown_embed.json() == {"error": "model 'nope:1b' not found"}
    assert bad_stream.status_code == 400
    for response in (invalid, missing, unknown, no_route):
        assert response.headers["x-ollama-simulator"] == "nexus"
    assert sim.stats.client_errors == 5


async def test_busy_503_when_slot_and_queue_are_full() -> None:
    async with running(parallel=1, max_queue=1, ttft_ms=200.0) as (client, sim):
        body = {"model": "mistral", "prompt": "slow", "stream": False}
        responses = await asyncio.gather(
            *(client.post("/api/generate", json=body) for _ in range(3))
        )
    by_status = sorted(responses, key=lambda r: r.status_code)
    assert [r.status_code for r in by_status] == [200, 200, 503]
    assert by_status[2].json() == {"error": BUSY_ERROR}
    assert by_status[2].json()["error"] == (
        "server busy, please try again.  maximum pending requests exceeded"
    )
    assert sim.stats.rejected_busy == 1 and sim.stats.max_concurrent == 1
    assert sim.stats.active == 0


async def test_parallel_slots_bound_concurrency() -> None:
    async with running(parallel=2, ttft_ms=50.0) as (client, sim):
        body = {"model": "mistral", "prompt": "p", "stream": False}
        started = time.perf_counter()
        chat = {"model": "mistral", "messages": [{"role": "user", "content": "p"}], "stream": False}
        responses = await asyncio.gather(
            *(client.post("/api/chat", json=chat) for _ in range(4)),
            client.post("/api/generate", json=body),
        )
        elapsed = time.perf_counter() - started
    assert all(r.status_code == 200 for r in responses)
    assert sim.stats.max_concurrent == 2
    assert elapsed >= 0.14  # 5 requests, 2 at a time, 50 ms each => 3 rounds
    assert sim.stats.served_by_model["mistral"] == 5


async def test_stream_paced_by_ttft() -> None:
    async with running(ttft_ms=80.0, tokens_per_s=1000.0) as (client, _):
        started = time.perf_counter()
        chunks = await ndjson(client, "/api/generate", {"model": "mistral", "prompt": "hi"})
        elapsed = time.perf_counter() - started
    assert elapsed >= 0.08
    assert chunks[-1]["prompt_eval_duration"] + chunks[-1]["load_duration"] == 80_000_000


async def test_slot_released_when_client_disconnects_mid_stream() -> None:
    long_prompt = " ".join(["word"] * 60)  # ~65 tokens at 20 tok/s: over 3 s if never freed
    async with running(parallel=1, max_queue=1, tokens_per_s=20.0) as (client, sim):
        async with client.stream(
            "POST", "/api/generate", json={"model": "mistral", "prompt": long_prompt}
        ) as response:
            async for line in response.aiter_lines():
                assert json.loads(line)["done"] is False
                break
        r = await client.post(
            "/api/generate",
            json={"model": "mistral", "prompt": "next", "stream": False},
            timeout=1.5,
        )
        assert r.status_code == 200
        assert sim.stats.disconnects == 1
        assert sim.stats.active == 0


async def test_fail_rate_one_gives_500() -> None:
    async with running(fail_rate=1.0) as (client, sim):
        gen = await client.post("/api/generate", json={"model": "mistral", "prompt": "x"})
        chat = await client.post(
            "/api/chat", json={"model": "mistral", "messages": [{"role": "user", "content": "x"}]}
        )
        embed = await client.post("/api/embed", json={"model": "mistral", "input": "x"})
    for r in (gen, chat):
        assert r.status_code == 500 and r.json() == {"error": "simulated failure"}
        assert r.headers["x-ollama-simulator"] == "nexus"
    assert embed.status_code == 200  # fail_rate only applies to generate/chat
    assert sim.stats.simulated_failures == 2


async def test_stats_endpoint() -> None:
    async with running() as (client, _):
        body = {"model": "mistral", "prompt": "a", "stream": False}
        await client.post("/api/generate", json=body)
        stats = (await client.get("/simulator/stats")).json()
    assert stats["served"]["/api/generate"] == 1
    assert stats["served_by_model"] == {"mistral": 1}
    assert stats["tokens_generated"] == 5


def test_arrivals_are_bounded_and_keep_the_newest() -> None:
    """Rate-limit checks read arrival times; a long benchmark must not grow them without end."""
    stats = SimulatorStats()
    for i in range(MAX_ARRIVALS + 5):
        stats.record_arrival(float(i))
    arrivals = stats.snapshot()["arrivals"]
    assert len(arrivals) == MAX_ARRIVALS
    assert arrivals[0] == 5.0 and arrivals[-1] == float(MAX_ARRIVALS + 4)


async def test_stats_record_arrival_times_of_generate_and_chat_only() -> None:
    async with running(fail_rate=1.0) as (client, _):
        before = time.monotonic()
        await client.post("/api/generate", json={"model": "mistral", "prompt": "a", "stream": False})
        await client.post("/api/chat", json={"model": "mistral", "messages": [{"role": "user", "content": "b"}]})
        await client.get("/api/version")
        await client.post("/api/embed", json={"model": "mistral", "input": "x"})
        after = time.monotonic()
        arrivals = (await client.get("/simulator/stats")).json()["arrivals"]
    # Failed requests arrived too: the endpoint saw them, a rate limit must count them.
    assert len(arrivals) == 2
    assert before <= arrivals[0] <= arrivals[1] <= after
