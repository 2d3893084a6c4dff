"""LMTP, the protocol of LMQL 0.7.x's client: a WebSocket at ``/`` over the shared engine.

A thin protocol adapter (docs/lmtp.md is the reference). Each text frame ``COMMAND <json>``
is parsed and validated once into a typed command (`GenerateCommand`, `ScoreCommand`,
`ModelInfoCommand`); GENERATE and SCORE become one engine `Request` each, run as one task per
stream, and their outputs go back as ``TOKEN [items]`` frames (``MSG [items]`` for MODEL_INFO).
Every error, of a frame or of a stream, is an item ``{"stream_id", "error", "param", "code"}``
(codes from server/errors.py); the connection and the other streams keep running.

Beyond LMQL's own server: a GENERATE whose prompt extends an earlier one reuses the engine's
prefix KV cache; the streams of a connection are aborted at the engine when the client closes
it or stops reading (`Outbox`: more than `MAX_UNSENT_BYTES` of replies wait unsent); a full
engine answers each refused stream with an error item.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from typing import Any, Callable

import orjson
from aiohttp import WSMsgType, web

from .. import __version__
from ..engine import PromptOutput, Request, SamplingParams, TokenOutput, make_bias_processor
from ..errors import ContextLengthError, InvalidRequestError, LmqlBackendsError, ModelNotFoundError
from .errors import classify
from .validation import is_int, is_number, json_type

log = logging.getLogger("lmql_backends.server.lmtp")

LMTP_PATH = "/"
#: LMQL's server defaults
DEFAULT_MAX_TOKENS = 32
DEFAULT_TEMPERATURE = 0.0
DEFAULT_TOP_LOGPROBS = 1
MAX_TOP_LOGPROBS = 100
#: a connection whose client leaves more than this many bytes of replies unread loses its streams
MAX_UNSENT_BYTES = 4 * 2**20
#: replies are split into frames of at most this size
MAX_FRAME_BYTES = 2**18
#: decoding parameters LMQL's client may send, accepted at their neutral value only
NEUTRAL_PARAMETERS = {
    "top_k": (None, 0), "repetition_penalty": (None, 1, 1.0), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "length_penalty": (None, 1, 1.0),
}
GENERATE_FIELDS = frozenset({
    "model", "prompt", "stream_id", "max_tokens", "temperature", "top_p", "seed", "logit_bias", "top_logprobs",
    *NEUTRAL_PARAMETERS,
})
SCORE_FIELDS = frozenset({"model", "prompt", "scored", "stream_id", "max_tokens", "temperature", "top_logprobs",
                          "logit_bias"})


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What validation needs to know about the served model."""

    served_names: tuple[str, ...]
    vocab_size: int
    context_length: int
    eos_token_id: int | None


# ---- typed commands ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GenerateCommand:
    """A validated GENERATE: sample up to `max_tokens` after `prompt`."""

    stream_id: int
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    logit_bias: dict[int, float]

    def to_request(self, facts: ModelFacts) -> Request:
        processors = (make_bias_processor(self.logit_bias),) if self.logit_bias else ()
        stops = frozenset() if facts.eos_token_id is None else frozenset({facts.eos_token_id})
        return Request(self.prompt, self.max_tokens, self.sampling, processors, stops)


@dataclasses.dataclass(frozen=True)
class ScoreCommand:
    """A validated SCORE: the log-probability of each token of `scored` after `prompt`."""

    stream_id: int
    prompt: list[int]
    scored: list[int]

    def to_request(self, facts: ModelFacts) -> Request:
        return Request(self.prompt + self.scored, 0, score_from=len(self.prompt))


@dataclasses.dataclass(frozen=True)
class ModelInfoCommand:
    stream_id: Any


class FrameError(InvalidRequestError):
    """A frame or field is bad; `stream_id` is the stream it names (None when unknown), `error`
    the typed error it reports (itself, or the InvalidRequestError/ModelNotFoundError of a field)."""

    def __init__(self, message: str, param: str | None, stream_id: Any = None, error: Exception | None = None):
        super().__init__(message, param)
        self.stream_id = stream_id
        self.error = error or self


def parse_frame(text: str, facts: ModelFacts):
    """The typed command of one text frame; FrameError names the bad part."""
    command, _, payload = text.partition(" ")
    body = decode_payload(command, payload)
    stream_id = body.get("stream_id")
    try:
        if command == "GENERATE":
            return parse_generate(body, facts)
        if command == "SCORE":
            return parse_score(body, facts)
        if command == "MODEL_INFO":
            return ModelInfoCommand(stream_id)
    except (InvalidRequestError, ModelNotFoundError) as exc:
        raise FrameError(str(exc), exc.param, stream_id, exc) from None
    raise FrameError(
        f"unknown command {command[:40]!r}; LMTP commands are GENERATE, SCORE and MODEL_INFO", "command", stream_id
    )


def decode_payload(command: str, payload: str) -> dict:
    if not payload:
        raise FrameError(f"the frame {command[:40]!r} has no JSON payload; send 'COMMAND {{...}}'", "command")
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise FrameError(f"the payload of {command[:40]!r} is not valid JSON: {exc}", "payload") from None
    if not isinstance(body, dict):
        raise FrameError(f"the payload of {command[:40]!r} must be a JSON object, got {json_type(body)}", "payload")
    return body


def parse_generate(body: dict, facts: ModelFacts) -> GenerateCommand:
    check_fields(body, GENERATE_FIELDS, "GENERATE")
    check_model(body, facts)
    for name, neutral in NEUTRAL_PARAMETERS.items():
        if body.get(name) not in neutral:
            raise InvalidRequestError(f"'{name}' is not supported by this server; omit it or send {neutral[1]}", name)
    stream_id = read_stream_id(body)
    prompt = read_ids(body, "prompt", facts.vocab_size)
    max_tokens = fit_max_tokens(read_int(body, "max_tokens", DEFAULT_MAX_TOKENS, 1), len(prompt), facts)
    temperature = read_number(body, "temperature", DEFAULT_TEMPERATURE, 0.0)
    top_p = read_number(body, "top_p", 1.0, 0.0)
    if not 0 < top_p <= 1:
        raise InvalidRequestError(f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    seed = read_int(body, "seed", None, None)
    num_top = read_int(body, "top_logprobs", DEFAULT_TOP_LOGPROBS, 0)
    if num_top > MAX_TOP_LOGPROBS:
        raise InvalidRequestError(f"'top_logprobs' must be at most {MAX_TOP_LOGPROBS}, got {num_top}", "top_logprobs")
    sampling = SamplingParams(temperature, top_p, seed, num_top)
    return GenerateCommand(stream_id, prompt, max_tokens, sampling, read_logit_bias(body, facts.vocab_size))


def parse_score(body: dict, facts: ModelFacts) -> ScoreCommand:
    check_fields(body, SCORE_FIELDS, "SCORE")
    check_model(body, facts)
    stream_id = read_stream_id(body)
    prompt = read_ids(body, "prompt", facts.vocab_size)
    scored = read_ids(body, "scored", facts.vocab_size)
    if len(prompt) + len(scored) > facts.context_length:
        raise ContextLengthError(
            f"'prompt' ({len(prompt)} tokens) and 'scored' ({len(scored)} tokens) exceed the model's context "
            f"length of {facts.context_length} tokens", "scored"
        )
    return ScoreCommand(stream_id, prompt, scored)


def check_fields(body: dict, known: frozenset[str], command: str) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise InvalidRequestError(
            f"{command} does not take the field {unknown[0]!r}; its fields are {', '.join(sorted(known))}", unknown[0]
        )


def check_model(body: dict, facts: ModelFacts) -> None:
    model = body.get("model")
    if model is not None and model not in facts.served_names:
        served = ", ".join(map(repr, facts.served_names))
        raise ModelNotFoundError(
            f"the model {str(model)[:200]!r} is not served here; this server serves {served} "
            f"(name one of them in lmql.model(...))"
        )


def read_stream_id(body: dict) -> int:
    stream_id = body.get("stream_id")
    if not is_int(stream_id):
        raise InvalidRequestError(f"'stream_id' must be an integer, got {json_type(stream_id)}", "stream_id")
    return stream_id


def read_ids(body: dict, name: str, vocab_size: int) -> list[int]:
    ids = body.get(name)
    if not isinstance(ids, list) or not ids or not all(map(is_int, ids)):
        raise InvalidRequestError(f"'{name}' must be a non-empty array of token ids, got {describe(ids)}", name)
    if min(ids) < 0 or max(ids) >= vocab_size:
        bad = next(t for t in ids if not 0 <= t < vocab_size)
        raise InvalidRequestError(f"token id {bad} in '{name}' is outside the vocabulary [0, {vocab_size})", name)
    return ids


def fit_max_tokens(max_tokens: int, prompt_length: int, facts: ModelFacts) -> int:
    """`max_tokens`, cut to the room left in the context (the stream then ends with "length")."""
    room = facts.context_length - prompt_length
    if room < 1:
        raise ContextLengthError(
            f"'prompt' has {prompt_length} tokens, which leaves no room in the model's context length of "
            f"{facts.context_length} tokens; send a shorter prompt", "prompt"
        )
    return min(max_tokens, room)


def read_int(body: dict, name: str, default: int | None, low: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not is_int(value) or (low is not None and value < low):
        bound = "" if low is None else f" >= {low}"
        raise InvalidRequestError(f"'{name}' must be an integer{bound}, got {describe(value)}", name)
    return value


def read_number(body: dict, name: str, default: float, low: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not is_number(value) or not math.isfinite(value) or value < low:
        raise InvalidRequestError(f"'{name}' must be a number >= {low}, got {describe(value)}", name)
    return float(value)


def read_logit_bias(body: dict, vocab_size: int) -> dict[int, float]:
    """{token id: bias}, from LMQL's ``{"id": value}`` object (the mask it applies at every step)."""
    bias = body.get("logit_bias")
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise InvalidRequestError(f"'logit_bias' must be an object of token ids to numbers, got {json_type(bias)}",
                                  "logit_bias")
    if not all(map(str.isdigit, bias)) or (bias and max(map(int, bias)) >= vocab_size):
        bad = next(k for k in bias if not k.isdigit() or int(k) >= vocab_size)
        raise InvalidRequestError(
            f"'logit_bias' key {bad[:24]!r} is not a token id in the vocabulary [0, {vocab_size})", "logit_bias"
        )
    values = bias.values()
    if not set(map(type, values)) <= {int, float} or not all(map(math.isfinite, values)):
        raise InvalidRequestError("every 'logit_bias' value must be a finite number", "logit_bias")
    return dict(zip(map(int, bias), map(float, values)))


def describe(value: Any) -> str:
    return f"{json_type(value)} {str(value)[:40]}" if is_number(value) else json_type(value)


# ---- reply items ---------------------------------------------------------------------------


def token_item(stream_id: int, out: TokenOutput) -> dict:
    """A GENERATE token: the sampled token is always among top_logprobs (keys are id strings)."""
    top = {str(out.token_id): out.logprob}
    top.update((str(t), lp) for t, lp in out.top_logprobs if lp > -math.inf)
    return {"token": out.token_id, "stream_id": stream_id, "logprob": out.logprob,
            "finish_reason": out.finish_reason, "top_logprobs": top}


def score_items(command: ScoreCommand, out: PromptOutput) -> list[dict]:
    last = len(command.scored) - 1
    return [
        {"token": token, "stream_id": command.stream_id, "logprob": logprob, "finish_reason": "stop" if i == last else None}
        for i, (token, logprob) in enumerate(zip(command.scored, out.prompt_logprobs))
    ]


def error_item(stream_id: Any, exc: BaseException) -> dict:
    """The error of a stream or frame, as LMQL's client expects it (an item with "error")."""
    _, _, code = classify(exc)
    message = str(exc) or type(exc).__name__
    return {"stream_id": stream_id, "error": message, "param": getattr(exc, "param", None), "code": code}


def model_info(facts: ModelFacts) -> dict:
    return {
        "model": facts.served_names[0], "model_type": "lmql-backends", "lmql_backends": __version__,
        "constructor": f"lmql-backends serve-model {facts.served_names[0]}",
        "vocab_size": facts.vocab_size, "context_length": facts.context_length,
    }


# ---- one connection ------------------------------------------------------------------------


class Outbox:
    """Replies waiting to be sent: one frame per kind for everything that is pending.

    `on_overflow` runs once more than `max_unsent` bytes wait (the client stopped reading).
    """

    def __init__(self, ws: web.WebSocketResponse, max_unsent: int, on_overflow: Callable[[], None]):
        self.ws = ws
        self.max_unsent = max_unsent
        self.on_overflow = on_overflow
        self.num_unsent = 0
        self._pending: list[tuple[bytes, bytes]] = []
        self._wake = asyncio.Event()

    @property
    def is_overflowing(self) -> bool:
        return self.num_unsent > self.max_unsent

    def put(self, kind: bytes, item: dict) -> None:
        encoded = orjson.dumps(item)
        was_overflowing = self.is_overflowing
        self._pending.append((kind, encoded))
        self.num_unsent += len(encoded)
        self._wake.set()
        if self.is_overflowing and not was_overflowing:
            self.on_overflow()

    async def run(self) -> None:
        """Send until cancelled (or the connection fails)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            pending, self._pending = self._pending, []
            for kind, items in group_frames(pending):
                await self.ws.send_frame(kind + b" [" + b",".join(items) + b"]", WSMsgType.TEXT)
                self.num_unsent -= sum(map(len, items))


def group_frames(pending: list[tuple[bytes, bytes]]) -> list[tuple[bytes, list[bytes]]]:
    """Consecutive items of one kind share a frame of at most MAX_FRAME_BYTES (clients limit
    message sizes: aiohttp's default, which LMQL's client keeps, is 4 MiB)."""
    groups: list[tuple[bytes, list[bytes]]] = []
    size = 0
    for kind, item in pending:
        if groups and groups[-1][0] == kind and size + len(item) <= MAX_FRAME_BYTES:
            groups[-1][1].append(item)
            size += len(item) + 1
        else:
            groups.append((kind, [item]))
            size = len(item)
    return groups


class Connection:
    """The streams of one WebSocket: each a task reading its engine stream into the outbox."""

    def __init__(self, ws: web.WebSocketResponse, engine, facts: ModelFacts, max_unsent: int = MAX_UNSENT_BYTES):
        self.engine = engine
        self.facts = facts
        self.streams: dict[int, asyncio.Task] = {}
        self.outbox = Outbox(ws, max_unsent, self.cancel_unread)

    def handle(self, text: str) -> None:
        """Parse one frame and start what it asks; a bad frame becomes an error item."""
        try:
            command = parse_frame(text, self.facts)
            if isinstance(command, ModelInfoCommand):
                return self.outbox.put(b"MSG", {"stream_id": command.stream_id, "model_info": model_info(self.facts)})
            self.start(command)
        except FrameError as exc:
            self.outbox.put(b"TOKEN", error_item(exc.stream_id, exc.error))

    def start(self, command: GenerateCommand | ScoreCommand) -> None:
        if command.stream_id in self.streams:
            raise FrameError(f"stream_id {command.stream_id} is already running on this connection; "
                             f"use a new stream_id for each GENERATE and SCORE", "stream_id", command.stream_id)
        if self.outbox.is_overflowing:
            raise FrameError(unread_message(self.outbox.num_unsent, self.outbox.max_unsent), None, command.stream_id)
        task = asyncio.create_task(self.run_stream(command))
        self.streams[command.stream_id] = task
        task.add_done_callback(lambda _: self.streams.pop(command.stream_id, None))

    async def run_stream(self, command: GenerateCommand | ScoreCommand) -> None:
        put = self.outbox.put
        try:
            async with contextlib.aclosing(self.engine.stream(command.to_request(self.facts))) as outputs:
                async for out in outputs:
                    if isinstance(out, TokenOutput):
                        put(b"TOKEN", token_item(command.stream_id, out))
                    elif isinstance(command, ScoreCommand):
                        for item in score_items(command, out):
                            put(b"TOKEN", item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not isinstance(exc, LmqlBackendsError):
                log.error("LMTP stream %s failed unexpectedly", command.stream_id, exc_info=exc)
            put(b"TOKEN", error_item(command.stream_id, exc))

    def cancel_unread(self) -> None:
        """The client stopped reading: abort every stream (each gets an error item, sent if it reads again)."""
        for stream_id, task in list(self.streams.items()):
            task.cancel()
            error = InvalidRequestError(unread_message(self.outbox.num_unsent, self.outbox.max_unsent))
            self.outbox.put(b"TOKEN", error_item(stream_id, error))

    async def close(self) -> None:
        tasks = list(self.streams.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def unread_message(num_unsent: int, limit: int) -> str:
    return (f"the client has left {num_unsent} bytes of replies unread (limit {limit}); the server "
            f"cancelled the connection's streams; read replies as they come")


# ---- the endpoint --------------------------------------------------------------------------


def add_routes(app: web.Application, state, max_unsent: int = MAX_UNSENT_BYTES) -> None:
    """Serve LMTP at ``/`` for `state` (a ServerState: its engine, loaded model and names)."""
    facts = ModelFacts(state.served_names, state.loaded.vocab_size, state.loaded.context_length,
                       state.loaded.eos_token_id)
    max_msg_size = state.config.max_body_bytes

    async def lmtp_socket(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=max_msg_size)
        if not ws.can_prepare(request).ok:
            raise web.HTTPBadRequest(text="LMTP is served as a WebSocket at '/': connect with a WebSocket client "
                                          "(e.g. LMQL's lmql.model(MODEL, endpoint='HOST:PORT'))")
        await ws.prepare(request)
        await serve_connection(ws, state.engine, facts, max_unsent)
        return ws

    app.router.add_get(LMTP_PATH, lmtp_socket)


async def serve_connection(ws: web.WebSocketResponse, engine, facts: ModelFacts,
                           max_unsent: int = MAX_UNSENT_BYTES) -> None:
    """Read frames until the client closes; then abort every stream still running."""
    connection = Connection(ws, engine, facts, max_unsent)
    writer = asyncio.create_task(connection.outbox.run())
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                connection.handle(msg.data)
            elif msg.type == WSMsgType.BINARY:
                connection.outbox.put(b"TOKEN", error_item(None, InvalidRequestError(
                    "LMTP frames are text ('COMMAND {json}'), got a binary frame", "frame")))
    finally:
        await connection.close()
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
