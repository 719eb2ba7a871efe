"""The real Ollama 0.17.4 with the real model smollm2:135m, called straight (no Nexus yet).

What the simulator imitates, seen on the real thing: the version it reports, its model list,
deterministic generation, NDJSON streaming and its error body. Generations are a few tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from localdev.ollama import MODEL_NAME, OLLAMA_VERSION

PROMPT = "The capital of France is"
OPTIONS = {"temperature": 0, "seed": 42, "num_predict": 4}
TIMEOUT = httpx.Timeout(120.0)  # the first call loads the model


@pytest.fixture()
def client(real_ollama: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=real_ollama, timeout=TIMEOUT) as c:
        yield c


def test_it_reports_the_pinned_version(client: httpx.Client) -> None:
    reply = client.get("/api/version")
    assert reply.status_code == 200
    assert reply.json() == {"version": OLLAMA_VERSION}


def test_it_lists_the_embedded_model(client: httpx.Client) -> None:
    models = {m["name"]: m for m in client.get("/api/tags").json()["models"]}
    assert MODEL_NAME in models, sorted(models)
    model = models[MODEL_NAME]
    assert model["size"] > 50_000_000
    assert model["details"]["format"] == "gguf"


def test_the_same_seeded_greedy_request_answers_the_same_text(client: httpx.Client) -> None:
    body = {"model": MODEL_NAME, "prompt": PROMPT, "stream": False, "options": OPTIONS}
    first, second = (client.post("/api/generate", json=body) for _ in range(2))
    assert first.status_code == second.status_code == 200, first.text
    a, b = first.json(), second.json()
    assert a["response"].strip(), a
    assert a["response"] == b["response"]
    assert a["done"] is True and a["model"] == MODEL_NAME
    assert 0 < a["eval_count"] <= OPTIONS["num_predict"]
    assert a["prompt_eval_count"] > 0


def test_streaming_is_ndjson_ending_with_done_and_counts(client: httpx.Client) -> None:
    body = {"model": MODEL_NAME, "prompt": PROMPT, "options": OPTIONS}  # stream defaults to true
    with client.stream("POST", "/api/generate", json=body) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("application/x-ndjson")
        chunks = [json.loads(line) for line in reply.iter_lines() if line.strip()]
    *parts, last = chunks
    assert parts and all(c["done"] is False and isinstance(c["response"], str) for c in parts)
    assert last["done"] is True and last["done_reason"] in ("length", "stop")
    assert 0 < last["eval_count"] <= OPTIONS["num_predict"]
    assert "".join(c["response"] for c in chunks).strip()


def test_an_unknown_model_answers_404_with_an_error_body(client: httpx.Client) -> None:
    reply = client.post("/api/generate", json={"model": "no-such-model:1b", "prompt": "hi", "stream": False})
    assert reply.status_code == 404
    body = reply.json()
    assert set(body) == {"error"} and "not found" in body["error"], body
