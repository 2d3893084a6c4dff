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
from ..engine.process import EngineProcess
from ..errors import (
    AuthenticationError, EndpointNotFoundError, InvalidRequestError, MethodNotAllowedError, RequestTooLargeError,
)
from ..chat_template import load_chat_template
from ..loader import LoadedModel, LoadOptions, describe, load_model
from .errors import classify, error_headers, openai_error_body

log = logging.getLogger("lmql_backends.server")

API_KEY_ENV = "LMQL_BACKENDS_API_KEY"
STATE = web.AppKey("state", object)
#: functions returning a dataclass of extra /metrics gauges (the protocol modules add theirs)
METRICS_SOURCES = web.AppKey("metrics_sources", list)
#: paths answered without an API key (load balancers probe them), as vLLM does
OPEN_PATHS = frozenset({"/health"})
DRAIN_POLL_SECONDS = 0.05
#: how long startup waits for the engine thread to choose its threads and kernels (seconds)
ENGINE_READY_SECONDS = 120


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything `serve-model` needs besides the model's load options."""

    host: str = "127.0.0.1"
    port: int = 8080
    legacy: bool = False
    served_model_names: tuple[str, ...] = ()
    api_key: str | None = None
    max_body_bytes: int = 8 * 2**20
    drain_seconds: float = 5.0
    engine: EngineConfig = EngineConfig()
    legacy_lookahead: bool = True
    #: run the engine in a process of its own (engine/process.py) or in a thread of this one;
    #: None: a process for the new API (many streams), a thread for the legacy API (one round trip per token)
    engine_process: bool | None = None
    #: the Jinja chat template of /v1/chat/completions (None: the tokenizer's own)
    chat_template: str | None = None
    #: take a request's own chat_template (Jinja that runs in the server; off by default, as in vLLM)
    trust_request_chat_template: bool = False

    @property
    def is_engine_process(self) -> bool:
        return (not self.legacy) if self.engine_process is None else self.engine_process

    def __post_init__(self):
        if not is_positive_int(self.max_body_bytes):
            raise InvalidRequestError(
                f"max_body_bytes must be a positive number of bytes, got {self.max_body_bytes!r}", "max_body_bytes"
            )
        if not isinstance(self.drain_seconds, (int, float)) or not self.drain_seconds >= 0:
            raise InvalidRequestError(
                f"drain_seconds must be a number of seconds >= 0, got {self.drain_seconds!r}", "drain_seconds"
            )


def is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclasses.dataclass
class ServerState:
    """What every handler can reach: the model string, the loaded model and the engine."""

    model_name: str
    loaded: LoadedModel
    engine: Engine | EngineProcess
    config: ServerConfig

    @property
    def served_names(self) -> tuple[str, ...]:
        return (self.model_name, *self.config.served_model_names)


def get_state(request: web.Request) -> ServerState:
    return request.app[STATE]


def make_app(state: ServerState) -> web.Application:
    """The aiohttp application for `state`: shared endpoints plus one API's routes."""
    from . import chat, legacy_api, openai_api

    app = web.Application(
        client_max_size=state.config.max_body_bytes, middlewares=[error_middleware, auth_middleware]
    )
    app[STATE] = state
    app[METRICS_SOURCES] = [state.engine.stats]
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.on_shutdown.append(drain_engine)  # first: in-flight requests may finish
    (legacy_api if state.config.legacy else openai_api).add_routes(app)
    if not state.config.legacy:
        chat.add_routes(app)
    app.on_shutdown.append(stop_engine)
    return app


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Every error that escapes a handler (aiohttp's own 404/405/413 too) in the API's format."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        error = from_http_exception(exc, get_state(request).config)
        if error is None:
            raise
        return error_response(get_state(request), error)
    except Exception as exc:  # a bug: log it, answer a 500 in the API's format
        log.error("%s %s failed unexpectedly", request.method, request.path, exc_info=exc)
        return error_response(get_state(request), exc)


@web.middleware
async def auth_middleware(request: web.Request, handler):
    """Every path but /health needs ``Authorization: Bearer <key>`` when the server has a key."""
    expected = get_state(request).config.api_key
    is_open = not expected or request.path in OPEN_PATHS
    if not is_open and not is_authorized(request.headers.get("Authorization", ""), expected):
        exc = AuthenticationError("missing or wrong API key: send the header 'Authorization: Bearer <key>'")
        return error_response(get_state(request), exc)
    return await handler(request)


def is_authorized(header: str, expected: str) -> bool:
    """Constant-time check of an ``Authorization: Bearer <key>`` header."""
    scheme, _, key = header.partition(" ")
    sent = key.strip().encode("utf-8", "surrogateescape")  # headers that are not UTF-8 arrive escaped
    return scheme.lower() == "bearer" and hmac.compare_digest(sent, expected.encode())


def json_error(exc: BaseException) -> web.Response:
    """An OpenAI-style error response for `exc`, with the status from the error table."""
    status, _, _ = classify(exc)
    return web.json_response(openai_error_body(exc), status=status, headers=error_headers(exc))


def text_error(exc: BaseException) -> web.Response:
    """A legacy-API error response: the message of `exc` as ``text/plain``, status from the error table."""
    status, _, _ = classify(exc)
    text = str(exc) or type(exc).__name__
    return web.Response(body=text.encode(), status=status, content_type="text/plain", headers=error_headers(exc))


def error_response(state: ServerState, exc: BaseException) -> web.Response:
    """`exc` in the format of the API this server speaks (text on the legacy API, JSON otherwise)."""
    return text_error(exc) if state.config.legacy else json_error(exc)


def from_http_exception(exc: web.HTTPException, config: ServerConfig) -> Exception | None:
    """Our typed error for aiohttp's 404, 405, 413 and 400 (None for the others: aiohttp answers them)."""
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return body_too_large(config.max_body_bytes)
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return MethodNotAllowedError(f"this endpoint does not answer {exc.method}; use {allowed}")
    if isinstance(exc, web.HTTPNotFound):
        return EndpointNotFoundError("no endpoint has this path; see docs/new-api.md for the endpoints")
    if isinstance(exc, web.HTTPBadRequest):
        return InvalidRequestError(exc.text or exc.reason)
    return None


def body_too_large(limit: int) -> RequestTooLargeError:
    return RequestTooLargeError(
        f"the request body is larger than this server's limit of {limit} bytes; send a smaller request, "
        f"or start the server with a larger --max-body-bytes"
    )


async def read_body(request: web.Request) -> bytes:
    """The whole request body; RequestTooLargeError (413) when it is over --max-body-bytes."""
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise body_too_large(get_state(request).config.max_body_bytes) from None


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
    """Load the model and start its engine (in its own process or in a thread), ready before the port opens."""
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
    drain_seconds: float = ServerConfig.drain_seconds, legacy_lookahead: bool = True, engine_process: bool | None = None,
    chat_template: str | None = None, trust_request_chat_template: bool = False, **load_kwargs,
) -> ServerHandle | None:
    """Serve `model` over HTTP: the new API, or the legacy API with ``legacy=True``.

    Blocks until interrupted (SIGINT/SIGTERM: stop accepting, let running requests finish for
    up to `drain_seconds`, cancel the rest, return); with ``background=True`` returns a started
    `ServerHandle` (``port=0`` picks a free port, read it from ``handle.port``). Bodies over
    `max_body_bytes` are refused with 413. ``legacy_lookahead=False`` turns off the legacy API's
    lookahead (computing the likeliest next forward while the client chooses). ``engine_process``:
    run the engine in a process of its own (True) or in a thread of this process, sharing its GIL
    with the HTTP work (False); by default a process for the new API and a thread for the legacy
    API, whose clients wait for one round trip per token. ``chat_template``: the Jinja chat template of
    ``/v1/chat/completions`` (a file path or the template text) for a model whose tokenizer has none
    or a wrong one; ``trust_request_chat_template=True`` lets requests send their own. Other keywords are
    load options (``cuda``,
    ``dtype``, ``loader``, ``tokenizer``, any ``from_pretrained`` argument).
    """
    config = ServerConfig(
        host, port, legacy, tuple(served_model_names), api_key or os.environ.get(API_KEY_ENV),
        max_body_bytes=max_body_bytes, drain_seconds=drain_seconds, engine=engine, legacy_lookahead=legacy_lookahead,
        engine_process=engine_process, chat_template=read_chat_template(chat_template, legacy),
        trust_request_chat_template=trust_request_chat_template,
    )
    state = make_state(model, config, LoadOptions.make(**load_kwargs))
    if background:
        return ServerHandle(state).start()
    print(f"serving {model} ({'legacy' if legacy else 'OpenAI-compatible'} API) on http://{host}:{port}", flush=True)
    web.run_app(make_app(state), host=host, port=port, print=None, handler_cancellation=True, access_log=None)
    return None
