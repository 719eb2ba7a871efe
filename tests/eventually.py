"""Wait for a condition instead of sleeping: the one polling helper of the suite.

A test that sleeps "long enough" is either slow or flaky. ``eventually`` checks a
condition until it holds and fails with a message that says what never happened
(and, if given, what the system last said about it) when it does not in time.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["eventually", "eventually_sync"]

T = TypeVar("T")


async def eventually(
    check: Callable[[], T | Awaitable[T]],
    what: str,
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    context: Callable[[], str] | None = None,
) -> T:
    """Call ``check`` (sync or async) until it returns something truthy, and return that.

    Exceptions raised by ``check`` count as "not yet" and are shown if time runs out.
    ``context`` adds a diagnosis to the failure, e.g. a role's log tail.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: object = None
    while True:
        try:
            value = check()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value  # type: ignore[return-value]
            last = value
        except Exception as exc:  # noqa: BLE001 - shown below if it never passes
            last = exc
        if loop.time() >= deadline:
            raise AssertionError(_failure(what, timeout, last, context))
        await asyncio.sleep(interval)


def eventually_sync(
    check: Callable[[], T],
    what: str,
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    context: Callable[[], str] | None = None,
) -> T:
    """:func:`eventually` for code that is not in an event loop."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = check()
            if value:
                return value
            last = value
        except Exception as exc:  # noqa: BLE001
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(_failure(what, timeout, last, context))
        time.sleep(interval)


def _failure(what: str, timeout: float, last: object, context: Callable[[], str] | None) -> str:
    message = f"never happened within {timeout:g} s: {what} (last: {last!r})"
    if context is not None:
        message += "\n" + context()
    return message
