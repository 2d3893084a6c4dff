"""The composition root of the servers: loading, the engine, health, metrics, shutdown, `serve`.

`serve-model MODEL` serves the new OpenAI-like API (openai/); with `--legacy`, the LMQL 0.0.6.x
API (legacy/). This is the only module that knows the protocols: each protocol package adds
its routes to the app made here and imports only the shared modules below it (state.py,
http.py, validation.py, errors.py) and the engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading

from aiohttp import web

from ..engine import Engine, EngineConfig
from ..chat_template import load_chat_template
from ..engine.process import EngineProcess
from ..engine.upstream import UpstreamConfig, UpstreamEngine
from ..errors import InvalidRequestError
from ..loader import LoadOptions, describe, load_model
from .http import auth_middleware, error_middleware
from . import lmtp
from .legacy import routes as legacy_routes
from .openai import api as openai_api
from .openai import chat as openai_chat
from .playground import routes as playground
from .state import API_KEY_ENV, METRICS_SOURCES, STATE, ServerConfig, ServerState, get_state

log = logging.getLogger("lmql_backends.server")

DRAIN_POLL_SECONDS = 0.05
#: how long startup waits for the engine thread to choose its threads and kernels (seconds)
ENGINE_READY_SECONDS = 120


def make_app(state: ServerState) -> web.Application:
    """The aiohttp application for `state`: shared endpoints plus one API's routes."""
    app = web.Application(
        client_max_size=state.config.max_body_bytes, middlewares=[error_middleware, playground.redirect_browsers, auth_middleware]
    )
    app[STATE] = state
    app[METRICS_SOURCES] = [state.engine.stats]
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.on_shutdown.append(drain_engine)  # first: in-flight requests may finish
    for protocol in (legacy_routes,) if state.config.legacy else (openai_api, openai_chat):
        protocol.add_routes(app)
    if not state.config.legacy:
        lmtp.add_routes(app, state)  # LMQL 0.7.x's client: a WebSocket at /
    playground.add_routes(app, state.config.host, state.config.playground)
    app.on_shutdown.append(stop_engine)
    return app


async def health(request: web.Request) -> web.Response:
    """200 while the engine runs; 503 once it is gone (its process died), so a supervisor restarts the server."""
    state = get_state(request)
    if not state.engine.is_alive:
        return web.json_response({"status": "engine stopped", "model": state.model_name}, status=503)
    return web.json_response({"status": "ok", "model": state.model_name})


async def metrics(request: web.Request) -> web.Response:
    """Engine statistics (and the protocol's own counters) in the Prometheus text format."""
    lines = []
    for source in request.app[METRICS_SOURCES]:
        for name, value in dataclasses.asdict(source()).items():
            lines += [f"# TYPE lmql_backends_{name} gauge", f"lmql_backends_{name} {float(value)}"]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


async def drain_engine(app: web.Application) -> None:
    """At shutdown (no new connections any more): let running requests finish, at most drain_seconds."""
    state = app[STATE]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + state.config.drain_seconds
    while state.engine.num_pending > 0 and loop.time() < deadline:
        await asyncio.sleep(DRAIN_POLL_SECONDS)


async def stop_engine(app: web.Application) -> None:
    """Cancel what is still running (each request gets a clean error) and stop the engine thread."""
    await asyncio.to_thread(app[STATE].engine.stop)


def make_state(model: str, config: ServerConfig, options: LoadOptions) -> ServerState:
    """Load the model and start its engine (in its own process, in a thread, or on the upstream), ready
    before the port opens."""
    if config.upstream is not None:
        engine = UpstreamEngine(model, config.upstream, options, config.engine, needs_full_distribution=config.legacy)
        print(engine.description, flush=True)
        return ServerState(model, engine.loaded, engine, config)
    if config.is_engine_process:
        engine = EngineProcess(model, options, config.engine)
        loaded = engine.wait_loaded()
        print(engine.description, flush=True)
    else:
        loaded = load_model(model, options)
        print(describe(loaded), flush=True)
        engine = Engine(loaded, config.engine).start()
    if not engine.wait_ready(ENGINE_READY_SECONDS):  # requests would only wait in its queue meanwhile
        log.warning("the engine is still tuning itself after %s s; serving anyway", ENGINE_READY_SECONDS)
    return ServerState(model, loaded, engine, config)


class ServerHandle:
    """A server running in a background thread; `stop()` shuts it down."""

    def __init__(self, state: ServerState):
        self.state = state
        self.port: int | None = None
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lmql-backends-server", daemon=True)

    @property
    def app(self) -> web.Application | None:
        """The running aiohttp application (None before `start`)."""
        return self._runner.app if self._runner is not None else None

    @property
    def endpoint(self) -> str:
        return f"{self.state.config.host}:{self.port}"

    def start(self, timeout: float = 60) -> "ServerHandle":
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the server did not start within {timeout} s")
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start_site())
        except BaseException as exc:  # report bind errors to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    async def _start_site(self) -> None:
        self._runner = web.AppRunner(make_app(self.state), handle_signals=False, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.state.config.host, self.state.config.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self._runner is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def read_chat_template(value: str | None, legacy: bool) -> str | None:
    """The template text of serve(chat_template=...): read before the model loads, so errors come first."""
    if value is None:
        return None
    if legacy:
        raise InvalidRequestError(
            "chat_template is for /v1/chat/completions, which the legacy API has not; drop it or --legacy",
            "chat_template",
        )
    return load_chat_template(value)


def serve(
    model: str, *, host: str = "127.0.0.1", port: int = 8080, legacy: bool = False,
    background: bool = False, api_key: str | None = None, served_model_names: tuple[str, ...] = (),
    engine: EngineConfig = EngineConfig(), max_body_bytes: int = ServerConfig.max_body_bytes,
    drain_seconds: float = ServerConfig.drain_seconds, engine_process: bool | None = None,
    chat_template: str | None = None, trust_request_chat_template: bool = False, playground: bool = False,
    upstream: str | UpstreamConfig | None = None, max_logprobs: int = ServerConfig.max_logprobs, **load_kwargs,
) -> ServerHandle | None:
    """Serve `model` over HTTP: the new API, or the legacy API with ``legacy=True``.

    Blocks until interrupted (SIGINT/SIGTERM: stop accepting, let running requests finish for
    up to `drain_seconds`, cancel the rest, return); with ``background=True`` returns a started
    `ServerHandle` (``port=0`` picks a free port, read it from ``handle.port``). Bodies over
    `max_body_bytes` are refused with 413. ``engine_process``: run the engine in a process of its
    own (True) or in a thread of this process, sharing its GIL with the HTTP work (False); by
    default a process for the new API and a thread for the legacy API, whose clients wait for one
    round trip per token. ``chat_template``: the Jinja chat template of
    ``/v1/chat/completions`` (a file path or the template text) for a model whose tokenizer has none
    or a wrong one; ``trust_request_chat_template=True`` lets requests send their own.
    ``playground=True`` lets the playground (``/playground``, ``POST /v1/queries``) run queries,
    which run Python, on a non-loopback `host` (on loopback it always may). ``upstream``: the URL
    (or an `UpstreamConfig`) of an OpenAI-compatible server (vLLM, another serve-model) that runs
    the model instead; only the tokenizer is loaded here (see docs/vllm.md). ``max_logprobs``: the
    most alternatives a completion may ask for (-1: the whole vocabulary). Other keywords are load
    options (``cuda``,
    ``dtype``, ``loader``, ``tokenizer``, any ``from_pretrained`` argument).
    """
    config = ServerConfig(
        host, port, legacy, tuple(served_model_names), api_key or os.environ.get(API_KEY_ENV),
        max_body_bytes=max_body_bytes, drain_seconds=drain_seconds, engine=engine,
        engine_process=engine_process, chat_template=read_chat_template(chat_template, legacy),
        trust_request_chat_template=trust_request_chat_template, playground=playground,
        upstream=UpstreamConfig(upstream) if isinstance(upstream, str) else upstream, max_logprobs=max_logprobs,
    )
    state = make_state(model, config, LoadOptions.make(**load_kwargs))
    if background:
        return ServerHandle(state).start()
    print(f"serving {model} ({'legacy' if legacy else 'OpenAI-compatible'} API) on http://{host}:{port}"
          f" (playground: http://{host}:{port}/playground)", flush=True)
    web.run_app(make_app(state), host=host, port=port, print=None, handler_cancellation=True, access_log=None)
    return None
