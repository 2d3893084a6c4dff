"""The legacy LMQL 0.0.6.x inference API: ``POST /queue`` and ``GET /results/<client_id>``.

The wire protocol is frozen in ``legacy/PROTOCOL.md``. A request is validated completely and
submitted to the engine before the server answers ``200`` (a full engine answers ``429``); the
work then runs in the background (forwards through the shared engine, so they are prefix-cached
and batched with everything else) and its result waits in a per-client store until the client
collects it. Every accepted sample gets exactly one result:
the answer, or an error result (an extension) when the engine fails later. The headers and
long-polling of our extensions live in extensions.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
from typing import Any, Callable, Coroutine

import numpy
import orjson
import torch
from aiohttp import web

from ...engine import PromptOutput, Request
from ...engine.streams import yield_check
from ...errors import ContextLengthError, InvalidRequestError, LmqlBackendsError, OverloadedError
from ...legacy_json import load_json
from ..errors import error_message
from ..http import header_safe, read_body, text_error, text_response
from ..state import STATE, get_state
from ..validation import first_outside_vocabulary, is_int_list, is_valid_unicode
from .extensions import ERROR_DETAIL_HEADER, LONG_POLL_HEADER, parse_wait
from .jobs import (
    BAD_REQUEST_TEXT, Deliver, DetokenizeJob, ForwardJob, Job, JobResult, LogitRows, MalformedFieldError, Sample,
    TokenizeJob,
)
from .store import ResultStore

log = logging.getLogger("lmql_backends.server.legacy")

#: logits payloads larger than this many floats are formatted off the event loop
NUM_FLOATS_ON_LOOP = 262144


# ---- the legacy routes' state ---------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class LegacyState:
    """What the legacy routes keep besides the server state: results and running jobs."""

    store: ResultStore
    tokenizer_pool: concurrent.futures.ThreadPoolExecutor
    tasks: set = dataclasses.field(default_factory=set)


LEGACY = web.AppKey("legacy", LegacyState)


async def stop_jobs(app: web.Application) -> None:
    legacy = app[LEGACY]
    legacy.store.close()
    for task in list(legacy.tasks):
        task.cancel()
    await asyncio.gather(*legacy.tasks, return_exceptions=True)
    legacy.tokenizer_pool.shutdown(wait=False)


async def not_found(request: web.Request) -> web.Response:
    raise web.HTTPNotFound()


# ---- POST /queue ----------------------------------------------------------------------------


async def handle_queue(request: web.Request) -> web.Response:
    """Validate one action, reserve its capacity, answer ``{"sample_id": ...}`` and run it in the background.

    A full engine is refused here with ``429 text/plain`` and ``Retry-After`` (never a lost sample).
    The result goes to ``/results``.
    """
    try:
        payload = await read_payload(request)
        job = parse_job(payload, request)
        work = begin_job(request.app, job)
    except MalformedFieldError as exc:
        return text_response(BAD_REQUEST_TEXT, {ERROR_DETAIL_HEADER: header_safe(str(exc))})
    except LmqlBackendsError as exc:  # invalid values (400), body over the limit (413), overload (429)
        return text_error(exc)
    start_job(request.app, job, work, store_delivery(request.app))
    head = json.dumps({"sample_id": job.sample.sample_id}).encode()
    return web.Response(body=head, content_type="application/json")


def store_delivery(app: web.Application) -> Deliver:
    """Results as JSON, into the result store of their client."""
    async def deliver(sample: Sample, result: JobResult) -> None:
        app[LEGACY].store.put(sample.client_key, await encode_json_result(sample, result))

    return deliver


async def read_payload(request: web.Request) -> dict:
    """The JSON object of the body, with its ``action`` and ``sample_id``."""
    return parse_payload(await read_body(request))


def parse_payload(body: bytes | str) -> dict:
    """The JSON object of one action, with its ``action`` and ``sample_id`` (MalformedFieldError if not)."""
    try:
        payload = load_json(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise MalformedFieldError(f"the body is not valid JSON ({exc}); send a JSON object") from None
    if not isinstance(payload, dict):
        raise MalformedFieldError(f"the body is a JSON {type(payload).__name__}; send a JSON object")
    for field in ("sample_id", "action"):
        if field not in payload:
            raise MalformedFieldError(f"the body has no {field!r}; every request needs 'action' and 'sample_id'")
    return payload


def parse_job(payload: dict, request: web.Request) -> Job:
    """The typed job of an action."""
    action = payload["action"]
    parse = ACTION_PARSERS.get(action) if isinstance(action, str) else None
    if parse is None:
        raise InvalidRequestError(f"Unknown action: {action}", "action")
    return parse(payload, request)


def parse_forward(payload: dict, request: web.Request) -> ForwardJob:
    """Fields in the order the original server read them (so the same error wins)."""
    state = get_state(request)
    input_ids = require(payload, "input_ids")
    mask = payload.get("attention_mask")
    model = require(payload, "model_identifier")
    if model not in state.served_names:
        raise InvalidRequestError(f"The inference API serves model {state.model_name} not {model}.", "model_identifier")
    sample = make_sample(payload, request)
    rows, is_batched = make_rows(input_ids, mask)
    for index, row in enumerate(rows):
        check_row(row, row_name(index, is_batched), state.loaded.vocab_size, state.loaded.context_length)
    return ForwardJob(sample, rows, is_batched)


def parse_tokenize(payload: dict, request: web.Request) -> TokenizeJob:
    text = require(payload, "text")
    sample = make_sample(payload, request)
    if not isinstance(text, str):
        raise MalformedFieldError(f"text must be a string, got {json.dumps(text)[:80]}")
    if not is_valid_unicode(text):
        raise InvalidRequestError(
            "text contains an unpaired surrogate (an invalid \\u escape); send valid Unicode", "text"
        )
    return TokenizeJob(sample, text)


def parse_detokenize(payload: dict, request: web.Request) -> DetokenizeJob:
    input_ids = require(payload, "input_ids")
    sample = make_sample(payload, request)
    if not is_int_list(input_ids):
        raise MalformedFieldError("input_ids must be a flat list of token ids (integers)")
    check_vocabulary(input_ids, "input_ids", len(get_state(request).loaded.tokenizer))
    return DetokenizeJob(sample, tuple(input_ids))


ACTION_PARSERS: dict[str, Callable[[dict, web.Request], Job]] = {
    "forward": parse_forward, "tokenize": parse_tokenize, "detokenize": parse_detokenize,
}


def require(payload: dict, field: str) -> Any:
    if field not in payload:
        raise MalformedFieldError(f"the {payload['action']!r} request has no {field!r}")
    return payload[field]


def make_sample(payload: dict, request: web.Request) -> Sample:
    client_id = require(payload, "client_id")
    if isinstance(client_id, bool) or not isinstance(client_id, (str, int)):
        raise MalformedFieldError(f"client_id must be a string, got {json.dumps(client_id)[:80]}")
    return Sample(client_key(request, str(client_id)), payload["sample_id"])


def client_key(request: web.Request, client_id: str) -> str:
    """Results are kept per client ip and client id, as ``"<ip>-<client_id>"``."""
    return f"{request.remote}-{client_id}"


# ---- input_ids validation -------------------------------------------------------------------


def is_mask_value(value: Any) -> bool:
    return value in (0, 1) and isinstance(value, (int, bool))


def make_rows(input_ids: Any, mask: Any) -> tuple[tuple[tuple[int, ...], ...], bool]:
    """The ids of every row with the masked-out (padding) positions removed; and whether 2-D."""
    is_batched = isinstance(input_ids, list) and len(input_ids) > 0 and isinstance(input_ids[0], list)
    matrix = input_ids if is_batched else [input_ids]
    if not all(is_int_list(row) for row in matrix):
        raise MalformedFieldError("input_ids must be a list of token ids or a list of such lists")
    if mask is None:  # nothing to remove (the usual case: one pass less over every id)
        return tuple(tuple(row) for row in matrix), is_batched
    mask_matrix = make_mask_matrix(mask, matrix, is_batched)
    rows = tuple(tuple(t for t, keep in zip(row, keeps) if keep) for row, keeps in zip(matrix, mask_matrix))
    return rows, is_batched


def make_mask_matrix(mask: Any, matrix: list[list[int]], is_batched: bool) -> list[list[Any]]:
    """The attention_mask (not None) as one list per row, checked against the shape of input_ids."""
    mask_matrix = mask if is_batched else [mask]
    shapes_match = isinstance(mask_matrix, list) and len(mask_matrix) == len(matrix) and all(
        isinstance(keeps, list) and len(keeps) == len(row) for keeps, row in zip(mask_matrix, matrix)
    )
    if not shapes_match:
        raise MalformedFieldError("attention_mask must be null or have the shape of input_ids")
    if not all(is_mask_value(v) for keeps in mask_matrix for v in keeps):
        raise MalformedFieldError("attention_mask values must be 0 or 1")
    return mask_matrix


def row_name(index: int, is_batched: bool) -> str:
    return f"input_ids row {index}" if is_batched else "input_ids"


def check_row(row: tuple[int, ...], name: str, vocab_size: int, context_length: int) -> None:
    """Reject rows the engine cannot run, naming the limit and the fix."""
    if not row:
        raise InvalidRequestError(
            f"{name} is empty (after removing attention_mask padding); send at least 1 token id", "input_ids"
        )
    if len(row) > context_length:
        raise ContextLengthError(
            f"{name} has {len(row)} tokens, more than the model's context length of {context_length} "
            f"tokens; send at most {context_length} tokens", "input_ids"
        )
    check_vocabulary(row, name, vocab_size)


def check_vocabulary(ids, name: str, vocab_size: int) -> None:
    """Every id of `ids` (already checked to be ints) in [0, vocab_size), or an error naming the first outside."""
    bad = first_outside_vocabulary(ids, vocab_size)
    if bad is None:
        return
    raise InvalidRequestError(
        f"{name} contains token id {bad}, outside the vocabulary [0, {vocab_size}); "
        f"send ids from the model's tokenizer", "input_ids"
    )


# ---- running jobs ---------------------------------------------------------------------------


def begin_job(app: web.Application, job: Job) -> Coroutine[Any, Any, JobResult]:
    """Reserve what `job` needs now (OverloadedError when full); return the coroutine that finishes it."""
    check_capacity(app)
    if isinstance(job, ForwardJob):
        return begin_forward(app, job)
    return JOB_RUNNERS[type(job)](app, job)


def check_capacity(app: web.Application) -> None:
    """At most as many jobs in flight as the engine holds requests (tokenize jobs included)."""
    config = app[STATE].engine.config
    limit = config.max_queue + config.max_num_seqs
    if len(app[LEGACY].tasks) >= limit:
        raise OverloadedError(f"the server is at capacity ({limit} samples in flight); retry later")


def start_job(app: web.Application, job: Job, work: Coroutine[Any, Any, JobResult], deliver: Deliver) -> None:
    """Run `work` in the background; `deliver` hands its result (or error result) to the client."""
    legacy = app[LEGACY]
    task = asyncio.create_task(run_job(job, work, deliver))
    legacy.tasks.add(task)
    task.add_done_callback(legacy.tasks.discard)


async def run_job(job: Job, work: Coroutine[Any, Any, JobResult], deliver: Deliver) -> None:
    try:
        result = await work
    except Exception as exc:  # deliver every failure as an error result: no sample is lost
        log.info("legacy sample %r failed: %s", job.sample.sample_id, exc)
        result = JobResult("error", error_message(exc))
    await deliver(job.sample, result)


@dataclasses.dataclass(eq=False)
class RowForward:
    """One forward row accepted by the engine; its outputs arrive on `outputs` (prefix-cached, batched)."""

    engine: Any
    request: Request
    outputs: asyncio.Queue

    @classmethod
    def submit(cls, engine, ids: list[int]) -> "RowForward":
        """Submit a checked row now: OverloadedError (or RequestCancelledError) is raised here, not later."""
        row = cls(engine, Request(ids, return_logits=True), asyncio.Queue())
        emit = engine.emitter(asyncio.get_running_loop(), row.outputs.put_nowait, row.request.request_id)
        engine.submit(row.request, emit)
        return row

    async def next_token_logits(self) -> torch.Tensor:
        """The raw last-position logits of the row; aborts the request if cancelled first."""
        logits, finished = None, False
        try:
            while not finished:
                out = await self.outputs.get()
                finished = yield_check(out)  # raises the error of an ErrorOutput
                logits = out.logits if isinstance(out, PromptOutput) else logits
        finally:
            if not finished:
                self.engine.abort(self.request.request_id)
        if logits is None:
            raise RuntimeError("the engine finished a forward without its logits")
        return logits


def submit_rows(engine, rows: tuple[tuple[int, ...], ...]) -> list[RowForward]:
    """Submit every row, or none: if one is refused, the ones already accepted are aborted."""
    submitted: list[RowForward] = []
    try:
        for row in rows:
            submitted.append(RowForward.submit(engine, list(row)))
    except BaseException:
        for row in submitted:
            engine.abort(row.request.request_id)
        raise
    return submitted


def begin_forward(app: web.Application, job: ForwardJob) -> Coroutine[Any, Any, JobResult]:
    """Submit the rows now; overload raises (429), any other refusal becomes the sample's error result."""
    try:
        submitted = submit_rows(app[STATE].engine, job.rows)
    except OverloadedError:
        raise
    except Exception as exc:
        return raise_later(exc)  # e.g. the engine is stopping: the sample is accepted and gets an error result
    return run_forward(job, [row.next_token_logits() for row in submitted])


async def raise_later(exc: Exception) -> JobResult:
    raise exc


async def run_forward(job: ForwardJob, waits: list) -> JobResult:
    logits = await asyncio.gather(*waits)
    return JobResult("next_token_logits", LogitRows(tuple(logits), job.is_batched))


async def run_tokenize(app: web.Application, job: TokenizeJob) -> JobResult:
    loaded = app[STATE].loaded
    return JobResult("input_ids", await in_tokenizer_thread(app, tokenize_text, loaded, job.text))


def tokenize_text(loaded, text: str) -> list[int]:
    """``<BOS>`` and ``<EOS>`` are the special tokens; anything else uses the tokenizer's defaults."""
    if text == "<BOS>":
        return [loaded.bos_token_id]
    if text == "<EOS>":
        return [loaded.eos_token_id]
    return list(loaded.tokenizer(text)["input_ids"])


async def run_detokenize(app: web.Application, job: DetokenizeJob) -> JobResult:
    tokenizer = app[STATE].loaded.tokenizer
    return JobResult("text", await in_tokenizer_thread(app, tokenizer.decode, list(job.input_ids)))


async def in_tokenizer_thread(app: web.Application, function, *args):
    """Tokenizer calls run one at a time off the event loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(app[LEGACY].tokenizer_pool, function, *args)


JOB_RUNNERS = {TokenizeJob: run_tokenize, DetokenizeJob: run_detokenize}


# ---- encoding -------------------------------------------------------------------------------


async def encode_json_result(sample: Sample, result: JobResult) -> bytes:
    """The result object /results delivers (logits written as JSON floats, large ones off the loop)."""
    if isinstance(result.value, LogitRows):
        value_json = await encode_logits(list(result.value.rows), result.value.is_batched)
    else:
        value_json = json.dumps(result.value)
    return encode_result(sample, result.field, value_json)


def encode_result(sample: Sample, field: str, value_json: str) -> bytes:
    """One result object, encoded once when it is ready (``value_json`` is already JSON)."""
    head = json.dumps(sample.to_json())
    return f'{head[:-1]}, "{field}": {value_json}}}'.encode()


async def encode_logits(rows: list[torch.Tensor], is_batched: bool) -> str:
    """``[[V floats], ...]`` for a 2-D forward, ``[V floats]`` for 1-D; large ones off the loop."""
    if sum(row.numel() for row in rows) > NUM_FLOATS_ON_LOOP:
        return await asyncio.to_thread(format_logits, rows, is_batched)
    return format_logits(rows, is_batched)


def format_logits(rows: list[torch.Tensor], is_batched: bool) -> str:
    texts = [format_floats(row) for row in rows]
    return f"[{', '.join(texts)}]" if is_batched else texts[0]


def format_floats(values: torch.Tensor) -> str:
    """A JSON list of float32 values, each the shortest text that parses back to it exactly.

    orjson writes a float32 array directly, far faster than ``%.9g`` formatting or
    ``json.dumps(values.tolist())`` (see PROTOCOL.md). Non-finite values fall back to
    ``json.dumps`` (``Infinity``/``NaN``, as the original sent; orjson would write ``null``).
    """
    array = values.detach().float().cpu().numpy()
    if not numpy.isfinite(array).all():
        return json.dumps(array.tolist())
    return orjson.dumps(array, option=orjson.OPT_SERIALIZE_NUMPY).decode()


# ---- GET /results/<client_id> ---------------------------------------------------------------


async def handle_results(request: web.Request) -> web.Response:
    """Every finished result of this client, each delivered once; ``?wait=S`` long-polls."""
    try:
        wait = parse_wait(request.query.get("wait"))
    except MalformedFieldError as exc:
        return text_response(BAD_REQUEST_TEXT, {ERROR_DETAIL_HEADER: header_safe(str(exc))})
    store = request.app[LEGACY].store
    key = client_key(request, request.match_info["client_id"])
    if wait > 0:
        await store.wait_for_results(key, wait)
    body = b"[" + b",".join(store.take_all(key)) + b"]"
    return web.Response(body=body, content_type="application/json", headers={LONG_POLL_HEADER: "1"})
