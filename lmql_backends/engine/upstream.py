"""An engine whose model runs on an OpenAI-compatible upstream server: `UpstreamEngine`.

`serve-model MODEL --upstream URL` makes this server the protocol front of another server that
speaks ``/v1/completions`` with vLLM's extensions (vLLM itself, or another ``serve-model``).
`UpstreamEngine` is used exactly like `Engine` and `EngineProcess` (submit/abort/stream,
validate, stats, num_pending, is_alive, stop), so every protocol module serves over it unchanged.

Each engine `Request` becomes one streaming ``/v1/completions`` call on a background event loop:
the prompt as token ids, the mask and bias processors as ``allowed_token_ids`` / ``logit_bias``,
``logprobs`` for the chosen token and its alternatives, and ``return_tokens_as_token_ids`` so that
tokens come back as ids (nothing is re-tokenized). An abort closes the upstream connection,
which is how vLLM and serve-model hear that a client went away. The upstream's HTTP errors map to
ours (`upstream_error`): its 4xx stay 4xx, overload stays 429, and a failure of the upstream
itself is `UpstreamError` (502) or `UpstreamUnavailableError` (503), naming its address.

The raw next-token distribution (``Request.return_logits``, which the legacy API needs) is the
upstream's log-probabilities of all ``vocab_size`` tokens (``logprobs=vocab_size``): a shift of
the logits by a constant per row, so every softmax of them is the same. Only an upstream that
returns that many log-probabilities can give it (vLLM with ``--max-logprobs -1``, serve-model with
``--max-logprobs -1``); on any other, such requests are refused with an error that says why.

The tokenizer is loaded locally from the model name (the shared loader); the weights never are.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import re
import threading
from typing import Any, AsyncIterator, Callable

import aiohttp
import orjson
import torch

from ..errors import (
    ConstraintError, ContextLengthError, InvalidRequestError, LmqlBackendsError, OverloadedError,
    RequestCancelledError, RequestTooLargeError, UpstreamError, UpstreamUnavailableError,
)
from ..loader import LoadedModel, LoadOptions, context_length, load_config, load_tokenizer
from .consumers import Consumers
from .delivery import Mailboxes
from .engine import EngineConfig, EngineStats, TokenRate
from ..sampling import MaskProcessor, pad_mask
from .sampling import BiasProcessor
from .sequence import ErrorOutput, Output, PromptOutput, Request, TokenOutput
from .streams import OutputStreams

log = logging.getLogger("lmql_backends.engine.upstream")

API_KEY_ENV = "LMQL_BACKENDS_UPSTREAM_API_KEY"
TOKEN_ID_NAME = re.compile(r"token_id:(\d+)")
#: |logprob| below which the probe's only allowed token counts as masked (processed) logprobs
PROCESSED_LOGPROB_TOLERANCE = 1e-3
STOP_SECONDS = 30


@dataclasses.dataclass(frozen=True)
class UpstreamConfig:
    """Where the upstream is and how to talk to it (serve-model --upstream, --upstream-model, --upstream-api-key)."""

    url: str
    #: the upstream's name of the model; None: MODEL if the upstream serves it, else its only model
    model: str | None = None
    api_key: str | None = None
    connect_timeout: float = 10.0
    #: the longest wait for the upstream's next byte (a long prompt's prefill included)
    read_timeout: float = 600.0

    def __post_init__(self):
        if not isinstance(self.url, str) or not self.url.strip():
            raise InvalidRequestError(f"the upstream URL must be like http://host:8000, got {self.url!r}", "upstream")

    @property
    def base_url(self) -> str:
        """``http://host:port`` (a missing scheme is http, a trailing ``/v1`` is dropped)."""
        url = self.url.strip().rstrip("/")
        url = url if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", url) else f"http://{url}"
        return url[:-len("/v1")] if url.endswith("/v1") else url


@dataclasses.dataclass(frozen=True)
class UpstreamInfo:
    """What the upstream told us at startup (its /v1/models entry and the capability probes)."""

    model: str
    owned_by: str
    context_length: int | None
    vocab_size: int | None
    #: why the upstream cannot give the full next-token distribution (None: it can)
    no_full_distribution: str | None = None


class UpstreamEngine(OutputStreams):
    """Serves engine requests by streaming them from an upstream /v1/completions (started here)."""

    def __init__(self, model: str, upstream: UpstreamConfig, options: LoadOptions = LoadOptions(),
                 config: EngineConfig = EngineConfig(), needs_full_distribution: bool = False):
        """Connect to `upstream`, check what it can do and load `model`'s tokenizer locally.

        UpstreamUnavailableError when it cannot be reached, UpstreamError when it does not speak the
        extensions the runtime needs; with `needs_full_distribution` (the legacy API) also when it
        cannot return every token's log-probability."""
        self.config = config
        self.upstream = upstream
        self._mailboxes = Mailboxes()
        self._tasks: dict[str, asyncio.Task] = {}
        self._consumers = Consumers()
        self._is_stopped = False
        self._counters = collections.Counter()
        self._rate = TokenRate()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lmql-backends-upstream", daemon=True)
        self._thread.start()
        self._session: aiohttp.ClientSession | None = None
        try:
            self.info, self.loaded = self._call(self._connect(model, options, needs_full_distribution))
        except BaseException:
            self.stop()
            raise

    # ---- lifecycle -------------------------------------------------------------------
    @property
    def description(self) -> str:
        """The one-line summary printed when the server is ready."""
        info = self.info
        full = "yes" if info.no_full_distribution is None else "no"
        return (
            f"upstream {self.upstream.base_url}: model {info.model} (owned by {info.owned_by}), "
            f"context {self.loaded.context_length}, vocab {self.loaded.vocab_size}, "
            f"full next-token distribution: {full}; tokenizer of {self.loaded.name} loaded here"
        )

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Always ready: the upstream was reached when this engine was made."""
        return True

    def stop(self) -> None:
        """Cancel every request in flight (each gets RequestCancelledError) and close the connections."""
        self._is_stopped = True
        self._consumers.fail_all(RequestCancelledError("the engine stopped"))
        if self._loop.is_closed():
            return
        if self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(STOP_SECONDS)
            except Exception:  # closing is best effort: the process may be exiting
                log.exception("could not close the upstream connections")
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(STOP_SECONDS)
        self._loop.close()

    async def _close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def _call(self, coroutine):
        """Run `coroutine` on the engine's loop and wait for its result (startup only)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    # ---- requests --------------------------------------------------------------------
    def submit(self, request: Request, emit: Callable[[Output], None]) -> None:
        """Start `request`'s upstream call (the boundary checked its ids and length; what only an
        upstream cannot do is refused here); outputs go to `emit` (the engine's loop thread)."""
        self.check_upstream_can_run(request)
        if self._is_stopped:
            raise RequestCancelledError("the engine is shutting down")
        with self._consumers.lock:
            self._consumers.add_locked(request.request_id, emit, self.config)
        self._loop.call_soon_threadsafe(self._start, request)

    def abort(self, request_id: str) -> None:
        """Cancel a request (its consumer went away): its upstream connection is closed, nothing
        more reaches its `emit`."""
        if self._consumers.forget(request_id) and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._cancel, request_id)

    @property
    def is_alive(self) -> bool:
        """Whether the engine takes requests (False once stopped; an unreachable upstream fails each request)."""
        return not self._is_stopped

    @property
    def num_pending(self) -> int:
        """Requests submitted and not yet finished, speculative ones not counted."""
        return self._consumers.num_pending

    def check_upstream_can_run(self, request: Request) -> None:
        """InvalidRequestError (naming the field) unless the upstream can run `request`."""
        upstream_masks(request.processors, self.loaded.vocab_size)
        if request.return_logits:
            self._check_full_distribution(request)

    def _check_full_distribution(self, request: Request) -> None:
        if self.info.no_full_distribution is not None:
            raise InvalidRequestError(
                f"this request needs the full next-token distribution, which the upstream "
                f"{self.upstream.base_url} does not give: {self.info.no_full_distribution}", "upstream"
            )
        if request.max_tokens != 0 or request.processors:
            raise InvalidRequestError(
                "over an upstream, a request for the raw next-token logits can neither generate nor carry a mask "
                "or bias (the upstream would report the processed distribution); send max_tokens=0 and no processors",
                "max_tokens",
            )

    def stats(self) -> EngineStats:
        """What this front has done (the upstream's own statistics are at its /metrics)."""
        return EngineStats(
            tokens_per_second=self._rate.per_second(),
            num_generated_tokens=self._counters["generated"], num_prompt_tokens=self._counters["prompt_tokens"],
            num_cached_prompt_tokens=0, num_steps=0, last_batch_size=0, num_running=len(self._consumers),
            num_waiting=0, cache_hit_rate=0.0, cache_tokens=0, num_failed_requests=self._counters["failed"],
            num_threads=0, is_native_forward=False, num_onednn_linears=0,
        )

    def _count_generated(self) -> None:
        self._counters["generated"] += 1
        self._rate.add(1)

    # ---- the engine's loop -----------------------------------------------------------
    def _start(self, request: Request) -> None:
        if request.request_id in self._consumers:  # not aborted meanwhile
            self._tasks[request.request_id] = self._loop.create_task(self._run(request))

    def _cancel(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is not None:
            task.cancel()

    def _emit(self, request: Request, output: Output) -> None:
        """Hand `output` to the request's consumer (if it is still there); the last one frees its slot."""
        self._consumers.deliver(request.request_id, output, self.abort)

    async def _run(self, request: Request) -> None:
        try:
            await self._stream(request)
        except asyncio.CancelledError:
            pass  # aborted: leaving the response's context closed the upstream connection
        except Exception as exc:
            error = exc if isinstance(exc, LmqlBackendsError) else self._connection_error(exc)
            log.info("upstream request %s failed: %s", request.request_id, error)
            self._counters["failed"] += 1
            self._emit(request, ErrorOutput(error))
        finally:
            self._tasks.pop(request.request_id, None)

    async def _stream(self, request: Request) -> None:
        reader = ResponseReader(request, self.loaded.vocab_size, lambda out: self._on_output(request, out))
        async with self._post("/v1/completions", completion_body(request, self.info, self.loaded)) as response:
            if response.status != 200:
                raise upstream_error(response.status, await read_json(response), response.headers, self._where)
            async for event in sse_events(response.content.iter_any()):
                if "error" in event:  # after the first bytes (a 200): the upstream failed while running it
                    raise upstream_error(stream_error_status(event), event, {}, self._where)
                if reader.on_chunk(event):
                    return  # finished: the rest of the stream (usage, [DONE]) is not needed
        raise UpstreamError(f"the upstream {self._where} ended the stream before the request finished")

    def _on_output(self, request: Request, output: Output) -> None:
        if isinstance(output, PromptOutput):
            self._counters["prompt_tokens"] += output.num_prompt_tokens
        elif isinstance(output, TokenOutput):
            self._count_generated()
        self._emit(request, output)

    # ---- talking to the upstream -----------------------------------------------------
    @property
    def _where(self) -> str:
        return self.upstream.base_url

    def _post(self, path: str, body: dict):
        headers = {"Content-Type": "application/json", **self._auth_headers()}
        return self._session.post(self._where + path, data=orjson.dumps(body), headers=headers)

    def _auth_headers(self) -> dict[str, str]:
        key = self.upstream.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _connection_error(self, exc: Exception) -> Exception:
        """Our error for an aiohttp failure: unreachable (503) or a broken answer (502)."""
        if isinstance(exc, aiohttp.ClientConnectorError):
            return UpstreamUnavailableError(
                f"cannot reach the upstream at {self._where} ({exc.os_error.strerror or exc}); "
                f"start it, or point serve-model --upstream at a running server"
            )
        if isinstance(exc, asyncio.TimeoutError):
            return UpstreamError(
                f"the upstream at {self._where} sent nothing for {self.upstream.read_timeout:g} s; check that it runs"
            )
        return UpstreamError(f"the upstream at {self._where} failed: {type(exc).__name__}: {exc}")

    async def _connect(self, model: str, options: LoadOptions, needs_full_distribution: bool):
        timeout = aiohttp.ClientTimeout(sock_connect=self.upstream.connect_timeout, sock_read=self.upstream.read_timeout)
        connector = aiohttp.TCPConnector(limit=self.config.max_num_seqs + self.config.max_queue)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector)
        try:
            entry = await self._model_entry(model)
            loaded = make_loaded_model(model, entry, options)
            info = UpstreamInfo(
                entry["id"], str(entry.get("owned_by", "unknown")), loaded.context_length, entry.get("vocab_size")
            )
            await self._probe_masked_logprobs(info)
            info = dataclasses.replace(info, no_full_distribution=await self._probe_full_distribution(info, loaded))
        except LmqlBackendsError:
            raise
        except Exception as exc:
            raise self._connection_error(exc) from exc
        if needs_full_distribution and info.no_full_distribution is not None:
            raise UpstreamError(
                f"the legacy API needs the full next-token distribution, which the upstream {self._where} "
                f"does not give: {info.no_full_distribution}"
            )
        return info, loaded

    async def _model_entry(self, model: str) -> dict:
        """The upstream's /v1/models entry of the model to use (see UpstreamConfig.model)."""
        async with self._session.get(self._where + "/v1/models", headers=self._auth_headers()) as response:
            body = await read_json(response)
            if response.status != 200:
                raise upstream_error(response.status, body, response.headers, self._where, is_startup=True)
        entries = [e for e in (body.get("data") or []) if isinstance(e, dict) and isinstance(e.get("id"), str)]
        return choose_model(entries, self.upstream.model, model, self._where)

    async def _probe(self, body: dict) -> tuple[int, dict]:
        async with self._post("/v1/completions", body) as response:
            return response.status, await read_json(response)

    async def _probe_masked_logprobs(self, info: UpstreamInfo) -> None:
        """UpstreamError unless the upstream takes token-id prompts, allowed_token_ids and token-id
        names, and reports log-probabilities after the mask (what the runtime scores with)."""
        allowed = 1
        body = {"model": info.model, "prompt": [0], "max_tokens": 1, "temperature": 0, "logprobs": 0,
                "allowed_token_ids": [allowed], "return_tokens_as_token_ids": True}
        status, answer = await self._probe(body)
        if status != 200:
            raise UpstreamError(
                f"the upstream {self._where} refused a token-id completion with allowed_token_ids and "
                f"return_tokens_as_token_ids ({error_message(answer)}); it must speak vLLM's extensions "
                f"(vLLM, or lmql-backends serve-model)"
            )
        try:
            logprobs = answer["choices"][0]["logprobs"]
            token, logprob = token_id_of(logprobs["tokens"][0], self._where), logprobs["token_logprobs"][0]
        except (KeyError, IndexError, TypeError):
            raise UpstreamError(f"the upstream {self._where} answered a completion without logprobs: {answer!r:.200}")
        if token != allowed:
            raise UpstreamError(f"the upstream {self._where} ignores allowed_token_ids (it chose token {token})")
        if abs(logprob) > PROCESSED_LOGPROB_TOLERANCE:
            raise UpstreamError(
                f"the upstream {self._where} reports log-probabilities before the mask (a token that was the "
                f"only one allowed got logprob {logprob:.3f}, not 0); vLLM does so by default: restart it "
                f"with --logprobs-mode processed_logprobs"
            )

    async def _probe_full_distribution(self, info: UpstreamInfo, loaded: LoadedModel) -> str | None:
        """Why the upstream cannot return every token's log-probability (None: it can)."""
        vocab_size = loaded.vocab_size
        body = {"model": info.model, "prompt": [0], "max_tokens": 1, "temperature": 0, "logprobs": vocab_size,
                "return_tokens_as_token_ids": True}
        status, answer = await self._probe(body)
        if status != 200:
            return (
                f"it refused logprobs={vocab_size} ({error_message(answer)}); start vLLM with --max-logprobs -1, "
                f"or serve-model with --max-logprobs -1"
            )
        try:
            num_entries = len(answer["choices"][0]["logprobs"]["top_logprobs"][0])
        except (KeyError, IndexError, TypeError):
            return "its answer to logprobs=vocab size has no top_logprobs"
        if num_entries < vocab_size:
            return f"asked for {vocab_size} log-probabilities, it returned {num_entries}"
        return None


# ---- the upstream request ------------------------------------------------------------------


def completion_body(request: Request, info: UpstreamInfo, loaded: LoadedModel) -> dict[str, Any]:
    """The streaming /v1/completions body of one engine request.

    A request that only looks at the prompt (max_tokens 0) asks for one token, which is never
    reported; the next-token logits are the log-probabilities of all tokens at that token."""
    sampling = request.sampling
    body: dict[str, Any] = {
        "model": info.model, "prompt": list(request.prompt_ids), "max_tokens": max(1, request.max_tokens),
        "temperature": sampling.temperature, "top_p": sampling.top_p, "stream": True,
        "logprobs": loaded.vocab_size if request.return_logits else sampling.num_top_logprobs,
        "return_tokens_as_token_ids": True,
        "ignore_eos": loaded.eos_token_id not in request.stop_token_ids,
    }
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if request.score_from is not None:
        body["echo"] = True
    other_stops = sorted(request.stop_token_ids - {loaded.eos_token_id})
    if other_stops:
        body["stop_token_ids"] = other_stops  # vLLM stops there; ResponseReader stops there on any upstream
    return {**body, **upstream_masks(request.processors, loaded.vocab_size)}


def upstream_masks(processors, vocab_size: int) -> dict[str, Any]:
    """The processors as ``allowed_token_ids`` (masks intersected) and ``logit_bias`` (biases added).

    InvalidRequestError for any other processor (the upstream cannot run our code), ConstraintError
    when the masks allow no token."""
    allowed, bias = None, {}
    for processor in processors:
        if isinstance(processor, MaskProcessor):
            mask = pad_mask(processor.allowed, vocab_size)
            allowed = mask if allowed is None else allowed & mask
        elif isinstance(processor, BiasProcessor):
            for token_id, value in zip(processor.token_ids.tolist(), processor.values.tolist()):
                bias[token_id] = bias.get(token_id, 0.0) + value
        else:
            raise InvalidRequestError(
                f"this server forwards generation to an upstream, which applies token masks and logit biases "
                f"only; the logits processor {type(processor).__name__} cannot run there", "processors"
            )
    fields: dict[str, Any] = {}
    if allowed is not None:
        if not bool(allowed.any()):
            raise ConstraintError("no token is allowed at this step (every logit is masked)")
        if not bool(allowed.all()):
            fields["allowed_token_ids"] = torch.nonzero(allowed).flatten().tolist()
            bias = {t: v for t, v in bias.items() if allowed[t]}
    if bias:
        fields["logit_bias"] = {str(t): v for t, v in bias.items()}
    return fields


class ResponseReader:
    """Turns the upstream's stream of one request into engine outputs, in order.

    The stream's ``logprobs`` entries are, with echo, first the prompt's tokens (the first one
    without a logprob), then the generated ones; a chunk may hold several tokens."""

    def __init__(self, request: Request, vocab_size: int, emit: Callable[[Output], None]):
        self.request = request
        self.vocab_size = vocab_size
        self.emit = emit
        self.num_prompt_entries = len(request.prompt_ids) if request.score_from is not None else 0
        self.prompt_entries: list[tuple[int, float | None, tuple]] = []
        self.is_prompt_sent = False
        self.num_generated = 0

    def on_chunk(self, chunk: dict) -> bool:
        """Emit the outputs of one chunk; whether the request is finished."""
        try:
            choice = chunk["choices"][0]
        except (KeyError, IndexError, TypeError):
            return False  # a usage-only chunk
        entries = list(logprob_entries(choice.get("logprobs")))
        for i, entry in enumerate(entries):
            is_last = i == len(entries) - 1
            if self.on_entry(entry, choice.get("finish_reason") if is_last else None):
                return True
        if not entries and choice.get("finish_reason") is not None and self.is_prompt_sent:
            raise UpstreamError(f"the upstream finished ({choice['finish_reason']}) without a token's logprobs")
        return False

    def on_entry(self, entry: tuple[int, float | None, tuple], upstream_finish: str | None) -> bool:
        if len(self.prompt_entries) < self.num_prompt_entries:
            self.prompt_entries.append(entry)
            if len(self.prompt_entries) < self.num_prompt_entries:
                return False
            if not self.request.return_logits:
                return self.send_prompt(None)
            return False
        if not self.is_prompt_sent:
            if self.send_prompt(entry):
                return True
        return self.send_token(entry, upstream_finish)

    def send_prompt(self, first_token: tuple[int, float | None, tuple] | None) -> bool:
        """The PromptOutput; whether it finishes the request (max_tokens 0)."""
        request = self.request
        out = PromptOutput(len(request.prompt_ids), 0)
        if request.return_logits:
            out.logits = distribution_of(first_token[2], self.vocab_size)
        if request.score_from is not None:
            scored = self.prompt_entries[request.score_from:]
            out.prompt_logprobs = [logprob for _, logprob, _ in scored]
            out.prompt_top_logprobs = [top for _, _, top in scored]
        if request.max_tokens == 0:
            out.finish_reason = "length"
        self.is_prompt_sent = True
        self.emit(out)
        return out.finish_reason is not None

    def send_token(self, entry: tuple[int, float | None, tuple], upstream_finish: str | None) -> bool:
        token_id, logprob, top = entry
        request = self.request
        self.num_generated += 1
        reason = upstream_finish
        if token_id in request.stop_token_ids:
            reason = "stop"
        elif self.num_generated >= request.max_tokens:
            reason = reason or "length"
        k = request.sampling.num_top_logprobs
        self.emit(TokenOutput(token_id, float(logprob), top[:k], reason))
        return reason is not None


def logprob_entries(logprobs: dict | None):
    """(token id, logprob or None, top alternatives most likely first) of every token of a chunk."""
    if not logprobs:
        return
    tokens = logprobs.get("tokens") or []
    token_logprobs = logprobs.get("token_logprobs") or [None] * len(tokens)
    tops = logprobs.get("top_logprobs") or [None] * len(tokens)
    for name, logprob, top in zip(tokens, token_logprobs, tops):
        yield token_id_of(name, "the upstream"), logprob, top_entries(top)


def top_entries(top: dict | None) -> tuple[tuple[int, float], ...]:
    """A top_logprobs dict as (token id, logprob), most likely first (equal ones in the upstream's order)."""
    if not top:
        return ()
    entries = [(token_id_of(name, "the upstream"), float(value)) for name, value in top.items()]
    return tuple(sorted(entries, key=lambda entry: -entry[1]))


def token_id_of(name: str, where: str) -> int:
    """The id in a ``token_id:N`` token name (return_tokens_as_token_ids)."""
    match = TOKEN_ID_NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise UpstreamError(
            f"{where} named a token {name!r:.40} instead of 'token_id:N'; it must support "
            f"return_tokens_as_token_ids (vLLM and serve-model do)"
        )
    return int(match.group(1))


def distribution_of(top: tuple[tuple[int, float], ...], vocab_size: int) -> torch.Tensor:
    """Every token's log-probability as a [vocab_size] tensor (tokens the upstream left out: -inf)."""
    logprobs = torch.full((vocab_size,), float("-inf"), dtype=torch.float32)
    if top:
        ids, values = zip(*top)
        logprobs[list(ids)] = torch.tensor(values, dtype=torch.float32)
    return logprobs


# ---- reading answers -----------------------------------------------------------------------


async def sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[dict]:
    """The JSON data of each server-sent event in a body read in `chunks`, up to ``[DONE]``
    (events of any size, split anywhere)."""
    buffer = b""
    async for data in chunks:
        buffer += data
        *events, buffer = re.split(rb"\r?\n\r?\n", buffer)
        for event in events:
            payload = b"".join(line[5:].strip() for line in event.splitlines() if line.startswith(b"data:"))
            if payload == b"[DONE]":
                return
            if payload:
                yield orjson.loads(payload)


async def read_json(response: aiohttp.ClientResponse) -> dict:
    """The JSON object of an answer ({"message": text} when it is not one)."""
    raw = await response.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {"message": raw.decode("utf-8", "replace")[:500]}
    return body if isinstance(body, dict) else {"message": repr(body)[:500]}


def error_detail(body: dict) -> dict:
    """The error object of an OpenAI-style ({"error": {...}}) or older vLLM-style error body."""
    detail = body.get("error")
    return detail if isinstance(detail, dict) else body


def error_message(body: dict) -> str:
    detail = error_detail(body)
    return str(detail.get("message") or detail.get("detail") or body)[:500]


def upstream_error(status: int, body: dict, headers, where: str, is_startup: bool = False) -> Exception:
    """Our error for an upstream's error answer: its 4xx stay the client's errors, its overload
    stays 429, its own failures are 502/503 naming it."""
    detail = error_detail(body)
    message = f"the upstream {where} answered {status}: {error_message(body)}"
    code = detail.get("code")
    if status in (401, 403):
        return UpstreamError(
            f"{message}; give serve-model the upstream's key with --upstream-api-key (or {API_KEY_ENV})"
        )
    if status == 404:
        what = "models" if is_startup else "completions"
        return UpstreamError(f"{message}; is {where} an OpenAI-compatible server (GET /v1/{what})?")
    if status == 429:
        return OverloadedError(message, parse_retry_after(headers.get("Retry-After")))
    if status == 413:
        return RequestTooLargeError(f"{message}; send a smaller request or raise the upstream's body limit")
    if code == "context_length_exceeded":
        return ContextLengthError(message, detail.get("param"))
    if code == "unsatisfiable_constraints":
        return ConstraintError(message)
    if 400 <= status < 500:
        return InvalidRequestError(message, detail.get("param"))
    if status == 503:
        return UpstreamUnavailableError(f"{message}; the upstream is stopping or not ready")
    return UpstreamError(message)


def stream_error_status(event: dict) -> int:
    """The status an error event inside a stream stands for: 400 for the client's errors, else 502."""
    return 400 if error_detail(event).get("type") == "invalid_request_error" else 502


def parse_retry_after(value: str | None) -> float:
    try:
        return max(1.0, float(value))
    except (TypeError, ValueError):
        return 1.0


# ---- the model -----------------------------------------------------------------------------


def choose_model(entries: list[dict], configured: str | None, model: str, where: str) -> dict:
    """The /v1/models entry to send requests to: the configured name, else MODEL, else the only one."""
    names = [e["id"] for e in entries]
    wanted = configured or model
    if wanted in names:
        return entries[names.index(wanted)]
    if configured is None and len(entries) == 1:
        return entries[0]
    listed = ", ".join(map(repr, names)) or "none"
    raise UpstreamError(
        f"the upstream {where} does not serve {wanted!r} (it serves {listed}); "
        f"name its model with --upstream-model"
    )


def make_loaded_model(model: str, entry: dict, options: LoadOptions) -> LoadedModel:
    """What the protocol modules need to know about the model: the local tokenizer and the
    upstream's vocabulary and context (from its /v1/models entry, else the local config)."""
    tokenizer = load_tokenizer(model, options.tokenizer)
    config = load_config(options.tokenizer or model)
    vocab_size = entry.get("vocab_size") or getattr(config, "vocab_size", None) or len(tokenizer)
    num_positions = entry.get("max_model_len") or (context_length(config) if config is not None else None)
    if not isinstance(num_positions, int) or num_positions <= 0:
        raise UpstreamError(
            f"the upstream's /v1/models entry of {entry['id']!r} has no max_model_len, and the local config of "
            f"{model!r} names no context length"
        )
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else getattr(config, "bos_token_id", None)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(config, "eos_token_id", None)
    return LoadedModel(
        name=model, model=None, tokenizer=tokenizer, bos_token_id=bos, eos_token_id=eos, vocab_size=int(vocab_size),
        context_length=num_positions, device="upstream", dtype="upstream",
    )
