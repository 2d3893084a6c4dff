"""Who receives each request's outputs, and how many requests count against the capacity: `Consumers`.

An engine that runs its requests elsewhere (`EngineProcess` in a child process, `UpstreamEngine`
on an upstream server) keeps here the ``emit`` of every request in flight. One lock (`lock`)
guards the table and the count; an engine may hold it around more of its own bookkeeping (the
process engine's unsent requests) so that both change together.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from .engine import EngineConfig, check_capacity
from .sequence import ErrorOutput, Output

log = logging.getLogger("lmql_backends.engine.consumers")


class Consumers:
    """The ``emit`` callbacks of the requests in flight, counted against an engine's capacity."""

    def __init__(self):
        self.lock = threading.Lock()
        self._emits: dict[str, Callable[[Output], None]] = {}
        self._num_pending = 0

    @property
    def num_pending(self) -> int:
        """Requests added and neither finished nor forgotten."""
        return self._num_pending

    def __len__(self) -> int:
        return len(self._emits)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._emits

    def add_locked(self, request_id: str, emit: Callable[[Output], None], config: EngineConfig,
                   is_waiting_for_kv: bool = False) -> None:
        """Count a request (OverloadedError when `config`'s capacity is full, see `check_capacity`) and keep
        its `emit`; the caller holds `lock`."""
        check_capacity(self._num_pending, config, is_waiting_for_kv)
        self._num_pending += 1
        self._emits[request_id] = emit

    def get(self, request_id: str) -> Callable[[Output], None] | None:
        return self._emits.get(request_id)

    def forget(self, request_id: str) -> bool:
        """Drop a request's consumer and its slot; whether it was still there."""
        with self.lock:
            emit = self._emits.pop(request_id, None)
            if emit is not None:
                self._num_pending -= 1
        return emit is not None

    def fail_all(self, error: Exception) -> None:
        """Forget every request, then hand each `error` (the engine stopped or is gone)."""
        with self.lock:
            emits, self._emits, self._num_pending = list(self._emits.values()), {}, 0
        for emit in emits:
            emit(ErrorOutput(error))

    def deliver(self, request_id: str, output: Output, abort: Callable[[str], None]) -> None:
        """Hand `output` to its request's consumer if it is still there (the last one frees the
        slot); a consumer that raises is logged and its request aborted with `abort`."""
        emit = self._emits.get(request_id)
        if emit is None:
            return  # aborted while its outputs were on the way
        if output.finish_reason is not None:
            self.forget(request_id)
        try:
            emit(output)
        except Exception:  # one broken consumer must not stop the outputs of the others
            log.exception("could not deliver an output of request %s; aborting it", request_id)
            abort(request_id)
