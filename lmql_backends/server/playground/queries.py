"""``POST /v1/queries``: run an LMQL query on this server's engine and stream its decoding (SSE).

The body is JSON: ``{"query": "...", "decoder": "argmax" | "sample(temperature=0.8, seed=1)" |
{"name": "sample", ...}, "top_k": 5}``. The query runs in the server process, through the same
runtime as `lmql_backends.run`, on an in-process client over the server's engine, wrapped in an
`ObservedClient` that turns each decoding step into an event. Events (``event: TYPE`` then
``data: JSON``): ``prompt``, ``token``, ``variable_end``, then ``result`` or ``error``, then
``done``. The client leaving (or pressing Stop) cancels the query and its engine requests.

Queries run Python (the query's expressions), so the endpoint only answers when the server
binds a loopback address or was started with ``--playground`` (`is_enabled`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import re
import time
from typing import Any

import orjson
from aiohttp import web

from ...client.inprocess import InProcessClient
from ...client.observed import DEFAULT_TOP_K, Event, ObservedClient, PromptEvent, TokenEvent, VariableEndEvent
from ...errors import InvalidRequestError, OverloadedError, QuerySyntaxError
from ...language.parser import parse_query
from ...runtime.api import resolve_decoder
from ...runtime.decoders import DecoderSpec, decode, make_decoder
from ..errors import classify, error_headers, error_message
from ..http import json_error, read_body
from ..sse import EventStream
from ..state import ServerState, get_state

#: queries running at once through this endpoint (each is one sequence at a time on the engine)
MAX_RUNNING_QUERIES = 4
MAX_QUERY_CHARS = 100_000
RUNNING = web.AppKey("playground_running", dict)


def is_enabled(host: str, explicit: bool) -> bool:
    """Whether queries may run: ``--playground`` given, or the server only reachable from this machine."""
    if explicit or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True)
class QueryRequest:
    """A validated body of ``POST /v1/queries``."""

    text: str
    decoder: DecoderSpec
    top_k: int

    @classmethod
    def from_body(cls, body: bytes) -> "QueryRequest":
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequestError(f"the body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidRequestError("the body must be a JSON object like {\"query\": \"...\"}")
        unknown = sorted(set(data) - {"query", "decoder", "top_k"})
        if unknown:
            raise InvalidRequestError(f"unknown field {unknown[0]!r}; the fields are query, decoder, top_k", unknown[0])
        text = data.get("query")
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequestError("query must be a non-empty string holding an LMQL query", "query")
        if len(text) > MAX_QUERY_CHARS:
            raise InvalidRequestError(f"query has {len(text)} characters, more than {MAX_QUERY_CHARS}", "query")
        top_k = data.get("top_k", DEFAULT_TOP_K)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= 20:
            raise InvalidRequestError(f"top_k must be an integer in [1, 20], got {top_k!r}", "top_k")
        spec = decoder_spec(text, data.get("decoder"))
        return cls(text, spec, top_k)


def decoder_spec(text: str, decoder: Any) -> DecoderSpec:
    """The decoder of the body (a string or ``{"name": ..., args}``), else the query's, else argmax."""
    if isinstance(decoder, dict):
        arguments = dict(decoder)
        name = arguments.pop("name", "argmax")
        if not isinstance(name, str):
            raise InvalidRequestError(f"decoder.name must be a string like 'sample', got {name!r}", "decoder")
        spec = make_decoder(name, **arguments)
    else:
        spec = resolve_decoder(parse_query(text), decoder, {})
    if spec.name == "beam" or spec.n != 1:
        raise InvalidRequestError(
            f"decoder must be argmax or sample with n=1, got {spec.name} with n={spec.n}: the playground shows one sequence",
            "decoder",
        )
    return spec


class EngineClient(InProcessClient):
    """The in-process client over an engine that is already running (the server's)."""

    def __init__(self, state: ServerState):  # noqa: super().__init__ would load the model again
        self.name = state.model_name
        self.loaded = state.loaded
        self.tokenizer = state.loaded.tokenizer
        self.engine = state.engine
        self.context_length = state.loaded.context_length


def event_json(event: Event) -> tuple[str, dict]:
    """The SSE type and data of an observer event."""
    if isinstance(event, PromptEvent):
        return "prompt", {"text": event.text, "token_ids": list(event.token_ids)}
    if isinstance(event, VariableEndEvent):
        return "variable_end", dataclasses.asdict(event)
    return "token", {**dataclasses.asdict(event), "logprob": finite(event.logprob),
                     "model_logprob": finite(event.model_logprob)}


def finite(value: float) -> float | None:
    return value if value > float("-inf") else None


def error_json(exc: BaseException, text: str) -> dict:
    """A readable error: message, type, HTTP-like status, and the line of query `text` it is about."""
    status, _, _ = classify(exc)
    line, column = error_position(exc, text)
    return {"message": error_message(exc), "type": type(exc).__name__, "status": status, "line": line, "column": column}


def error_position(exc: BaseException, text: str) -> tuple[int | None, int | None]:
    """(line, column), 1-based, of what `exc` is about in `text`: a syntax error's own position; for an
    undefined name in an expression, where the name first stands; for a where clause, its keyword."""
    if isinstance(exc, QuerySyntaxError):
        return exc.line, exc.column
    cause = exc.__cause__
    if isinstance(cause, NameError) and getattr(cause, "name", None):
        found = first_match(rf"\b{re.escape(cause.name)}\b", text)
        if found != (None, None):
            return found
    if "where clause" in str(exc):
        return first_match(r"\bwhere\b", text)
    return None, None


def first_match(pattern: str, text: str) -> tuple[int | None, int | None]:
    for number, line in enumerate(text.splitlines(), 1):
        match = re.search(pattern, line)
        if match:
            return number, match.start() + 1
    return None, None


def refusal(exc: BaseException) -> web.Response:
    """The JSON error answer of a refused query; a syntax error also names its line and column."""
    response = json_error(exc)
    if isinstance(exc, QuerySyntaxError) and exc.line is not None:
        body = orjson.loads(response.body)
        body["error"].update(line=exc.line, column=exc.column)
        response = web.json_response(body, status=response.status, headers=error_headers(exc))
    return response


async def create_query(request: web.Request) -> web.StreamResponse:
    """POST /v1/queries: validate, then stream the query's events until it ends or the client leaves."""
    state = get_state(request)
    running = request.app[RUNNING]
    try:
        query = QueryRequest.from_body(await read_body(request))
        if len(running) >= MAX_RUNNING_QUERIES:
            raise OverloadedError(f"{len(running)} playground queries are running, the most this server runs; retry later")
    except Exception as exc:
        return refusal(exc)
    stream = EventStream(request)
    await stream.open()
    events: asyncio.Queue = asyncio.Queue()
    client = ObservedClient(EngineClient(state), events.put_nowait, query.top_k)
    task = asyncio.ensure_future(run_query(query, client, events))
    running[id(task)] = task
    try:
        while True:
            item = await events.get()
            if item is None:
                break
            kind, data = item
            await stream.send(data, event=kind)
        await stream.send({}, event="done")
        await stream.response.write_eof()
    except (ConnectionResetError, asyncio.CancelledError):
        pass  # the client left: the finally cancels the query (and with it its engine requests)
    finally:
        running.pop(id(task), None)
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
    return stream.response


async def run_query(query: QueryRequest, client: ObservedClient, events: asyncio.Queue) -> None:
    """Run the query, putting (type, data) items on `events`, then None."""
    summary = Summary(time.perf_counter())

    def observe(event: Event) -> None:
        summary.add(event)
        events.put_nowait(event_json(event))

    client.observe = observe
    try:
        result = await decode(parse_query(query.text), client, query.decoder, {})
        client.finish(result.prompt)
        events.put_nowait(("result", summary.result_json(result)))
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        events.put_nowait(("error", error_json(exc, query.text)))
    finally:
        events.put_nowait(None)


@dataclasses.dataclass
class Summary:
    """What the result event reports besides the variables: log-probability and speed."""

    started: float
    num_tokens: int = 0
    logprob: float = 0.0

    def add(self, event: Event) -> None:
        if isinstance(event, TokenEvent):
            self.num_tokens += 1
            self.logprob += event.logprob

    def result_json(self, result) -> dict:
        seconds = time.perf_counter() - self.started
        variables = {k: v for k, v in result.variables.items() if not k.startswith(("P(", "log P("))}
        distributions = {k[2:-1]: [[o, p] for o, p in v] for k, v in result.variables.items() if k.startswith("P(")}
        return {
            "prompt": result.prompt, "variables": variables, "distributions": distributions,
            "logprob": finite(self.logprob), "num_tokens": self.num_tokens, "seconds": seconds,
            "tokens_per_second": self.num_tokens / seconds if seconds > 0 else None,
            "is_truncated": result.is_truncated,
        }
