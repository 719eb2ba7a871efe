"""Model residency: which endpoints have which models, and which are loaded, told to the routers.

Each endpoint is asked for its :class:`~streams.backends.base.Inventory` through the
backend (Ollama: ``GET /api/tags`` and ``GET /api/ps``) when the worker starts, every
:data:`REFRESH_S` after that, and at once when a call is answered "model not found".
Every model's router that routes to the endpoint is given the answer: a model the
endpoint lacks is not sent there, and one loaded there is preferred over a cold load.
An endpoint that cannot be asked keeps its last known inventory (none: every model is
allowed there, as before residency was known).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from streams.answering.clock import Clock
from streams.answering.routing import ModelRouter
from streams.backends.base import Backend, Inventory

log = logging.getLogger(__name__)

REFRESH_S = 15.0
INVENTORY_TIMEOUT_S = 2.0


class Residency:
    """Asks endpoints what they have; one question per endpoint at a time, shared by its askers."""

    def __init__(
        self,
        backend: Backend,
        routers: Mapping[str, ModelRouter],
        clock: Clock,
        interval_s: float = REFRESH_S,
        timeout_s: float = INVENTORY_TIMEOUT_S,
    ) -> None:
        self._backend = backend
        self._clock = clock
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._routers: dict[str, list[ModelRouter]] = {}
        for router in routers.values():
            for url in router.endpoints:
                self._routers.setdefault(url, []).append(router)
        self._asking: dict[str, asyncio.Task[Inventory | None]] = {}
        self._watcher: asyncio.Task[None] | None = None
        self.inventories: dict[str, Inventory] = {}  # the last answer of each endpoint
        self.errors: dict[str, str] = {}  # why an endpoint could not be asked, the last time

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(self._routers)

    async def refresh(self, url: str) -> Inventory | None:
        """Ask ``url`` now (or join the question already under way); ``None`` if it cannot say."""
        task = self._asking.get(url)
        if task is None:
            task = asyncio.ensure_future(self._ask(url))
            self._asking[url] = task
            task.add_done_callback(lambda _: self._asking.pop(url, None))
        return await asyncio.shield(task)  # one asker cancelled does not cancel the others' question

    async def refresh_all(self) -> None:
        await asyncio.gather(*(self.refresh(url) for url in self._routers))

    async def _ask(self, url: str) -> Inventory | None:
        try:
            inventory = await self._backend.inventory(url, self._timeout_s)
        except Exception as exc:  # an endpoint that cannot be asked keeps what was known of it
            if self.errors.get(url) != str(exc):
                log.info("cannot ask %s which models it has: %s", url, exc)
            self.errors[url] = str(exc)
            return None
        self.errors.pop(url, None)
        self.inventories[url] = inventory
        for router in self._routers.get(url, ()):
            router.set_inventory(url, inventory)
        return inventory

    def watch(self) -> None:
        """Refresh every endpoint now and every ``interval_s`` in the background (a no-op once running)."""
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while True:
            try:
                await self.refresh_all()
            except Exception:  # never stop refreshing over one bad answer
                log.exception("refreshing the endpoints' inventories failed")
            await self._clock.sleep(self._interval_s)

    async def aclose(self) -> None:
        tasks = [t for t in (self._watcher, *self._asking.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def missing(self) -> dict[str, dict[str, list[str] | None]]:
        """For each model missing somewhere: the endpoints that lack it, each with what it has
        (``None`` when it answered "model not found" but its inventory is unknown)."""
        out: dict[str, dict[str, list[str] | None]] = {}
        seen: set[int] = set()
        for routers in self._routers.values():
            for router in routers:
                if id(router) in seen:
                    continue
                seen.add(id(router))
                where = router.missing_where()
                if where:
                    out[router.model.id] = where
        return out
