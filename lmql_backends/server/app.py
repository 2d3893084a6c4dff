"""Server startup shared by both APIs: loading, the engine, auth, health, metrics, shutdown.

`serve-model MODEL` serves the new OpenAI-like API; with `--legacy`, the LMQL 0.0.6.x API.
The protocol modules (openai_api.py, legacy_api.py) only add their routes to the app made
here; neither has model code of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import os
import threading

from aiohttp import web

from ..engine import Engine, EngineConfig
from ..errors import AuthenticationError
from ..loader import LoadedModel, LoadOptions, describe, load_model
from .errors import classify, error_headers, openai_error_body

log = logging.getLogger("lmql_backends.server")

API_KEY_ENV = "LMQL_BACKENDS_API_KEY"
STATE = web.AppKey("state", object)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything `serve-model` needs besides the model's load options."""

    host: str = "127.0.0.1"
    port: int = 8080
    legacy: bool = False
    served_model_names: tuple[str, ...] = ()
    api_key: str | None = None
    max_body_bytes: int = 8 * 2**20
    engine: EngineConfig = EngineConfig()


@dataclasses.dataclass
class ServerState:
    """What every handler can reach: the model string, the loaded model and the engine."""

    model_name: str
    loaded: LoadedModel
    engine: Engine
    config: ServerConfig

    @property
    def served_names(self) -> tuple[str, ...]:
        return (self.model_name, *self.config.served_model_names)


def get_state(request: web.Request) -> ServerState:
    return request.app[STATE]


def make_app(state: ServerState) -> web.Application:
    """The aiohttp application for `state`: shared endpoints plus one API's routes."""
    from . import legacy_api, openai_api

    app = web.Application(client_max_size=state.config.max_body_bytes, middlewares=[auth_middleware])
    app[STATE] = state
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    (legacy_api if state.config.legacy else openai_api).add_routes(app)
    app.on_shutdown.append(stop_engine)
    return app


@web.middleware
async def auth_middleware(request: web.Request, handler):
    expected = get_state(request).config.api_key
    if expected and not is_authorized(request.headers.get("Authorization", ""), expected):
        exc = AuthenticationError("missing or wrong API key: send 'Authorization: Bearer <key>'")
        return web.json_response(openai_error_body(exc), status=401)
    return await handler(request)


def is_authorized(header: str, expected: str) -> bool:
    """Constant-time check of an ``Authorization: Bearer <key>`` header."""
    scheme, _, key = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), expected.encode())


def json_error(exc: BaseException) -> web.Response:
    """An OpenAI-style error response for `exc`, with the status from the error table."""
    status, _, _ = classify(exc)
    return web.json_response(openai_error_body(exc), status=status, headers=error_headers(exc))


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "model": get_state(request).model_name})


async def metrics(request: web.Request) -> web.Response:
    """Engine statistics in the Prometheus text format."""
    stats = dataclasses.asdict(get_state(request).engine.stats())
    lines = []
    for name, value in stats.items():
        lines += [f"# TYPE lmql_backends_{name} gauge", f"lmql_backends_{name} {float(value)}"]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


async def stop_engine(app: web.Application) -> None:
    await asyncio.to_thread(app[STATE].engine.stop)


def make_state(model: str, config: ServerConfig, options: LoadOptions) -> ServerState:
    """Load the model (once per process) and start its engine."""
    loaded = load_model(model, options)
    print(describe(loaded), flush=True)
    return ServerState(model, loaded, Engine(loaded, config.engine).start(), config)


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


def serve(
    model: str, *, host: str = "127.0.0.1", port: int = 8080, legacy: bool = False,
    background: bool = False, api_key: str | None = None, served_model_names: tuple[str, ...] = (),
    engine: EngineConfig = EngineConfig(), **load_kwargs,
) -> ServerHandle | None:
    """Serve `model` over HTTP: the new API, or the legacy API with ``legacy=True``.

    Blocks until interrupted; with ``background=True`` returns a started `ServerHandle`
    (``port=0`` picks a free port, read it from ``handle.port``). Other keywords are load
    options (``cuda``, ``dtype``, ``loader``, ``tokenizer``, any ``from_pretrained`` argument).
    """
    config = ServerConfig(host, port, legacy, tuple(served_model_names), api_key or os.environ.get(API_KEY_ENV), engine=engine)
    state = make_state(model, config, LoadOptions.make(**load_kwargs))
    if background:
        return ServerHandle(state).start()
    print(f"serving {model} ({'legacy' if legacy else 'OpenAI-compatible'} API) on http://{host}:{port}", flush=True)
    web.run_app(make_app(state), host=host, port=port, print=None, handler_cancellation=True, access_log=None)
    return None
