"""KV memory: what a token's keys and values cost, what the engine holds, and the ``--kv-cache-bytes`` bound.

One token (one KV column) costs layers x 2 (keys and values) x KV heads x head dim x the dtype's size,
read from the model's config; that is what `runner.kv_bytes` measures per column. What is held is
measured: the distinct columns that running sequences and prefix-cache entries reference (a column
several of them share counts once), so branches of one prompt cost one prompt plus their tails. Only
what a sequence may still add is estimated: up to prompt + max_tokens tokens, less the past it has
computed, or the cached past it will share (one the runner shares rather than copies: `shares_from`).

The bound covers everything the engine holds, the running sequences and the prefix cache together:

- a request whose prompt plus max_tokens alone needs more than the bound can never run: it is refused
  at once (`KVCacheLimitError`);
- a waiting sequence starts when what is held plus what the running sequences and it may still add
  (up to prompt + max_tokens each) fits; least recently used prefix-cache entries are evicted to make
  room first. Otherwise it waits, and the ones behind it too (first come, first served), until running
  sequences finish; with nothing running, the first waiting sequence always starts;
- after each step, cache entries are evicted while the total is over the bound, and if the running
  sequences alone still exceed it (their KV grew past the estimate: a shared past copied), the newest
  are preempted: their KV is dropped and they go back to the front of the queue, to be recomputed
  (from the prefix cache where it still holds their past) and continued where they stopped.
"""

from __future__ import annotations

import dataclasses
import math

from ..errors import InvalidRequestError, KVCacheLimitError
from .prefix_cache import PrefixCache
from .runner import kv_bytes
from .sequence import Request, Sequence


def kv_bytes_per_token(model) -> int:
    """Bytes of one token's keys and values over every layer: layers x 2 x KV heads x head dim x dtype size."""
    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers * 2 * kv_heads * head_dim * model.dtype.itemsize


def check_limit(limit_bytes) -> None:
    """InvalidRequestError unless `limit_bytes` is None (no bound) or a positive integer."""
    if limit_bytes is not None and (not isinstance(limit_bytes, int) or isinstance(limit_bytes, bool) or limit_bytes < 1):
        raise InvalidRequestError(
            f"kv_cache_bytes must be a positive number of bytes or None (no bound), got {limit_bytes!r}", "kv_cache_bytes"
        )


@dataclasses.dataclass(frozen=True)
class KVMemory:
    """What the engine holds in KV memory, in bytes (shared columns counted once); served at /metrics."""

    #: held by running sequences
    used_bytes: int = 0
    #: of `used_bytes`, columns that more than one running sequence reads
    shared_bytes: int = 0
    #: held by the prefix cache's entries (some may be shared with running sequences)
    prefix_cache_bytes: int = 0
    #: everything held: running sequences and prefix cache together
    total_bytes: int = 0
    #: what the running sequences may still add (up to prompt + max_tokens each)
    reserved_bytes: int = 0

    @property
    def private_bytes(self) -> int:
        return self.used_bytes - self.shared_bytes


class KVBudget:
    """The engine's KV memory: measured, and kept under `limit_bytes` (None: no bound)."""

    def __init__(self, limit_bytes: int | None, bytes_per_token: int, context_length: int, cache: PrefixCache,
                 shares_from: int | None = None):
        """`shares_from`: a cached past at least this long is shared by the runner, not copied (None: always copied)."""
        check_limit(limit_bytes)
        self.limit_bytes, self.bytes_per_token = limit_bytes, bytes_per_token
        self.context_length, self.cache, self.shares_from = context_length, cache, shares_from
        self._cache_bytes: int | None = None  # the cache's bytes, until it changes

    # ---- requests ----------------------------------------------------------------------
    def check_fits_alone(self, request: Request) -> None:
        """KVCacheLimitError when `request` needs more than the bound even alone."""
        if self.limit_bytes is None:
            return
        num_tokens = len(request.prompt_ids) + request.max_tokens
        if num_tokens * self.bytes_per_token > self.limit_bytes:
            raise KVCacheLimitError(
                f"the prompt has {len(request.prompt_ids)} tokens and max_tokens is {request.max_tokens}: their KV "
                f"needs {num_tokens * self.bytes_per_token} bytes ({self.bytes_per_token} per token), more than this "
                f"server's --kv-cache-bytes bound of {self.limit_bytes} bytes ({self.limit_bytes // self.bytes_per_token}"
                f" tokens); send a shorter prompt or a smaller max_tokens, or start the server with a larger "
                f"--kv-cache-bytes", "max_tokens",
            )

    def admits(self, seq: Sequence, running: list[Sequence]) -> bool:
        """Whether `seq` (its cached prefix attached) may start beside `running`; evicts cache entries to make room."""
        if self.limit_bytes is None:
            return True
        reserved = self.reserved_bytes([*running, seq])
        if self.upper_bound([*running, seq]) + reserved <= self.limit_bytes:
            return True
        excess = self._evict_while_over(held_kvs([*running, seq]), reserved)
        return excess <= 0 or not running

    def to_preempt(self, running: list[Sequence]) -> list[Sequence]:
        """After a step: evict cache entries while everything held is over the bound; the newest running
        sequences to preempt while the running ones alone still exceed it (never the last one)."""
        if self.limit_bytes is None:
            return []
        if self.upper_bound(running) <= self.limit_bytes:
            return []
        self._evict_while_over(held_kvs(running), 0)
        active, victims = [seq for seq in running if seq.kv is not None], []
        while len(active) > 1 and kv_bytes(held_kvs(active)) > self.limit_bytes:
            victims.append(active.pop())
        return victims

    def _evict_while_over(self, kvs: list, reserved: int) -> int:
        """Evict least recently used cache entries while held + `reserved` exceeds the bound; the excess left."""
        excess = self._total_bytes(kvs) + reserved - self.limit_bytes
        while excess > 0 and self.cache.entries:
            self.cache.evict_oldest(math.ceil(excess / self.bytes_per_token))
            self.cache_changed()
            excess = self._total_bytes(kvs) + reserved - self.limit_bytes
        return excess

    # ---- measuring ---------------------------------------------------------------------
    def cache_changed(self) -> None:
        """Say that prefix-cache entries were added or removed (its bytes are measured again when asked)."""
        self._cache_bytes = None

    def upper_bound(self, seqs: list[Sequence]) -> int:
        """At least what `seqs` and the cache hold (no measure: each sequence's KV covers its computed tokens)."""
        return sum(seq.num_computed for seq in seqs if seq.kv is not None) * self.bytes_per_token + self.cache_bytes()

    def cache_bytes(self) -> int:
        if self._cache_bytes is None:
            self._cache_bytes = kv_bytes(self._cached_kvs())
        return self._cache_bytes

    def _cached_kvs(self) -> list:
        return [entry.kv for entry in self.cache.entries.values()]

    def _total_bytes(self, kvs: list) -> int:
        return kv_bytes(kvs + self._cached_kvs())

    def reserved_bytes(self, seqs: list[Sequence]) -> int:
        return sum(self.reserved_tokens(seq) for seq in seqs) * self.bytes_per_token

    def reserved_tokens(self, seq: Sequence) -> int:
        """Columns `seq` may still add, up to prompt + max_tokens. Until its first forward since its prefix
        was attached, a cached past counts too unless the runner will share it (`shares_from`)."""
        target = min(len(seq.request.prompt_ids) + seq.request.max_tokens, self.context_length)
        if seq.num_computed > seq.num_cached:  # it has run: its KV is its own
            kept = seq.num_computed
        elif self.shares_from is not None and seq.num_cached >= self.shares_from:
            kept = seq.num_cached
        else:
            kept = 0
        return max(0, target - kept)

    def measure(self, running: list[Sequence]) -> KVMemory:
        """What is held now (a few kv_bytes passes over the running sequences: call it now and then)."""
        kvs = held_kvs(running)
        used = kv_bytes(kvs)
        private = sum(used - kv_bytes(kvs[:i] + kvs[i + 1:]) for i in range(len(kvs))) if len(kvs) > 1 else used
        return KVMemory(
            used_bytes=used, shared_bytes=used - private, prefix_cache_bytes=self.cache_bytes(),
            total_bytes=self._total_bytes(kvs), reserved_bytes=self.reserved_bytes(running),
        )

    def free_bytes(self, memory: KVMemory) -> int:
        """What the bound leaves beside what is held and reserved (0 without a bound)."""
        if self.limit_bytes is None:
            return 0
        return max(0, self.limit_bytes - memory.total_bytes - memory.reserved_bytes)


def held_kvs(seqs: list[Sequence]) -> list:
    return [seq.kv for seq in seqs if seq.kv is not None]
