"""The gateway's page: a small static UI that submits over the websocket bridge and watches it.

``/`` serves ``static/index.html``, ``/static/*`` its script and styles, and
``/config.json`` tells the page where the bridge listens (the page runs in a
browser that may reach the gateway under any host name, so by default it uses
its own host with the bridge's port and path).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import web

from nexus.settings import Settings

STATIC_DIR = Path(__file__).parent / "static"


def page_config(settings: Settings) -> dict[str, Any]:
    """What the page needs to find the bridge; ``bridge_url`` wins when set."""
    config: dict[str, Any] = {
        "bridge_url": settings.bridge.public_url or None,
        "bridge_port": settings.bridge.port,
        "bridge_path": settings.bridge.path,
    }
    if settings.access.enabled:  # the page then asks for a token; it never learns which keys exist
        config["api_keys"] = True
    return config


def add_page_routes(app: web.Application, settings: Settings) -> None:
    """Register ``/``, ``/config.json`` and ``/static/`` on the gateway's application."""
    index = STATIC_DIR / "index.html"
    if not index.is_file():
        raise FileNotFoundError(
            f"{index} is missing: the page's static files were not installed "
            "(pyproject [tool.setuptools.package-data] \"producers.gateway\" = [\"static/*\"])"
        )

    async def page(request: web.Request) -> web.FileResponse:
        return web.FileResponse(index, headers={"Cache-Control": "no-cache"})

    async def config(request: web.Request) -> web.Response:
        return web.json_response(page_config(settings))

    app.router.add_get("/", page)
    app.router.add_get("/config.json", config)
    app.router.add_static("/static/", STATIC_DIR)
