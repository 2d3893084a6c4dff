"""The engine process: ``python -m lmql_backends.engine.worker FD`` runs one model's engine.

A server with an engine process (the new API's default, ``--engine-process``) starts it and
talks to it over the socket FD (messages in wire.py). The engine thread here shares the
interpreter with nothing but this process's message reader, so the server's HTTP work no
longer waits for the GIL between the ~100 torch operations of each step (as vLLM's API server
and engine core are two processes).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import signal
import sys
import time
from multiprocessing.connection import Connection

from ..console import configure_console
from ..loader import LoadOptions, describe, load_weights
from .engine import Engine, EngineConfig
from .sequence import ErrorOutput, Output, Request
from .wire import Channel

log = logging.getLogger("lmql_backends.engine.worker")

#: how often, while requests run, the server's copy of the engine statistics is refreshed (seconds)
STATS_INTERVAL_SECONDS = 0.25


class Outbox:
    """Outputs of one engine step, sent as one message (with fresh statistics when due)."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self.engine: Engine | None = None
        self._items: collections.deque[tuple[str, Output]] = collections.deque()
        self._last_stats = 0.0
        self._num_active = 0  # running + waiting sequences at the last statistics sent

    def put(self, request_id: str, output: Output) -> None:
        self._items.append((request_id, output))

    def flush(self) -> None:
        """Send what was put since the last flush (any thread), and the statistics when sequences
        came or went (an abort has no output, yet the server must see it), when the engine is idle,
        or every 0.25 s."""
        items = [self._items.popleft() for _ in range(len(self._items))]
        scheduler = self.engine.scheduler
        num_active = len(scheduler.running) + len(scheduler.waiting)
        is_changed, self._num_active = num_active != self._num_active, num_active
        if items or is_changed:
            self._send(items, self._stats_if_due(is_changed or num_active == 0))

    def _send(self, items: list, stats) -> None:
        try:
            self.channel.send("outputs", items, stats)
        except OSError:  # the server is gone: nobody is left to read them (serve_requests then stops)
            log.debug("server gone; %d output(s) not delivered", len(items))

    def _stats_if_due(self, is_urgent: bool):
        now = time.monotonic()
        if not is_urgent and now - self._last_stats < STATS_INTERVAL_SECONDS:
            return None
        self._last_stats = now
        return self.engine.stats()


def main(fd: int) -> int:
    """Load the model named by the server's first message, then serve its requests until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the server decides
    channel = Channel(Connection(fd))
    _, model, options, config, log_level = channel.receive()
    configure_console(log_level)  # as the server's own lines (cli.main)
    outbox = start_engine(channel, model, options, config)
    if outbox is None:
        return 1
    serve_requests(channel, outbox)
    return 0


def start_engine(channel: Channel, model: str, options: LoadOptions, config: EngineConfig) -> Outbox | None:
    """Load the model and start its engine thread; None (the server is told why) when loading fails."""
    try:
        loaded = load_weights(model, options)  # the server process has the tokenizer
    except Exception as exc:
        channel.send("failed", exc)
        return None
    channel.send("loaded", dataclasses.replace(loaded, model=None), describe(loaded))
    outbox = Outbox(channel)
    engine = outbox.engine = Engine(loaded, config, after_step=outbox.flush)
    engine.start().wait_ready()
    channel.send("ready", engine.stats())
    return outbox


def serve_requests(channel: Channel, outbox: Outbox) -> None:
    """Hand the server's messages to the engine until "stop" or until the server is gone."""
    engine = outbox.engine
    while True:
        try:
            kind, *payload = channel.receive()
        except (EOFError, OSError):  # the server exited without saying stop
            kind = "stop"
        if kind == "add":
            for request in payload[0]:  # all before the engine thread runs (this thread holds the GIL)
                submit(engine, outbox, request)
        elif kind == "abort":
            engine.abort(payload[0])
        elif kind == "stop":
            break
    engine.stop()
    outbox.flush()  # the cancellations of what was still running


def submit(engine: Engine, outbox: Outbox, request: Request) -> None:
    request_id = request.request_id
    try:  # the server process validated it and counted it against the capacity
        engine.submit_checked(request, lambda output: outbox.put(request_id, output))
    except Exception as exc:  # the engine is stopping: answer anyway, never drop a request
        outbox.put(request_id, ErrorOutput(exc))
        outbox.flush()


if __name__ == "__main__":
    from lmql_backends.engine.worker import main as main_of_module  # messages name the module's classes, not __main__'s

    sys.exit(main_of_module(int(sys.argv[1])))
