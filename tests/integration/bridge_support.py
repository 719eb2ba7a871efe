"""Helpers for the websocket bridge's tests: a recording websocket client and a result publisher."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaProducer
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from schemas import (
    Codec,
    InferenceResponse,
    InferenceToken,
    ModelContext,
    encode_response,
    encode_token,
    utcnow,
)

Frame = dict[str, Any]


class WsClient:
    """A websocket client that records every frame it receives, in order."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[Frame] = []
        self.closed = False  # the connection ended; the code is in ``ws.close_code``
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str, **kwargs: Any) -> WsClient:
        return cls(await connect(url, **kwargs))

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                self.frames.append(json.loads(message))
                self._changed.set()
        except ConnectionClosed:
            pass
        finally:
            self.closed = True
            self._changed.set()

    async def send(self, frame: Frame | str) -> None:
        await self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    async def wait_for(self, done: Callable[[list[Frame]], bool], timeout: float = 20.0) -> list[Frame]:
        """Wait until ``done(frames)``; raise TimeoutError showing what arrived."""
        async def condition() -> None:
            while not done(self.frames):
                if self.closed:
                    raise AssertionError(
                        f"connection closed ({self.ws.close_code} {self.ws.close_reason}); frames: {self._tail()}"
                    )
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(condition(), timeout)
        except TimeoutError:
            raise TimeoutError(f"condition not met in {timeout}s; {len(self.frames)} frames: {self._tail()}") from None
        return self.frames

    async def next_of(self, kind: str, after: int = 0, timeout: float = 20.0) -> Frame:
        """The first frame of type ``kind`` at index >= ``after``."""
        frames = await self.wait_for(lambda fs: any(f["type"] == kind for f in fs[after:]), timeout)
        return next(f for f in frames[after:] if f["type"] == kind)

    def of(self, kind: str) -> list[Frame]:
        return [f for f in self.frames if f["type"] == kind]

    async def close(self) -> None:
        await self.ws.close()
        await self._reader

    def _tail(self) -> str:
        return json.dumps(self.frames[-5:])[:1500]


class Publisher:
    """Produces results and tokens straight to Kafka, as a worker would (acks=all)."""

    def __init__(self, bootstrap: str, responses_topic: str, tokens_topic: str) -> None:
        self.codec = Codec.from_directory()
        self.responses_topic = responses_topic
        self.tokens_topic = tokens_topic
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)

    async def __aenter__(self) -> Publisher:
        await self.producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.producer.stop()

    def response(self, request_id: str, session_id: str, output: str = "") -> InferenceResponse:
        return InferenceResponse(
            id=request_id, model_id="llama3.1", status="ok", context=ModelContext(session_id),
            latency_ms=1, completed_at=utcnow(), output=output or f"answer to {request_id}",
            endpoint="http://test",
        )

    async def result(
        self, request_id: str, session_id: str, output: str = "", partition: int | None = None, wait: bool = True
    ) -> asyncio.Future[Any]:
        """Produce a result; with ``partition``, on that partition (to fix the order across sessions)."""
        value = encode_response(self.codec, self.response(request_id, session_id, output))
        future = await self.producer.send(
            self.responses_topic, value, key=session_id.encode(), partition=partition
        )
        if wait:
            await future
        return future

    async def token(self, request_id: str, session_id: str, seq: int, text: str) -> None:
        token = InferenceToken(id=request_id, model_id="llama3.1", session_id=session_id, seq=seq, text=text)
        await self.producer.send_and_wait(
            self.tokens_topic, encode_token(self.codec, token), key=session_id.encode()
        )
