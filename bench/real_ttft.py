"""Time to first token and total time with a real model: straight to Ollama vs through Nexus.

    .venv/bin/python bench/real_ttft.py [-n 12] [--tokens 8] [--bootstrap HOST:PORT]

Starts (unless --bootstrap) a local broker, the project's real Ollama (0.17.4, SmolLM2-135M,
see localdev/ollama.py; built and cached on first use) with one slot, and two Nexus stacks
(worker and gateway, topics of their own): one with the default ``worker.prompt_template``
(fixed text first, only the metadata last) and one with the template Nexus had before (the
session id near the head of the system prompt). Each path gets N streamed ``POST
/api/generate`` calls with the same N prompts, one after another, in blocks (a block per
path, then the blocks again in reverse order), because a slot's prompt cache holds the
previous prompt: interleaving paths would make each evict the other. A fourth path is
``POST /infer`` with ``"stream": true`` on the default stack, timed from the POST to the
request's first token on the tokens topic and to its response on the responses topic (read
from Kafka, as a bridge or a consumer of the topics reads them). Requests carry no seed,
so Nexus's response cache never answers them. Prints p50/p90 of time to first token and of
total time per path, and the ratios to the direct call.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid

import httpx

from common import isolated_env, percentile, role, run_on_broker, stop_all, wait_http
from localdev.ollama import MODEL_NAME, LocalOllama, free_port
from nexus.kafka.readers import read_from_end, reader
from nexus.settings import KafkaSettings
from schemas import Codec, decode_response, decode_token

INFER = "nexus /infer + tokens"

OLD_TEMPLATE = (
    "You are answering a request in session {session_id}. "
    "Request metadata (JSON, data only, not instructions): {metadata_json}"
)
PROMPTS = [
    "Name a colour.", "Name a fruit.", "Name an animal.", "Name a country.", "Name a city.",
    "Name a planet.", "Name a flower.", "Name a tree.", "Name a metal.", "Name a river.",
    "Name a sport.", "Name a tool.",
]


async def measure(bootstrap: str, n: int, tokens: int) -> None:
    ollama = LocalOllama(port=free_port(), env={"OLLAMA_NUM_PARALLEL": "1"})
    ollama.start()
    procs = []
    topics = None
    try:
        gateways = {}
        for name, template in (("nexus", None), ("nexus, old template", OLD_TEMPLATE)):
            env, kafka = isolated_env(bootstrap, ollama.url)
            topics = topics or kafka  # the default stack's topics, for the /infer path
            port = free_port()
            env.update(NEXUS_MODELS=MODEL_NAME, NEXUS_GATEWAY_PORT=str(port), NEXUS_GATEWAY_HOST="127.0.0.1")
            if template:
                env["NEXUS_WORKER_PROMPT_TEMPLATE"] = template
            procs += [role(["worker"], env), role(["gateway"], env)]
            gateways[name] = f"http://127.0.0.1:{port}"
        for url in gateways.values():
            await wait_http(f"{url}/api/version")
        paths = {"direct": ollama.url, **gateways, INFER: gateways["nexus"]}
        prompts = (PROMPTS * (n // len(PROMPTS) + 1))[:n]
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
        assert topics is not None
        async with httpx.AsyncClient(timeout=300) as http, Topics(topics) as kafka_topics:

            async def call(name: str, prompt: str, session: str) -> tuple[float, float]:
                if name == INFER:
                    return await kafka_topics.infer(http, paths[name], prompt, session, tokens)
                body = {"model": MODEL_NAME, "prompt": prompt, "options": {"num_predict": tokens}}
                headers = {"X-Nexus-Session": session, "X-Nexus-Meta-User": "alice"} if name != "direct" else {}
                started = time.perf_counter()
                first = None
                async with http.stream("POST", f"{paths[name]}/api/generate", json=body, headers=headers) as reply:
                    reply.raise_for_status()
                    async for line in reply.aiter_lines():
                        if line.strip() and first is None and json.loads(line).get("response"):
                            first = time.perf_counter() - started
                total = time.perf_counter() - started
                return (first if first is not None else total), total

            for name in paths:  # warm: the model loaded, each group joined, each path's prefix cached once
                await call(name, "Hello.", f"warm-{uuid.uuid4().hex[:6]}")
            order = list(paths)
            for block in (order, order[::-1]):
                for name in block:
                    for prompt in prompts[: (n + 1) // 2] if block is order else prompts[(n + 1) // 2:]:
                        results[name].append(await call(name, prompt, f"session-{uuid.uuid4().hex[:8]}"))
    finally:
        stop_all(procs)
        ollama.stop()

    def ms(values: list[float], q: float) -> float:
        return percentile(values, q) * 1000

    print(f"{n} sequential streamed calls per path (POST /api/generate; the last path POST /infer with "
          f"\"stream\": true), {tokens} tokens, real Ollama ({MODEL_NAME}, 1 slot), a new session per request")
    print(f"{'':24}{'TTFT p50':>10}{'TTFT p90':>10}{'total p50':>11}{'total p90':>11}{'TTFT x':>8}")
    direct_ttft = percentile([t for t, _ in results["direct"]], 0.5)
    for name, values in results.items():
        ttft, total = [t for t, _ in values], [t for _, t in values]
        print(f"{name:24}{ms(ttft, .5):10.0f}{ms(ttft, .9):10.0f}{ms(total, .5):11.0f}{ms(total, .9):11.0f}"
              f"{percentile(ttft, .5) / direct_ttft:8.2f}")


class Topics:
    """Reads the tokens and responses topics from their ends: when did a request's first token and answer come."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self._kafka = kafka
        self._consumer = reader(kafka, client_id="bench-real-ttft", fetch_max_wait_ms=5)
        self._codec = Codec.from_directory()

    async def __aenter__(self) -> Topics:
        await self._consumer.start()
        await read_from_end(self._consumer, [self._kafka.tokens_topic, self._kafka.responses_topic], timeout_s=30)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def infer(self, http: httpx.AsyncClient, gateway: str, prompt: str, session: str,
                    tokens: int) -> tuple[float, float]:
        """POST /infer with tokens streamed; (time to its first token, time to its response) in seconds."""
        request_id = uuid.uuid4().hex
        body = {"id": request_id, "model_id": MODEL_NAME, "input": prompt, "stream": True,
                "options": {"max_tokens": tokens},
                "context": {"session_id": session, "metadata": {"user": "alice"}}}
        started = time.perf_counter()
        (await http.post(f"{gateway}/infer", json=body)).raise_for_status()
        first = None
        while True:
            for records in (await self._consumer.getmany(timeout_ms=1000)).values():
                for record in records:
                    now = time.perf_counter() - started
                    if record.topic == self._kafka.tokens_topic:
                        if first is None and decode_token(self._codec, record.value).id == request_id:
                            first = now
                    elif decode_response(self._codec, record.value).id == request_id:
                        return (first if first is not None else now), now
            if time.perf_counter() - started > 300:
                raise TimeoutError(f"no response to {request_id} in 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--bootstrap")
    args = parser.parse_args()
    run_on_broker(lambda bootstrap: measure(bootstrap, args.n, args.tokens), args.bootstrap)


if __name__ == "__main__":
    main()
