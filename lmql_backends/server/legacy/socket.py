"""The legacy API's WebSocket channel (an extension): ``/queue`` actions in, results out, one connection.

An HTTP request per token costs both sides far more CPU than a message on an open WebSocket,
and on a small model more than the token's own work, so lmql-backends' own client moves to
this channel once a ``/queue`` answer names it (``X-Queue-Socket: /queue/socket``); an
original client never sees it. Each message the client
sends is exactly a ``POST /queue`` body, validated and run by the same code. Each sample gets
exactly one message back:

- a forward's logits as a binary message (``legacy_frames.py``): a JSON header
  (``{"client_id", "sample_id", "field": "next_token_logits", "shape"}``) and the float32
  values themselves (exact, and no text to write or parse);
- any other result as a text message holding the result object ``/results`` would deliver
  (``input_ids``, ``text``, or an ``error`` result);
- a refused action (the ``400``/``413``/``429`` of ``POST /queue``) as a text message
  ``{"sample_id", "status", "error"}`` (plus ``"detail"`` for ``Bad request.``).

A result whose channel closed before it was ready goes to ``/results`` (no sample is lost).

A forward on the channel may name an earlier one-row forward of the same channel in
``input_ids_after`` and send only the ids that follow its row (extension 16, ``RowHistory``).
"""

from __future__ import annotations

import json
import logging
from aiohttp import WSMsgType, web

from ...errors import LmqlBackendsError
from ...legacy_frames import encode_logits_frame
from ..errors import classify, error_message
from ..state import get_state
from .api import LEGACY, begin_job, encode_json_result, encode_result, parse_job, parse_payload, start_job
from .extensions import RowHistory
from .jobs import BAD_REQUEST_TEXT, JobResult, LogitRows, MalformedFieldError, Sample

log = logging.getLogger("lmql_backends.server.legacy")

#: seconds a closing channel waits for the client's close reply
CLOSE_TIMEOUT_SECONDS = 2.0


async def handle_socket(request: web.Request) -> web.WebSocketResponse:
    """``GET /queue/socket``: accept actions until the client closes; answer each one by its sample_id."""
    max_bytes = get_state(request).config.max_body_bytes
    socket = web.WebSocketResponse(timeout=CLOSE_TIMEOUT_SECONDS, compress=False, max_msg_size=max_bytes)
    await socket.prepare(request)
    sockets = request.app[LEGACY].sockets
    sockets.add(socket)
    rows = RowHistory()
    try:
        async for message in socket:
            if message.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                await receive_action(request, socket, message.data, rows)
    finally:
        sockets.discard(socket)
    return socket


async def receive_action(request: web.Request, socket: web.WebSocketResponse, data: bytes | str,
                         rows: RowHistory) -> None:
    """Validate and start one action, exactly as ``POST /queue`` does (plus ``input_ids_after``,
    resolved against `rows`); a refusal is answered at once."""
    sample_id = None
    try:
        payload = parse_payload(data)
        sample_id = payload["sample_id"]
        job = parse_job(payload, request, rows.base_of(payload))
        work = begin_job(request.app, job)
    except LmqlBackendsError as exc:
        await send_quietly(socket, refusal(sample_id, exc))
        return
    rows.remember(sample_id, job)
    start_job(request.app, job, work, socket_delivery(request.app, socket))


def refusal(sample_id, exc: LmqlBackendsError) -> str:
    """The message of an action the server did not accept, with the status ``POST /queue`` would answer."""
    body = {"sample_id": sample_id, "status": classify(exc)[0]}  # MalformedFieldError: 400 too
    if isinstance(exc, MalformedFieldError):
        body.update(error=BAD_REQUEST_TEXT, detail=str(exc))
    else:
        body["error"] = error_message(exc)
    return json.dumps(body)


def socket_delivery(app: web.Application, socket: web.WebSocketResponse):
    """Results go back on `socket`; if it closed meanwhile, to the result store (``/results``)."""
    async def deliver(sample: Sample, result: JobResult) -> None:
        if not socket.closed and await send_quietly(socket, encode_message(sample, result)):
            return
        app[LEGACY].store.put(sample.client_key, await encode_json_result(sample, result))

    return deliver


def encode_message(sample: Sample, result: JobResult) -> bytes | str:
    """A binary message for logits, else the JSON result object as text."""
    if isinstance(result.value, LogitRows):
        return encode_logits_message(sample, result.field, result.value)
    return encode_result(sample, result.field, json.dumps(result.value)).decode()


def encode_logits_message(sample: Sample, field: str, logits: LogitRows) -> bytes:
    rows = [row.numpy(force=True) for row in logits.rows]  # the engine's float32 logits, not copied
    return encode_logits_frame(sample.to_json(), field, rows, logits.is_batched)


async def send_quietly(socket: web.WebSocketResponse, message: bytes | str) -> bool:
    """Send `message`; False if the channel is gone (the caller keeps the result elsewhere)."""
    try:
        if isinstance(message, bytes):
            await socket.send_bytes(message)
        else:
            await socket.send_str(message)
    except (ConnectionError, RuntimeError) as exc:  # closed or closing under us
        log.info("a legacy socket closed before a message could be sent: %s", exc)
        return False
    return True
