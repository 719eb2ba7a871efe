"""``GET /openapi.json`` is valid OpenAPI 3.1 and the running gateway's real answers fit it."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from localdev.broker import free_port
from tests.integration.support import Role, start_gateway

SPEC_URI = "urn:nexus:openapi"


@pytest.fixture(scope="module")
def spec(stack: dict[str, str]) -> dict[str, Any]:
    reply = httpx.get(f"{stack['GATEWAY_URL']}/openapi.json")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("application/json")
    document = reply.json()
    validate_openapi(document)  # raises with the offending path when it is not OpenAPI 3.1
    return document


def check(spec: dict[str, Any], method: str, path: str, reply: httpx.Response) -> None:
    """Fail unless ``reply`` is a documented answer of ``method path`` with a body of its schema."""
    operation = spec["paths"][path][method]
    documented = operation["responses"].get(str(reply.status_code)) or operation["responses"].get("default")
    assert documented, f"{method.upper()} {path} answered {reply.status_code}, which the spec does not list"
    media_type = reply.headers["content-type"].split(";")[0].strip()
    assert media_type in documented["content"], f"{path} {reply.status_code}: {media_type} not documented"
    schema = documented["content"][media_type]["schema"]
    body = reply.json() if media_type == "application/json" else reply.text
    registry = Registry().with_resource(SPEC_URI, Resource.from_contents(spec, default_specification=DRAFT202012))
    resolved = {"$ref": SPEC_URI + schema["$ref"]} if "$ref" in schema else schema
    errors = list(Draft202012Validator(resolved, registry=registry).iter_errors(body))
    assert not errors, f"{method.upper()} {path} {reply.status_code}: {[e.message for e in errors]}\n{body}"


def request_schema_accepts(spec: dict[str, Any], body: Any) -> bool:
    registry = Registry().with_resource(SPEC_URI, Resource.from_contents(spec, default_specification=DRAFT202012))
    return Draft202012Validator({"$ref": SPEC_URI + "#/components/schemas/InferRequest"}, registry=registry).is_valid(body)


async def test_real_answers_fit_the_spec(spec: dict[str, Any], gateway_url: str) -> None:
    async with httpx.AsyncClient(base_url=gateway_url) as http:
        cases = [
            ("post", "/infer", {"json": {"model_id": "llama3.1", "input": "hi"}}, 202),
            ("post", "/infer", {"json": {"id": None, "model_id": "mistral", "input": "", "stream": True,
                                         "context": {"session_id": "s", "metadata": {"a": "b"}},
                                         "options": {"temperature": 0, "max_tokens": 5, "seed": -1}}}, 202),
            ("post", "/infer", {"content": b"{", "headers": {"Content-Type": "application/json"}}, 400),
            ("post", "/infer", {"json": {"model_id": "llama3.1"}}, 400),
            ("post", "/infer", {"json": {"model_id": "gpt-17", "input": "x"}}, 404),
            ("post", "/infer", {"json": {"model_id": "llama3.1", "input": "x" * (1024 * 1024)}}, 413),
            # Within the body limit, over one Kafka record once encoded: refused before producing.
            ("post", "/infer", {"json": {"model_id": "llama3.1", "input": "x" * 1_040_000}}, 413),
            ("post", "/infer", {"json": {"model_id": "llama3.1", "tools": [{"name": "f", "parameters": {}}],
                                         "messages": [{"role": "user", "content": "hi", "images": ["aGk="]}],
                                         "format": {"type": "object"}, "keep_alive": "1m",
                                         "options": {"stop": ["x"], "top_p": 0.5}}}, 202),
            ("post", "/infer", {"json": {"model_id": "llama3.1", "messages": [{"role": "robot"}]}}, 400),
            ("get", "/infer", {}, 405),
            ("get", "/health", {}, 200),
            ("get", "/models", {}, 200),
            ("get", "/metrics", {}, 200),
            ("get", "/openapi.json", {}, 200),
        ]
        for method, path, kwargs, status in cases:
            reply = await http.request(method.upper(), path, **kwargs)
            assert reply.status_code == status, (path, reply.text)
            check(spec, "post" if path == "/infer" else "get", path, reply)
        # Where a request stands, and cancelling it.
        for method, path, status in (("get", "/infer/no-such-request", 404), ("get", "/infer/" + "x" * 257, 400),
                                     ("delete", "/infer/no-such-request", 202),
                                     ("delete", "/infer/" + "x" * 257, 400)):
            reply = await http.request(method.upper(), path)
            assert reply.status_code == status, (method, path, reply.text)
            check(spec, method, "/infer/{id}", reply)


async def test_unhealthy_answer_fits_the_spec(spec: dict[str, Any], stack: dict[str, str], logs_dir: Path) -> None:
    env = {**stack, "OLLAMA_HOST": f"http://127.0.0.1:{free_port()}"}  # nobody listens there
    gateway: Role = start_gateway(env, logs_dir)
    try:
        async with httpx.AsyncClient() as http:
            reply = await http.get(f"{gateway.url}/health")
    finally:
        gateway.stop()
    assert reply.status_code == 503
    check(spec, "get", "/health", reply)
    assert reply.json()["checks"]["model:llama3.1"]["status"] == "down"


async def test_request_schema_matches_what_the_gateway_accepts(spec: dict[str, Any], gateway_url: str) -> None:
    documented = set(spec["components"]["schemas"]["InferRequest"]["properties"])
    async with httpx.AsyncClient(base_url=gateway_url) as http:
        reply = await http.post("/infer", json={"model_id": "llama3.1", "input": "x", "colour": "red"})
    assert reply.status_code == 400
    # "unknown field 'colour'; allowed: [...]": the gateway's own list of fields.
    allowed = set(ast.literal_eval(reply.json()["error"].split("allowed: ", 1)[1]))
    assert documented == allowed
    assert not request_schema_accepts(spec, {"model_id": "llama3.1", "input": "x", "colour": "red"})
    # The limits in the spec are the gateway's limits, on both sides of each.
    long_id = "x" * (int(spec["components"]["schemas"]["InferRequest"]["properties"]["id"]["maxLength"]) + 1)
    cases = [
        ({"model_id": "llama3.1", "input": "x", "id": long_id}, 400),
        ({"model_id": "llama3.1", "input": "x", "id": long_id[1:]}, 202),
        ({"model_id": "llama3.1", "input": "x", "options": {"temperature": -0.1}}, 400),
        ({"model_id": "llama3.1", "input": "x", "options": {"max_tokens": 0}}, 400),
        ({"model_id": "llama3.1", "input": "x", "options": {"max_tokens": 2**31}}, 400),
        ({"model_id": "llama3.1", "input": "x", "context": {"metadata": {"n": 1}}}, 400),
        ({"model_id": "llama3.1", "input": "x", "context": {"session_id": ""}}, 400),
        ({"model_id": "llama3.1", "input": "x", "stream": "yes"}, 400),
        ({"model_id": "llama3.1", "input": "x", "context": None, "options": None}, 202),
        ({"model_id": "llama3.1", "input": "x", "cache": "no-store", "timeout_ms": 60_000}, 202),
        ({"model_id": "llama3.1", "input": "x", "cache": "sometimes"}, 400),
        ({"model_id": "llama3.1", "input": "x", "timeout_ms": 0}, 400),
        ({"model_id": "llama3.1", "messages": [{"role": "user", "content": "x"}], "tool_choice": None}, 202),
        ({"model_id": "llama3.1", "input": "x", "messages": [{"role": "user", "content": "x"}]}, 400),
        ({"model_id": "llama3.1", "input": "x", "options": {"mirostat": 1}}, 400),
        ({"model_id": "llama3.1", "input": "x", "options": {"extra": {"mirostat": 1}, "stop": "y"}}, 202),
        ({"model_id": "llama3.1", "input": "x", "format": "yaml"}, 400),
        ({"model_id": "llama3.1", "input": "x", "priority": "batch", "tenant": "team-a"}, 202),
        ({"model_id": "llama3.1", "input": "x", "priority": None, "tenant": None}, 202),
        ({"model_id": "llama3.1", "input": "x", "priority": "urgent"}, 400),
        ({"model_id": "llama3.1", "input": "x", "tenant": ""}, 400),
        ({"model_id": "llama3.1", "input": "x", "tenant": "t" * 257}, 400),
    ]
    async with httpx.AsyncClient(base_url=gateway_url) as http:
        for body, status in cases:
            reply = await http.post("/infer", json=body)
            assert reply.status_code == status, (body, reply.text)
            assert request_schema_accepts(spec, body) == (status == 202), body


def test_every_documented_path_is_routed(spec: dict[str, Any], gateway_url: str) -> None:
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            reply = httpx.request(method.upper(), f"{gateway_url}{path.replace('{id}', 'unknown-id')}", json={})
            if reply.status_code == 404 and "{" in path and "404" in operation["responses"]:
                check(spec, method, path, reply)  # routed: an unknown id's documented 404
                continue
            assert reply.status_code not in (404, 405), (method, path)
    assert json.loads(httpx.get(f"{gateway_url}/openapi.json").text) == spec
