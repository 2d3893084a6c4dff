"""A server's engine in a process of its own: `EngineProcess` is used exactly like `Engine`.

The server process keeps HTTP, tokenization and request checks; the engine process (worker.py)
keeps the model. Requests go there once; each engine step's outputs come back as one message,
read by one thread here and handed to each request's `emit`. If the engine process dies,
every request in flight fails with EngineError naming its exit code, and later ones at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Callable

from ..errors import EngineError, InvalidRequestError, RequestCancelledError
from ..loader import LoadedModel, LoadOptions, load_tokenizer, with_tokenizer
from ..process_env import apply_process_defaults
from .consumers import Consumers
from .delivery import Mailboxes
from .engine import EngineConfig, EngineStats
from .sequence import ErrorOutput, Output, Request
from .streams import OutputStreams
from .wire import Channel

log = logging.getLogger("lmql_backends.engine.process")

STOP_SECONDS = 30


class EngineProcess(OutputStreams):
    """The engine of `model` in a child process (started here, stopped by `stop`)."""

    def __init__(self, model: str, options: LoadOptions, config: EngineConfig = EngineConfig()):
        self.config = config
        self.loaded: LoadedModel | None = None  # set by wait_loaded
        self._mailboxes = Mailboxes()
        self._consumers = Consumers()
        self._unsent: list[Request] = []  # submitted in this event-loop iteration, sent at its end
        self._lock = self._consumers.lock  # one lock: a request is counted and queued to send together
        self._stats = EngineStats(**{field.name: 0 for field in dataclasses.fields(EngineStats)})  # until "ready"
        self._facts: LoadedModel | BaseException | None = None  # what the engine process loaded, or why it could not
        self.description = ""  # the loader's one-line summary of the model, as the engine process loaded it
        self._is_loaded, self._is_ready = threading.Event(), threading.Event()
        self._is_stopping = False
        self._model, self._options = model, options
        self._process, self._channel = spawn_worker()
        self._send_start(config)
        self._reader = threading.Thread(target=self._read, name="lmql-backends-engine-reader", daemon=True)
        self._reader.start()

    def _send_start(self, config: EngineConfig) -> None:
        level = logging.getLogger("lmql_backends").getEffectiveLevel()
        try:
            self._channel.send("start", self._model, self._options, config, level)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:  # what pickle raises for such values
            self._process.kill()
            self._process.wait()
            self._channel.close()
            raise InvalidRequestError(
                f"a load option cannot be sent to the engine process ({exc}); pass plain values, "
                f"or run the engine in this process (engine_process=False, --no-engine-process)"
            ) from exc

    # ---- lifecycle -------------------------------------------------------------------
    def wait_loaded(self) -> LoadedModel:
        """Wait until the engine process has loaded the model (raises its load error) and load the tokenizer."""
        tokenizer, error = None, None
        try:
            tokenizer = load_tokenizer(self._model, self._options.tokenizer)  # meanwhile, the model loads there
        except Exception as exc:
            error = exc
        self._is_loaded.wait()
        if isinstance(self._facts, BaseException) or error is not None:
            self.stop()
            raise self._facts if isinstance(self._facts, BaseException) else error
        self.loaded = with_tokenizer(self._facts, tokenizer)
        return self.loaded

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the engine thread over there has chosen its thread count and kernels."""
        return self._is_ready.wait(timeout)

    def stop(self) -> None:
        """Cancel everything in flight and end the engine process (killed after STOP_SECONDS)."""
        self._is_stopping = True
        try:
            self._channel.send("stop")
        except OSError:
            pass  # already gone
        try:
            self._process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            log.warning("the engine process did not stop within %s s; killing it", STOP_SECONDS)
            self._process.kill()
            self._process.wait()
        self._reader.join(STOP_SECONDS)
        self._channel.close()

    # ---- requests --------------------------------------------------------------------
    def submit(self, request: Request, emit: Callable[[Output], None]) -> None:
        """Count `request` (validated by the caller, see `check_request`) against the capacity here
        and send it to the engine process; outputs go to `emit` (reader thread)."""
        if self._is_stopping:
            raise RequestCancelledError("the engine is shutting down")
        if self._process.poll() is not None:
            raise self._gone_error()
        with self._lock:
            self._consumers.add_locked(request.request_id, emit, self.config, self._stats.num_waiting_for_kv > 0)
            self._unsent.append(request)
            is_first = len(self._unsent) == 1
        if is_first:
            self._schedule_send()

    def _schedule_send(self) -> None:
        """Send at the end of this event-loop iteration, so that requests submitted together (the
        choices of a completion) reach the engine in one message and start in one step."""
        try:
            asyncio.get_running_loop().call_soon(self._send_unsent)
        except RuntimeError:  # no event loop in this thread: send now
            self._send_unsent()

    def _send_unsent(self) -> None:
        with self._lock:
            requests, self._unsent = self._unsent, []
        if not requests:
            return
        try:
            self._channel.send("add", requests)
        except OSError:  # the engine process is gone (the reader may have failed the others already)
            for request in requests:
                self._fail_unsent(request.request_id)

    def _fail_unsent(self, request_id: str) -> None:
        consumer = self._consumers.get(request_id)
        if consumer is not None and self._consumers.forget(request_id):
            consumer(ErrorOutput(self._gone_error()))

    def abort(self, request_id: str) -> None:
        """Cancel a request (its consumer went away); nothing more reaches its `emit`."""
        if self._consumers.forget(request_id) and not self._drop_unsent(request_id):
            try:
                self._channel.send("abort", request_id)
            except OSError:
                pass  # the engine process is gone: nothing runs there any more

    def _drop_unsent(self, request_id: str) -> bool:
        """Remove a request not sent yet; whether it was there (then the engine never hears of it)."""
        with self._lock:
            kept = [request for request in self._unsent if request.request_id != request_id]
            is_dropped, self._unsent = len(kept) < len(self._unsent), kept
        return is_dropped

    @property
    def is_alive(self) -> bool:
        """Whether the engine process still runs (False once it exited, whatever the cause)."""
        return self._process.poll() is None

    @property
    def num_pending(self) -> int:
        """Counted requests submitted and not yet finished (queued or running)."""
        return self._consumers.num_pending

    def stats(self) -> EngineStats:
        """The engine's statistics as of its last step with outputs (refreshed every 0.25 s while
        busy; zeros until the engine process is ready)."""
        return self._stats

    # ---- the reader thread -----------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                kind, *payload = self._channel.receive()
                self._handle(kind, payload)
            except (EOFError, OSError):
                break
            except Exception:  # a bug: nothing more can be trusted to arrive; end the process, fail the rest
                log.exception("could not read the engine process's message; stopping it")
                self._process.kill()
                break
        self._on_exit()

    def _handle(self, kind: str, payload: list) -> None:
        if kind == "outputs":
            items, stats = payload
            self._stats = stats or self._stats  # first: a consumer told "finished" sees the statistics after it
            for request_id, output in items:
                self._consumers.deliver(request_id, output, self.abort)
        elif kind == "loaded":
            self._facts, self.description = payload
            self._is_loaded.set()
        elif kind == "failed":
            self._facts = payload[0]
            self._is_loaded.set()
        elif kind == "ready":
            self._stats = payload[0]
            self._is_ready.set()

    def _on_exit(self) -> None:
        """The engine process is gone: fail whatever still waits, unblock whoever waits to start."""
        self._wait_exit_code()
        if self._facts is None:
            self._facts = self._gone_error()
        self._is_loaded.set()
        self._consumers.fail_all(self._gone_error())

    def _wait_exit_code(self) -> None:
        """Wait (on the reader thread, up to 5 s) for the exit the closed socket announced."""
        try:
            self._process.wait(5)  # its socket closes just before it exits
        except subprocess.TimeoutExpired:
            pass

    def _gone_error(self) -> Exception:
        """The error of a request the engine process can no longer run (never waits: any thread)."""
        if self._is_stopping:
            return RequestCancelledError("the engine stopped")
        code = self._process.poll()
        exit_code = "" if code is None else f" (exit code {code})"
        return EngineError(f"the engine process exited unexpectedly{exit_code}; restart the server")


def spawn_worker() -> tuple[subprocess.Popen, Channel]:
    """Start ``python -m lmql_backends.engine.worker FD`` with one end of a socket pair as FD."""
    ours, theirs = socket.socketpair()
    env = apply_process_defaults(dict(os.environ))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root(), os.environ.get("PYTHONPATH")]))
    with theirs:
        process = subprocess.Popen(
            [sys.executable, "-m", "lmql_backends.engine.worker", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL,
        )
    return process, Channel(Connection(ours.detach()))


def package_root() -> str:
    """The directory holding the lmql_backends package (so the child imports the same code)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
