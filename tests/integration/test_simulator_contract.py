"""The simulator is held to the real Ollama: the same calls, answers of the same shape.

Every call below goes to the real Ollama (0.17.4 with SmolLM2-135M, see localdev/ollama.py)
and to Nexus's simulator; the *shape* of each answer (status, field names, JSON types,
the streaming framing, error bodies) must be the same. Values differ (one is a model, the
other says ``[simulated ...]``), so only shapes are compared. When Ollama changes its API,
this test names the field, and the simulator follows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.support import start_simulator

REAL_MODEL = "smollm2:135m"
SIM_MODEL = "llama3.1"
FEW = {"num_predict": 4, "temperature": 0, "seed": 7}


@pytest.fixture(scope="module")
def sim(logs_dir: Any) -> Iterator[str]:
    role = start_simulator(logs_dir, ["--ttft-ms", "0", "--tokens-per-s", "0", "--models", SIM_MODEL])
    try:
        yield role.url
    finally:
        role.stop()


def shape(value: Any) -> Any:
    """The structure of a JSON value: keys and types, not values."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in sorted(value.items())}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if value is None:
        return "null"
    return "string"


def _call(base: str, method: str, path: str, body: Any, model: str) -> tuple[int, list[Any]]:
    """Status and the JSON objects of the answer (one, or one per NDJSON line)."""
    if isinstance(body, dict) and "model" in body:
        body = {**body, "model": model}
    content = body if isinstance(body, str) else (json.dumps(body) if body is not None else None)
    with httpx.Client(timeout=120) as http:
        response = http.request(method, f"{base}{path}", content=content,
                                headers={"content-type": "application/json"} if content else {})
    lines = [line for line in response.text.splitlines() if line.strip()]
    if response.headers.get("content-type", "").startswith("application/x-ndjson"):
        return response.status_code, [json.loads(line) for line in lines]
    return response.status_code, [response.json()] if lines else []


CALLS = {
    "version": ("GET", "/api/version", None),
    "tags": ("GET", "/api/tags", None),
    "generate": ("POST", "/api/generate", {"model": "m", "prompt": "Say hi", "stream": False, "options": FEW}),
    "generate streamed": ("POST", "/api/generate", {"model": "m", "prompt": "Say hi", "options": FEW}),
    "chat": ("POST", "/api/chat", {"model": "m", "stream": False, "options": FEW,
                                    "messages": [{"role": "user", "content": "Say hi"}]}),
    "chat streamed": ("POST", "/api/chat", {"model": "m", "options": FEW,
                                            "messages": [{"role": "user", "content": "Say hi"}]}),
    "unknown model": ("POST", "/api/generate", {"model": "m", "prompt": "x", "stream": False}),
    "malformed body": ("POST", "/api/generate", "{not json"),
    "missing model": ("POST", "/api/generate", {"prompt": "x", "stream": False}),
}


@pytest.mark.parametrize("name", CALLS)
def test_the_simulator_answers_in_the_shape_of_the_real_ollama(name: str, real_ollama: str, sim: str) -> None:
    method, path, body = CALLS[name]
    unknown = name == "unknown model"
    real_status, real = _call(real_ollama, method, path, body, "no-such-model" if unknown else REAL_MODEL)
    sim_status, simulated = _call(sim, method, path, body, "no-such-model" if unknown else SIM_MODEL)
    assert sim_status == real_status, f"{name}: status {sim_status}, Ollama says {real_status}: {real}"
    if name.endswith("streamed"):
        # Framing: chunks of one shape, then a final chunk (done=true) with the statistics.
        assert real[-1]["done"] is True and simulated[-1]["done"] is True
        assert shape(simulated[0]) == shape(real[0]), f"{name}: first chunk"
        assert shape(simulated[-1]) == shape(real[-1]), f"{name}: final chunk"
        assert all(not chunk["done"] for chunk in simulated[:-1])
    else:
        assert len(simulated) == len(real) == 1
        assert shape(simulated[0]) == shape(real[0]), f"{name}: {simulated[0]} vs Ollama's {real[0]}"
