"""The new API: OpenAI-compatible ``/v1/completions`` (JSON and SSE) and ``/v1/models``.

A thin protocol adapter over the engine: the JSON body becomes a validated
`CompletionRequest` (completions.py), each (prompt, choice) becomes one engine `Request`
(they run concurrently, so they batch), and the engine's typed outputs become OpenAI
``text_completion`` objects through `ChoiceBuilder` (text.py), which decodes incrementally
so that characters split across tokens are never corrupted. This module only has the
routes, the handlers and the response formats; chat.py answers /v1/chat/completions
through the same `answer_completion` with its own `CompletionFormat`. See docs/new-api.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from typing import Any, AsyncGenerator, AsyncIterator, Callable

from aiohttp import web

from ...errors import LmqlBackendsError
from ..errors import openai_error_body
from ..http import is_disconnected, json_error, read_body
from ..state import ServerState, get_state
from .completions import ChoicePlan, CompletionRequest, decode_json_body, make_choice_plans
from ..sse import EventStream
from .text import ChoiceBuilder, ChoiceDelta, TokenNamer

log = logging.getLogger("lmql_backends.server.openai")

STATUS_CLIENT_CLOSED = 499


def add_routes(app: web.Application) -> None:
    """Add the completions and models endpoints (with and without the /v1 prefix)."""
    for prefix in ("/v1", ""):
        app.router.add_post(f"{prefix}/completions", create_completion)
        app.router.add_get(f"{prefix}/models", list_models)


# ---- the handlers ------------------------------------------------------------------------


async def create_completion(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions: validate everything, start the choices, answer (JSON or SSE)."""
    return await answer_completion(request, CompletionRequest.from_json, COMPLETION_FORMAT)


async def answer_completion(request: web.Request, parse: Callable[[Any, ServerState], CompletionRequest],
                            response_format: "CompletionFormat") -> web.StreamResponse:
    """Parse the body into a CompletionRequest with `parse`, start its choices, answer in `response_format`."""
    state = get_state(request)
    try:
        completion = parse(decode_json_body(await read_body(request)), state)
        started = await start_choices(state.engine, make_choice_plans(completion, state))
    except Exception as exc:
        log_unexpected(exc)
        return json_error(exc)
    run = CompletionRun(completion, state, started, response_format.builder)
    try:
        answer = stream_completion if completion.stream else complete
        return await answer(request, completion, run, ResponseHeader.make(completion.model, response_format))
    finally:
        await run.cancel()


async def complete(request: web.Request, completion: CompletionRequest, run: CompletionRun,
                   header: ResponseHeader) -> web.Response:
    """The non-streaming answer: one completion object (abandoned if the client leaves)."""
    choices: list[ChoiceDelta | None] = [None] * completion.num_choices  # each choice's first delta, merged into
    try:
        async for delta in run.deltas():
            if is_disconnected(request):  # nobody will read the answer: create_completion aborts the choices
                return web.Response(status=STATUS_CLIENT_CLOSED)
            if choices[delta.index] is None:
                choices[delta.index] = delta
            else:
                choices[delta.index].merge(delta)
    except Exception as exc:
        log_unexpected(exc)
        return json_error(exc)
    body = header.with_choices([header.format.choice_json(c) for c in choices])
    return web.json_response({**body, "usage": run.usage.to_json()})


async def stream_completion(request: web.Request, completion: CompletionRequest, run: CompletionRun,
                            header: ResponseHeader) -> web.StreamResponse:
    """The streaming answer: SSE chunks, an optional usage chunk, then [DONE]."""
    events = EventStream(request)
    try:
        await events.open()
        await send_chunks(events, completion, run, header)
    except ConnectionResetError:  # the client went away: create_completion aborts the choices
        return events.response
    except Exception as exc:  # after the headers: the error becomes the last event
        log_unexpected(exc)
        with contextlib.suppress(ConnectionResetError):
            await events.send(openai_error_body(exc))
    await events.close()
    return events.response


async def send_chunks(events: EventStream, completion: CompletionRequest, run: CompletionRun,
                      header: ResponseHeader) -> None:
    """The format's opening chunks, one chunk per non-empty delta, then the usage chunk if asked for."""
    for choice in header.format.opening_chunk_choices(completion.num_choices):
        await events.send(make_chunk(header, [choice], completion))
    async for delta in run.deltas():
        if not delta.is_empty:
            await events.send(make_chunk(header, [header.format.chunk_choice_json(delta)], completion))
    if completion.include_usage:
        await events.send({**make_chunk(header, [], completion), "usage": run.usage.to_json()})


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models: every served name, with the extension fields max_model_len and vocab_size."""
    state = get_state(request)
    data = [make_model_object(name, state) for name in state.served_names]
    return web.json_response({"object": "list", "data": data})


def log_unexpected(exc: Exception) -> None:
    """Log errors that are not the user's or the engine's expected ones (bugs), with a traceback."""
    if not isinstance(exc, LmqlBackendsError):
        log.error("completion failed unexpectedly", exc_info=exc)


# ---- running the choices -----------------------------------------------------------------


@dataclasses.dataclass
class StartedChoice:
    """An engine request that was accepted, with its first output already received."""

    plan: ChoicePlan
    outputs: AsyncGenerator
    first: Any


async def start_choices(engine, plans: list[ChoicePlan]) -> list[StartedChoice]:
    """Submit every request and wait for each first output, so errors come before any byte."""
    streams = [engine.stream(plan.request) for plan in plans]
    firsts = await asyncio.gather(*(anext(s) for s in streams), return_exceptions=True)
    failures = [f for f in firsts if isinstance(f, BaseException)]
    if failures:
        await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
        raise failures[0]
    return [StartedChoice(plan, s, first) for plan, s, first in zip(plans, streams, firsts)]


async def choice_deltas(started: StartedChoice, builder: ChoiceBuilder) -> AsyncIterator[ChoiceDelta]:
    """The delta of every output of one choice, up to the one with a finish_reason."""
    async with contextlib.aclosing(started.outputs) as outputs:
        delta = builder.on_output(started.first)
        yield delta
        if delta.finish_reason is None:
            async for out in outputs:
                delta = builder.on_output(out)
                yield delta
                if delta.finish_reason is not None:
                    return


async def run_choice(choice: AsyncGenerator, sink: asyncio.Queue) -> None:
    """Put the deltas of one choice on `sink`; the last item is None or an exception."""
    try:
        async for delta in choice:
            sink.put_nowait(delta)
        sink.put_nowait(None)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        sink.put_nowait(exc)


class CompletionRun:
    """All the choices of one completion, running concurrently; yields their deltas and counts usage.

    One choice (the usual case) is read directly; several run as tasks feeding one queue.
    """

    def __init__(self, completion: CompletionRequest, state: ServerState, started: list[StartedChoice],
                 builder: type[ChoiceBuilder] = ChoiceBuilder):
        tokenizer = state.loaded.tokenizer
        namer = TokenNamer(tokenizer, completion.return_tokens_as_token_ids)
        self.usage = Usage(completion.num_prompt_tokens)
        self.choices = [choice_deltas(s, builder(s.plan, completion, tokenizer, namer)) for s in started]
        self.queue: asyncio.Queue = asyncio.Queue()
        many = len(self.choices) > 1
        self.tasks = [asyncio.create_task(run_choice(c, self.queue)) for c in self.choices] if many else []

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        """Every delta as it comes; raises the first error of any choice."""
        async for delta in (self._merged() if self.tasks else self.choices[0]):
            self.usage.completion_tokens += delta.num_tokens
            yield delta

    async def _merged(self) -> AsyncIterator[ChoiceDelta]:
        remaining = len(self.tasks)
        while remaining:
            item = await self.queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item

    async def cancel(self) -> None:
        """Stop every choice still running (their engine requests are aborted)."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for choice in self.choices:
            await choice.aclose()


# ---- response formats --------------------------------------------------------------------


@dataclasses.dataclass
class Usage:
    """Token counts of one completion."""

    prompt_tokens: int
    completion_tokens: int = 0

    def to_json(self) -> dict:
        total = self.prompt_tokens + self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": total}


class CompletionFormat:
    """How an endpoint's answers look; this one is /v1/completions' ``text_completion``.

    chat.py subclasses it for ``chat.completion`` objects; the handling of requests,
    streams, errors and cancellation is the same for every format.
    """

    id_prefix = "cmpl-"
    object = "text_completion"
    chunk_object = "text_completion"
    builder: type[ChoiceBuilder] = ChoiceBuilder

    def choice_json(self, choice: ChoiceDelta) -> dict:
        """A whole choice of the non-streaming answer."""
        return choice.to_json()

    def chunk_choice_json(self, delta: ChoiceDelta) -> dict:
        """One delta of a choice in a streamed chunk."""
        return delta.to_json()

    def opening_chunk_choices(self, num_choices: int) -> list[dict]:
        """Choices sent before any delta, one chunk each (none here)."""
        return []


COMPLETION_FORMAT = CompletionFormat()


@dataclasses.dataclass(frozen=True)
class ResponseHeader:
    """The fields every completion object and chunk of one response shares."""

    id: str
    created: int
    model: str
    format: CompletionFormat = COMPLETION_FORMAT

    @classmethod
    def make(cls, model: str, response_format: CompletionFormat = COMPLETION_FORMAT) -> "ResponseHeader":
        """A new response id, created now."""
        return cls(f"{response_format.id_prefix}{uuid.uuid4().hex}", int(time.time()), model, response_format)

    def to_json(self, is_chunk: bool = False) -> dict:
        kind = self.format.chunk_object if is_chunk else self.format.object
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def with_choices(self, choices: list[dict], is_chunk: bool = False) -> dict:
        return {**self.to_json(is_chunk), "choices": choices}


def make_chunk(header: ResponseHeader, choices: list[dict], completion: CompletionRequest) -> dict:
    """One SSE chunk; with include_usage every chunk has "usage": null but the last."""
    chunk = header.with_choices(choices, is_chunk=True)
    if completion.include_usage:
        chunk["usage"] = None
    return chunk


def make_model_object(name: str, state: ServerState) -> dict:
    loaded = state.loaded
    return {
        "id": name, "object": "model", "created": 0, "owned_by": "lmql-backends",
        "max_model_len": loaded.context_length, "vocab_size": loaded.vocab_size,
    }
