"""The playground's routes: the page and its static files, ``POST /v1/queries``, and the redirect
of a browser's ``GET /`` to the page.

The page and its files need no API key (a browser cannot send one when it navigates; they hold no
data); the page sends the key it is given with each query.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import hdrs, web

from .queries import RUNNING, create_query, is_enabled

STATIC = Path(__file__).parent / "static"
PAGE_PATH = "/playground"


def add_routes(app: web.Application, host: str, explicit: bool) -> None:
    """The page, its files and the events endpoint (answering 403 unless `is_enabled`)."""
    app[RUNNING] = {}
    app.router.add_get(PAGE_PATH, page)
    app.router.add_get(PAGE_PATH + "/", page)
    app.router.add_static(PAGE_PATH + "/static", STATIC)
    app.router.add_post("/v1/queries", create_query if is_enabled(host, explicit) else queries_disabled)


async def page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def queries_disabled(request: web.Request) -> web.Response:
    """403: queries run Python, so a server reachable from other machines runs them only when told to."""
    message = ("this server does not run queries: it binds a non-loopback address and queries run Python "
               "in the server process; start serve-model with --playground to allow them")
    error = {"message": message, "type": "permission_error", "param": None, "code": "playground_disabled"}
    return web.json_response({"error": error}, status=403)


def wants_page(request: web.Request) -> bool:
    """A browser navigating to ``/``: a GET that accepts HTML and is no WebSocket upgrade."""
    return (
        request.method == hdrs.METH_GET and request.path == "/"
        and "text/html" in request.headers.get(hdrs.ACCEPT, "")
        and "websocket" not in request.headers.get(hdrs.UPGRADE, "").lower()
    )


@web.middleware
async def redirect_browsers(request: web.Request, handler):
    """Send a browser's ``GET /`` to the playground; every other request goes on unchanged."""
    if wants_page(request):
        raise web.HTTPFound(PAGE_PATH)
    return await handler(request)
