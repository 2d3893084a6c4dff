"""The per-client store of finished legacy results, collected by ``GET /results/<client_id>``.

Each result is delivered once; results nobody collects are bounded in age, number and bytes
per client (extension 7), and long-polls wait on the client's event (extension 5).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time

log = logging.getLogger("lmql_backends.server.legacy")


@dataclasses.dataclass(frozen=True)
class ResultLimits:
    """How long and how many uncollected results are kept per client before being dropped."""

    max_age_seconds: float = 600.0
    max_results_per_client: int = 4096
    max_bytes_per_client: int = 256 * 2**20
    sweep_every_seconds: float = 10.0


@dataclasses.dataclass(eq=False)
class ClientResults:
    """Finished results of one client, oldest first, and the event long-polls wait on."""

    items: collections.deque = dataclasses.field(default_factory=collections.deque)
    num_bytes: int = 0
    num_waiters: int = 0
    ready: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


class ResultStore:
    """Results per ``"<ip>-<client_id>"`` key, each delivered once, bounded in age and size."""

    def __init__(self, limits: ResultLimits = ResultLimits()):
        self.limits = limits
        self.clients: dict[str, ClientResults] = {}
        self.num_dropped = 0
        self.is_closed = False
        self._last_sweep = time.monotonic()

    def put(self, key: str, payload: bytes) -> None:
        """Store one encoded result and wake the client's long-polls."""
        entry = self.clients.setdefault(key, ClientResults())
        entry.items.append((time.monotonic(), payload))
        entry.num_bytes += len(payload)
        self._drop_over_limit(key, entry)
        entry.ready.set()
        self._maybe_sweep()

    def take_all(self, key: str) -> list[bytes]:
        """Remove and return every result of `key` (oldest first)."""
        entry = self.clients.get(key)
        if entry is None:
            return []
        payloads = [payload for _, payload in entry.items]
        entry.items.clear()
        entry.num_bytes = 0
        entry.ready.clear()
        self._forget_if_idle(key, entry)
        return payloads

    async def wait_for_results(self, key: str, seconds: float) -> None:
        """Return once `key` has a result, or after `seconds`."""
        if self.is_closed:
            return
        entry = self.clients.setdefault(key, ClientResults())
        entry.num_waiters += 1
        try:
            await wait_until_ready(entry, seconds, self)
        finally:
            entry.num_waiters -= 1
            self._forget_if_idle(key, entry)

    def close(self) -> None:
        """End every long-poll now (server shutdown); later polls answer without waiting."""
        self.is_closed = True
        for entry in self.clients.values():
            entry.ready.set()

    def _drop_over_limit(self, key: str, entry: ClientResults) -> None:
        limits = self.limits
        while len(entry.items) > 1 and (
            len(entry.items) > limits.max_results_per_client or entry.num_bytes > limits.max_bytes_per_client
        ):
            self._drop_oldest(key, entry, "the client holds too many uncollected results")

    def _drop_oldest(self, key: str, entry: ClientResults, reason: str) -> None:
        _, payload = entry.items.popleft()
        entry.num_bytes -= len(payload)
        self.num_dropped += 1
        log.warning("dropped an uncollected result of client %s: %s", key, reason)

    def _maybe_sweep(self) -> None:
        now = time.monotonic()
        if now - self._last_sweep >= self.limits.sweep_every_seconds:
            self._last_sweep = now
            self.sweep(now)

    def sweep(self, now: float) -> None:
        """Drop results older than the age limit; forget clients with nothing left."""
        oldest_allowed = now - self.limits.max_age_seconds
        for key, entry in list(self.clients.items()):
            while entry.items and entry.items[0][0] < oldest_allowed:
                self._drop_oldest(key, entry, "not collected in time")
            self._forget_if_idle(key, entry)

    def _forget_if_idle(self, key: str, entry: ClientResults) -> None:
        if not entry.items and entry.num_waiters == 0 and self.clients.get(key) is entry:
            del self.clients[key]


async def wait_until_ready(entry: ClientResults, seconds: float, store: ResultStore) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not entry.items and not store.is_closed:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return
        entry.ready.clear()
        try:
            await asyncio.wait_for(entry.ready.wait(), remaining)
        except TimeoutError:
            return
