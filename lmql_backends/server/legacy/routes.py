"""The legacy API's routes (the frozen protocol, api.py).

`add_routes` is what the composition root (server/app.py) calls when serving ``--legacy``.
"""

from __future__ import annotations

import concurrent.futures

from aiohttp import web

from .api import LEGACY, LegacyState, handle_queue, handle_results, not_found, stop_jobs
from .store import ResultLimits, ResultStore


def add_routes(app: web.Application, limits: ResultLimits = ResultLimits()) -> None:
    """Add the legacy endpoints to `app`, with the result store they share."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="legacy-tokenizer")
    app[LEGACY] = LegacyState(ResultStore(limits), pool)
    app.router.add_post("/queue", handle_queue)
    app.router.add_get("/results/{client_id}", handle_results)
    app.router.add_get("/queue", not_found)
    app.router.add_post("/results/{client_id}", not_found)
    app.on_shutdown.append(stop_jobs)
