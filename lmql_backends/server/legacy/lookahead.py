"""Lookahead for the legacy API: compute the likeliest next ``forward`` while the client chooses.

A legacy client sends the whole sequence for every token and waits for its logits; meanwhile
it parses them, masks, chooses a token and posts the sequence plus that token, and the engine
idles. So after answering a forward of ``ids``, the server starts the forward of
``ids + [argmax]`` (what an unconstrained argmax client asks next). When the next request is
exactly that sequence, its logits are ready or already being computed; any other request
misses and runs as usual. A lookahead is the engine's ordinary forward of the same ids (prefix
cached, batched with everything else), so answers are the same with or without it.

Lookaheads only start while the engine is far from full (fewer requests than half of
``max_num_seqs``), are speculative engine requests (they never count against its capacity, so
never cause a 429) and at most `max_entries` are kept (the oldest is dropped and aborted first);
a client whose next tokens are seldom the raw argmax gets none (see `Lookahead`).
``serve-model --legacy --no-lookahead`` turns it off.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from typing import Awaitable, Callable

import torch

from ...errors import LmqlBackendsError

log = logging.getLogger("lmql_backends.server.legacy")

Row = tuple[int, ...]
#: a client gets lookaheads while its running prediction score is at least this (it starts at 1)
MIN_SCORE = 0.5
#: weight of the past in the score: 3 wrong predictions in a row stop the lookaheads of a client
SCORE_DECAY = 0.75
MAX_CLIENTS = 1024
#: starts the engine forward of a row (at once, or when awaited) and returns its raw next-token logits
Forward = Callable[[list[int]], Awaitable[torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class LookaheadStats:
    """Counts served at /metrics: lookaheads started, used by a request, and requests that missed."""

    legacy_lookahead_started: int
    legacy_lookahead_hits: int
    legacy_lookahead_misses: int


class Lookahead:
    """The speculative forwards in flight or done, by the ids they were computed for.

    Each client's prediction (its last row plus the raw argmax) is checked against the client's
    next row of the same length, whether or not it was computed: a running score of these
    checks decides whether that client gets lookaheads. A client whose choices differ from the
    raw argmax (masks that bite, sampling) soon gets none, so it does not pay for wasted ones.
    """

    def __init__(self, engine, context_length: int, eos_token_id: int | None, max_entries: int = 16):
        self.engine = engine
        self.context_length = context_length
        self.eos_token_id = eos_token_id
        self.max_entries = max_entries
        self.entries: collections.OrderedDict[Row, asyncio.Task] = collections.OrderedDict()
        self.predictions: collections.OrderedDict[str, Row] = collections.OrderedDict()
        self.scores: dict[str, float] = {}
        self.num_started = self.num_hits = self.num_misses = 0

    def take(self, client: str, row: Row) -> asyncio.Task | None:
        """The lookahead computed for exactly `row` (removed: each is used once), or None."""
        prediction = self._check_prediction(client, row)
        # the prediction is the entry's own key: found by identity, without comparing ~1000 ids again
        task = self.entries.pop(row if prediction is None else prediction, None)
        if task is None:
            self.num_misses += 1
        else:
            self.num_hits += 1
        return task

    def start_after(self, client: str, row: Row, logits: torch.Tensor, forward: Forward) -> None:
        """Predict `client`'s next row (`row` plus its raw argmax); compute it now if worth it."""
        token = int(logits.numpy(force=True).argmax())  # numpy: no torch dispatch on the event loop
        next_row = (*row, token)
        self._remember(client, next_row)
        if (token == self.eos_token_id or len(next_row) > self.context_length or next_row in self.entries
                or self.scores.get(client, 1.0) < MIN_SCORE or not self.is_engine_idle()):
            return
        try:
            task = asyncio.ensure_future(forward(list(next_row)))
        except LmqlBackendsError as exc:  # e.g. the engine is stopping: the answer goes out all the same
            log.debug("no lookahead for client %s: %s", client, exc)
            return
        task.add_done_callback(retrieve_exception)  # one nobody takes must not log "never retrieved"
        self.entries[next_row] = task
        self.num_started += 1
        while len(self.entries) > self.max_entries:
            _, oldest = self.entries.popitem(last=False)
            oldest.cancel()  # aborts its engine request

    def _remember(self, client: str, prediction: Row) -> None:
        self.predictions[client] = prediction
        self.predictions.move_to_end(client)
        while len(self.predictions) > MAX_CLIENTS:
            forgotten, _ = self.predictions.popitem(last=False)
            self.scores.pop(forgotten, None)

    def _check_prediction(self, client: str, row: Row) -> Row | None:
        """Score the client's prediction if `row` continues the same sequence; drop a wasted lookahead.
        Returns the prediction when `row` equals it."""
        prediction = self.predictions.get(client)
        if prediction is None or len(prediction) != len(row):
            return None
        is_hit = prediction == row
        if not is_hit and prediction[:-1] != row[:-1]:  # another sequence: says nothing about the client
            return None
        self.scores[client] = SCORE_DECAY * self.scores.get(client, 1.0) + (1 - SCORE_DECAY) * is_hit
        if not is_hit and prediction in self.entries:
            self.entries.pop(prediction).cancel()  # nobody will ask for it: free the engine
        return prediction if is_hit else None

    def is_engine_idle(self) -> bool:
        return self.engine.num_pending < max(1, self.engine.config.max_num_seqs // 2)

    def stats(self) -> LookaheadStats:
        return LookaheadStats(self.num_started, self.num_hits, self.num_misses)

    async def close(self) -> None:
        """Cancel every lookahead (server shutdown)."""
        tasks = list(self.entries.values())
        self.entries.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def retrieve_exception(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()
