"""lmql-backends' own extensions of the frozen legacy protocol (``legacy/PROTOCOL.md``, "Extensions").

An original client never sees them. Here: the headers by which a client learns what this
server offers, the result in the ``/queue`` answer (``POST /queue?wait=``, extension 14) and
``input_ids_after`` on the WebSocket channel (extension 16, `RowHistory`); the channel itself
(extension 15) is socket.py.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
from typing import Any

from ...legacy_frames import AFTER_FIELD, APPEND_HEADER, UNKNOWN_BASE_TEXT
from .jobs import ForwardJob, MalformedFieldError, Sample
from .store import ResultStore

MAX_WAIT_SECONDS = 30.0
#: on every /results answer: this server long-polls ``?wait=`` (extensions 5, 6)
LONG_POLL_HEADER = "X-Long-Poll"
#: on every accepted /queue answer: this server takes ``?wait=`` on /queue (extension 14)
INLINE_WAIT_HEADER = "X-Inline-Wait"
#: on a /queue answer that carries the result itself
INLINE_HEADER = "X-Inline-Result"
#: on every ``400 Bad request.``: what is wrong and how to fix it (extension 3)
ERROR_DETAIL_HEADER = "X-Error-Detail"
#: on every accepted /queue answer: the path of this server's WebSocket channel (extension 15)
SOCKET_HEADER = "X-Queue-Socket"
SOCKET_PATH = "/queue/socket"
#: the headers of every accepted /queue answer (extensions 14, 15, 16)
ACCEPTED_HEADERS = {INLINE_WAIT_HEADER: "1", SOCKET_HEADER: SOCKET_PATH, APPEND_HEADER: "1"}
#: one-row forwards whose rows a channel keeps for ``input_ids_after`` (at most ~8 KB each)
NUM_KEPT_ROWS = 1024


def parse_wait(text: str | None) -> float:
    """Seconds to wait for a first result (``?wait=`` on /results and /queue), at most MAX_WAIT_SECONDS."""
    if text is None:
        return 0.0
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not seconds >= 0:
        raise MalformedFieldError(f"wait must be a number of seconds >= 0, got {text!r}")
    return min(seconds, MAX_WAIT_SECONDS)


# ---- the result in the /queue answer (extension 14) ----------------------------------------


async def wait_inline(inline: asyncio.Future, seconds: float, store: ResultStore, sample: Sample) -> bytes | None:
    """The encoded result if the job finishes within `seconds`; else None (it goes to the store)."""
    try:
        await asyncio.wait({inline}, timeout=seconds)
    except asyncio.CancelledError:  # the client went away: a result already handed over goes to the store
        if inline.done():
            store.put(sample.client_key, inline.result())
        inline.cancel()
        raise
    if inline.done():
        return inline.result()
    inline.cancel()  # too late: the job puts the result in the store
    return None


def with_inline_result(head: bytes, result: bytes) -> bytes:
    """``{"sample_id": ..., "result": <result>}`` from the usual answer `head`."""
    return head[:-1] + b', "result": ' + result + b"}"


# ---- input_ids_after (extension 16) --------------------------------------------------------


def resolve_after(payload: dict, base: tuple[int, ...] | None) -> tuple[int, ...]:
    """The row the action's ``input_ids_after`` names (`base`, resolved by the WebSocket channel;
    None where the field is not accepted), or () when the action has no such field."""
    if AFTER_FIELD not in payload:
        return ()
    if base is None:
        raise MalformedFieldError(f"{AFTER_FIELD} is only accepted on the WebSocket channel ({SOCKET_PATH})")
    if payload["action"] != "forward":
        raise MalformedFieldError(f"{AFTER_FIELD} is only accepted on forward actions, not {payload['action']!r}")
    return base


def appended_rows(base: tuple[int, ...], rows: tuple[tuple[int, ...], ...], mask: Any) -> tuple[tuple[int, ...]]:
    """The one row of `rows` after `base`."""
    if len(rows) != 1 or mask is not None:
        raise MalformedFieldError(f"with {AFTER_FIELD}, send one row of new token ids and a null attention_mask")
    return (base + rows[0],)


class RowHistory:
    """The rows of a channel's last accepted one-row forwards, by sample_id: what a later forward's
    ``input_ids_after`` names, so that it sends only its new ids."""

    def __init__(self, max_rows: int = NUM_KEPT_ROWS):
        self.max_rows = max_rows
        self.rows: collections.OrderedDict[Any, tuple[int, ...]] = collections.OrderedDict()

    def remember(self, sample_id: Any, job) -> None:
        if isinstance(job, ForwardJob) and len(job.rows) == 1 and type(sample_id) in (int, str):
            self.rows[sample_id] = job.rows[0]
            self.rows.move_to_end(sample_id)
            if len(self.rows) > self.max_rows:
                self.rows.popitem(last=False)

    def base_of(self, payload: dict) -> tuple[int, ...]:
        """The row ``input_ids_after`` names, () when the field is absent; MalformedFieldError
        (naming the fix) when this channel does not hold it."""
        if AFTER_FIELD not in payload:
            return ()
        key = payload[AFTER_FIELD]
        row = self.rows.get(key) if type(key) in (int, str) else None
        if row is None:
            raise MalformedFieldError(
                f"{UNKNOWN_BASE_TEXT} ({json.dumps(key)[:40]}; it keeps the rows of its last "
                f"{self.max_rows} forwards); send the whole sequence in input_ids"
            )
        return row

