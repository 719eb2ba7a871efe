"""A streamed body split into lines: NDJSON (Ollama) and SSE (OpenAI).

The body is read in chunks as they come and split by :class:`LineSplitter`, up to a generous cap
per line (one long answer, tool call or base64 image may come as a single line; aiohttp's
``readline``, used before, refused lines over 512 KiB as an internal error); past the cap the
call fails with a :class:`~streams.backends.base.BackendError` that names it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from streams.backends.base import BackendError
from streams.backends.http import Response

__all__ = ["MAX_LINE_BYTES", "LineSplitter", "lines_of"]

# One streamed line at most: far above any chunk a model server sends (a whole answer of a
# non-streaming-minded server fits), small enough that a runaway line cannot exhaust the worker.
MAX_LINE_BYTES = 16 * 1024 * 1024


class LineSplitter:
    """Bytes in, whole lines out (without ``\\n`` or ``\\r\\n``). No I/O.

    A line (complete or still growing) longer than ``max_bytes`` raises a non-retryable
    :class:`BackendError` naming ``endpoint`` and the cap: another endpoint would send the same.
    """

    def __init__(self, endpoint: str, max_bytes: int = MAX_LINE_BYTES) -> None:
        self._endpoint = endpoint
        self._max = max_bytes
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The lines ``data`` completes, in order; the rest is kept for the next feed."""
        buffer = self._buffer
        searched = len(buffer)  # the part already held has no newline
        buffer += data
        lines = []
        begin = 0
        while (end := buffer.find(b"\n", max(searched, begin))) != -1:
            lines.append(self._line(buffer, begin, end))
            begin = end + 1
        if begin:
            del buffer[:begin]
        if len(buffer) > self._max:
            raise self._too_long()
        return lines

    def finish(self) -> bytes | None:
        """The last line, when the body did not end with a newline."""
        if not self._buffer:
            return None
        line = self._line(self._buffer, 0, len(self._buffer))
        self._buffer.clear()
        return line

    def _line(self, buffer: bytearray, begin: int, end: int) -> bytes:
        if end - begin > self._max:
            raise self._too_long()
        if end > begin and buffer[end - 1] == 0x0D:  # \r\n
            end -= 1
        return bytes(buffer[begin:end])

    def _too_long(self) -> BackendError:
        return BackendError(
            f"{self._endpoint} sent a streamed line longer than {_size(self._max)}, the most one line "
            f"may hold: the answer was not read", retryable=False,
        )


async def lines_of(response: Response, splitter: LineSplitter) -> AsyncIterator[bytes]:
    """The lines of ``response``'s body as its chunks arrive."""
    async for data in response.chunks():
        for line in splitter.feed(data):
            yield line
    last = splitter.finish()
    if last is not None:
        yield last


def _size(n: int) -> str:
    """``16 MiB``, ``512 KiB`` or ``100 bytes``: the cap as an operator reads it."""
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"
