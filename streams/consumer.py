"""Faust's Kafka consumer, run on the worker's own event loop instead of a thread of its own.

Why: Faust (faust-streaming) runs aiokafka in a thread with a second event loop and hands every
fetch back through method queues (``call_thread``, ``call_soon_threadsafe``): about 0.6 ms more
from a request's append to the agent than a plain aiokafka consumer on one loop
(docs/performance.md, section 9), and two loops' wake-ups per fetch. aiokafka is an asyncio
library: on the app's loop it needs no thread, so :class:`SameLoopConsumerThread` keeps Faust's
consumer (its rebalance listener, its fetch rules, its commits) and only drops the thread: a
call "into the thread" is a plain ``await``. The rebalance callbacks still go through Faust's
main-loop method queue, as they did from the thread.

The consumer also delivers each record without tasks when it can (:meth:`SameLoopConsumer.wait_first`):
Faust's fetch loop hands a record to its streams as ``wait_first(callback(message),
suspend_flow.wait())``, four tasks, a wait and three cancellations per record (a request's and
its cache update's), though the callback waits only when a stream's buffer is full. It is run at
once (:func:`run_now`) and raced with the rest only if it has to wait.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka
from mode.services import WaitArgT, WaitResults
from mode.utils.futures import maybe_async

# Faust's own lines ("Starting...") under Faust's name, held back with it (nexus/logs.py).
FAUST_LOG = logging.getLogger("faust.transport.same_loop")


class SameLoopConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's aiokafka consumer "thread", started and stopped as a plain service on the app's loop."""

    logger = FAUST_LOG

    def __init__(self, consumer: Any, **kwargs: Any) -> None:
        super().__init__(consumer, thread_loop=kwargs["loop"], **kwargs)

    async def start(self) -> None:
        self._thread_started.set()
        await self._default_start()

    # mode's ServiceThread leaves these to its thread; with none, the stop does them itself.
    async def _stop_children(self) -> None:
        await self.on_thread_stop()
        await self._default_stop_children()
        self.set_shutdown()

    async def _stop_futures(self) -> None:
        await self._default_stop_futures()

    async def _stop_exit_stacks(self) -> None:
        await self._default_stop_exit_stacks()

    async def call_thread(self, fun: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        return await maybe_async(fun(*args, **kwargs))

    async def cast_thread(self, fun: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> None:
        await maybe_async(fun(*args, **kwargs))


class SameLoopConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer with :class:`SameLoopConsumerThread` in place of its thread, and
    records delivered at once when their delivery does not wait."""

    logger = FAUST_LOG

    async def wait_first(self, *coros: WaitArgT, timeout: Any = None) -> WaitResults:
        first = coros[0] if coros else None
        if not asyncio.iscoroutine(first) or self.should_stop or self._crashed.is_set():
            return await super().wait_first(*coros, timeout=timeout)
        rest = coros[1:]
        try:
            finished, value = run_now(first)
        except BaseException:
            _close(rest)
            raise
        if finished:
            _close(rest)
            return WaitResults([first], [value], False)
        return await super().wait_first(value, *rest, timeout=timeout)

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return SameLoopConsumerThread(self, loop=self.loop, beacon=self.beacon)


def run_now(coro: Coroutine[Any, Any, Any]) -> tuple[bool, Any]:
    """Run ``coro`` in the caller's turn until it finishes or has to wait: ``(True, its result)``,
    or ``(False, a coroutine that goes on with it)`` to await or wrap in a task. Its exception is raised."""
    try:
        waited_on = coro.send(None)
    except StopIteration as finished:
        return True, finished.value
    return False, _go_on(coro, waited_on)


async def _go_on(coro: Coroutine[Any, Any, Any], waited_on: Any) -> Any:
    """Drive ``coro`` on from where it yielded ``waited_on`` (a future, or None: a bare yield), as
    a Task drives its coroutine: resumed once the future is done, a cancel passed in."""
    while True:
        thrown: BaseException | None = None
        try:
            if waited_on is None:
                await asyncio.sleep(0)
            else:
                waited_on._asyncio_future_blocking = False
                await asyncio.wait([waited_on])
        except asyncio.CancelledError as cancel:
            if waited_on is not None:
                waited_on.cancel()
            thrown = cancel
        try:
            waited_on = coro.send(None) if thrown is None else coro.throw(thrown)
        except StopIteration as finished:
            return finished.value


def _close(coros: tuple[WaitArgT, ...]) -> None:
    """Close the coroutines not run (no "never awaited" warning)."""
    for coro in coros:
        if asyncio.iscoroutine(coro):
            coro.close()
