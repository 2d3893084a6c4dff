"""Handing outputs from the engine thread to event loops: one wake-up per loop per batch.

``loop.call_soon_threadsafe`` writes to the loop's self-pipe on every call, so a decode step of
8 streams would wake a server's loop 8 times (8 system calls, 8 handovers of the GIL). A
`LoopMailbox` wakes its loop once: the first item posted after a flush schedules the flush,
later ones only join the queue; the flush then runs every callback in posting order.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import weakref
from typing import Any, Callable


class LoopMailbox:
    """Callbacks posted from any thread, run in order on one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: collections.deque[tuple[Callable[[Any], None], Any]] = collections.deque()
        self._lock = threading.Lock()
        self._is_scheduled = False

    def post(self, callback: Callable[[Any], None], item: Any) -> None:
        """Run ``callback(item)`` on the loop soon; RuntimeError if the loop is closed."""
        with self._lock:
            self._items.append((callback, item))
            if self._is_scheduled:
                return
            self._is_scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the loop is closed: every later post must hear it too
            with self._lock:
                self._is_scheduled = False
                self._items.clear()
            raise

    def _flush(self) -> None:
        with self._lock:
            items, self._items = self._items, collections.deque()
            self._is_scheduled = False
        for callback, item in items:
            callback(item)


class Mailboxes:
    """One `LoopMailbox` per event loop, forgotten with the loop."""

    def __init__(self):
        self._by_loop: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def of(self, loop: asyncio.AbstractEventLoop) -> LoopMailbox:
        with self._lock:
            mailbox = self._by_loop.get(loop)
            if mailbox is None:
                mailbox = self._by_loop[loop] = LoopMailbox(loop)
            return mailbox
