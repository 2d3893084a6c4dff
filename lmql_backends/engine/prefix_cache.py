"""Prefix KV cache: keeps the keys/values of recently run token sequences.

A lookup returns the KV of the longest stored prefix of the asked ids. Stored sequences are
indexed by chained hashes of their full 16-token blocks (as in vLLM); the match is then
extended token by token inside the best entry, so any prefix length can hit. The KV of a
prefix of a stored sequence is a slice of that sequence's KV, so storing a sequence that
extends an entry replaces the entry. Memory is bounded by `max_tokens` (least recently used
entries are evicted). Stored columns are never rewritten (see runner.py: only the KV ending at
its store's end may grow, in place, beyond it), so entries can be shared safely.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools

from .runner import SharedPrefixKV, StoredKV, detach_kv
from .sequence import KVCache

BLOCK_SIZE = 16


@dataclasses.dataclass(eq=False)
class CacheEntry:
    ids: tuple[int, ...]
    kv: KVCache
    block_hashes: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class CacheHit:
    num_tokens: int
    kv: KVCache | None


def block_hashes(ids) -> list[int]:
    """Chained hashes of the full blocks of `ids` (each hash covers the whole prefix)."""
    hashes, previous = [], 0
    for b in range(len(ids) // BLOCK_SIZE):
        previous = hash((previous, tuple(ids[b * BLOCK_SIZE:(b + 1) * BLOCK_SIZE])))
        hashes.append(previous)
    return hashes


def common_prefix_length(a, b, start: int = 0) -> int:
    n = min(len(a), len(b))
    i = start
    while i < n and a[i] == b[i]:
        i += 1
    return i


def num_equal_leading(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """How many leading chained hashes `a` and `b` share (equal at i implies equal before i)."""
    low, high = 0, min(len(a), len(b))
    while low < high:  # binary search: equality only holds on a leading run
        middle = (low + high + 1) // 2
        if a[middle - 1] == b[middle - 1]:
            low = middle
        else:
            high = middle - 1
    return low


def slice_kv(kv: KVCache, length: int) -> KVCache:
    """The KV of the first `length` tokens, as views."""
    if isinstance(kv, (StoredKV, SharedPrefixKV)):
        return kv.prefix(length)
    return [(k[:, :, :length], v[:, :, :length]) for k, v in kv]


def is_growable_copy(kv: KVCache, stored: KVCache) -> bool:
    """Whether `kv` lives in a store of its own that it can grow in place, unlike `stored`'s."""
    return (isinstance(kv, StoredKV) and kv.start == 0 and kv.is_growable(1)
            and not (isinstance(stored, StoredKV) and stored.store is kv.store))


class PrefixCache:
    """LRU cache of token-sequence KV, bounded by the number of stored tokens."""

    def __init__(self, max_tokens: int = 32768):
        self.max_tokens = max_tokens
        self.entries: collections.OrderedDict[int, CacheEntry] = collections.OrderedDict()
        self.by_block: dict[int, set[int]] = collections.defaultdict(set)
        self.by_first_token: dict[int, set[int]] = collections.defaultdict(set)
        self.short_by_first_token: dict[int, set[int]] = collections.defaultdict(set)  # < one block
        self.num_tokens = 0
        self.num_lookups = self.num_hits = self.num_hit_tokens = self.num_lookup_tokens = 0
        self._keys = itertools.count()

    def lookup(self, ids, max_length: int) -> CacheHit:
        """KV of the longest stored prefix of ids[:max_length] (sliced views, read only)."""
        self.num_lookups += 1
        self.num_lookup_tokens += len(ids)
        key, length = self._best_match(ids, max_length)
        if key is None or length == 0:
            return CacheHit(0, None)
        self.entries.move_to_end(key)
        self.num_hits += 1
        self.num_hit_tokens += length
        return CacheHit(length, slice_kv(self.entries[key].kv, length))

    def _best_match(self, ids, max_length: int) -> tuple[int | None, int]:
        """The entry sharing the longest prefix with ids[:max_length]; on a tie, one that ends there.

        An entry matched to its full length can grow in place (see `insert`): preferring it
        keeps a re-run of a cached sequence from copying its past for every token.
        """
        best_key, best_rank = None, (0, False)
        for key, start in self._candidates(ids, max_length):
            stored = self.entries[key].ids
            length = common_prefix_length(stored, ids[:max_length], start)
            if length and not self._is_verified(stored, ids, start):
                continue
            rank = (length, length == len(stored))
            if rank > best_rank:
                best_key, best_rank = key, rank
        return best_key, best_rank[0]

    @staticmethod
    def _is_verified(stored, ids, num_hashed: int) -> bool:
        """Whether the tokens matched through block hashes really are equal (no hash collision)."""
        return tuple(stored[:num_hashed]) == tuple(ids[:num_hashed])

    def _candidates(self, ids, max_length: int) -> list[tuple[int, int]]:
        """Entries sharing the most full blocks with `ids`, with the length known to match."""
        keys, matched = set(), 0
        for b, h in enumerate(block_hashes(ids[:max_length])):
            hit = self.by_block.get(h)
            if not hit:
                break
            keys, matched = hit, (b + 1) * BLOCK_SIZE
        if not keys and ids:
            keys = self.by_first_token.get(ids[0], set())
        return [(key, matched) for key in keys]

    def _overlapping(self, ids, hashes: tuple[int, ...]) -> list[tuple[int, int]]:
        """Every entry that may be a prefix of `ids` or hold all of it, with the length known to
        match: its full blocks whose chained hashes equal those of `ids`.

        Such an entry shares the first block of `ids`, unless one of the two is shorter than a
        block; so entries that merely start with the same token (e.g. BOS: often all of them)
        are not scanned one by one.
        """
        if hashes:
            keys = self.by_block.get(hashes[0], set()) | self.short_by_first_token.get(ids[0], set())
        else:
            keys = self.by_first_token.get(ids[0], ())
        entries = self.entries
        return [(key, BLOCK_SIZE * num_equal_leading(entries[key].block_hashes, hashes)) for key in keys]

    def insert(self, ids, kv: KVCache) -> None:
        """Store the KV of `ids`, replacing stored entries that are prefixes of it.

        When a stored entry already holds all of `ids`, the new KV is kept too only if it can grow
        in place where the entry's cannot (it was copied out of the entry to compute `ids`); an
        entry with exactly these ids is then replaced, so no two entries hold the same ids.
        """
        ids = tuple(ids)
        if len(ids) == 0 or len(ids) > self.max_tokens:
            return
        hashes = tuple(block_hashes(ids))
        prefixes = []
        for key, start in self._overlapping(ids, hashes):
            entry = self.entries[key]
            length = common_prefix_length(entry.ids, ids, start)
            if length < min(len(ids), len(entry.ids)) or not self._is_verified(entry.ids, ids, start):
                continue
            if length == len(ids):
                self.entries.move_to_end(key)  # an entry already holds all of it
                if not is_growable_copy(kv, entry.kv):
                    return
            if length == len(entry.ids):
                prefixes.append(key)
        self._store(CacheEntry(ids, detach_kv(kv), hashes), prefixes)
        self._evict()

    def _store(self, entry: CacheEntry, prefixes: list[int]) -> None:
        """Add `entry` in place of the stored entries that are prefixes of it (the longest keeps its key)."""
        prefixes.sort(key=lambda key: len(self.entries[key].ids))
        for key in prefixes[:-1]:
            self._remove(key)
        if prefixes:
            self._replace(prefixes[-1], entry)
        else:
            self._add(entry)

    def _replace(self, key: int, entry: CacheEntry) -> None:
        """Put `entry` under the key of its stored prefix: only its new blocks join the index."""
        old = self.entries.pop(key)
        if len(old.ids) < BLOCK_SIZE <= len(entry.ids):
            self._discard(self.short_by_first_token, old.ids[0], key)
        for h in entry.block_hashes[len(old.block_hashes):]:
            self.by_block[h].add(key)
        self.entries[key] = entry
        self.num_tokens += len(entry.ids) - len(old.ids)

    def _add(self, entry: CacheEntry) -> None:
        key = next(self._keys)
        self.entries[key] = entry
        for h in entry.block_hashes:
            self.by_block[h].add(key)
        self.by_first_token[entry.ids[0]].add(key)
        if len(entry.ids) < BLOCK_SIZE:
            self.short_by_first_token[entry.ids[0]].add(key)
        self.num_tokens += len(entry.ids)

    def _remove(self, key: int) -> None:
        entry = self.entries.pop(key)
        for h in entry.block_hashes:
            self._discard(self.by_block, h, key)
        self._discard(self.by_first_token, entry.ids[0], key)
        if len(entry.ids) < BLOCK_SIZE:
            self._discard(self.short_by_first_token, entry.ids[0], key)
        self.num_tokens -= len(entry.ids)

    @staticmethod
    def _discard(index: dict, h: int, key: int) -> None:
        index[h].discard(key)
        if not index[h]:
            del index[h]

    def _evict(self) -> None:
        while self.num_tokens > self.max_tokens and self.entries:
            self._remove(next(iter(self.entries)))

    def evict_oldest(self, num_tokens: int) -> int:
        """Evict least recently used entries until `num_tokens` tokens went (or the cache is empty); how many went."""
        evicted = 0
        while evicted < num_tokens and self.entries:
            key = next(iter(self.entries))
            evicted += len(self.entries[key].ids)
            self._remove(key)
        return evicted

    def clear(self) -> None:
        for key in list(self.entries):
            self._remove(key)

    @property
    def hit_rate(self) -> float:
        """Fraction of looked-up tokens that were served from the cache."""
        return self.num_hit_tokens / self.num_lookup_tokens if self.num_lookup_tokens else 0.0

