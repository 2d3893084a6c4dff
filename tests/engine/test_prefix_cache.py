"""Prefix cache unit tests on hand-made tensors (and the in-place KV stores it shares)."""

from __future__ import annotations

import pytest
import torch

from lmql_backends.engine.prefix_cache import BLOCK_SIZE, PrefixCache, block_hashes
from lmql_backends.engine.runner import KVStore, StoredKV, copy_past, detach_kv

pytestmark = pytest.mark.timeout(30)

NUM_LAYERS, NUM_HEADS, HEAD_DIM = 2, 2, 3


def make_kv(ids) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A KV whose every position holds its token id (keys) and minus it (values), per layer."""
    column = torch.tensor(ids, dtype=torch.float32)[None, None, :, None]
    keys = column.expand(1, NUM_HEADS, len(ids), HEAD_DIM)
    return [((keys + 1000 * layer).clone(), (-keys - 1000 * layer).clone()) for layer in range(NUM_LAYERS)]


def ids_in(kv) -> list[int]:
    """The token ids a KV made by `make_kv` holds (checking every layer agrees)."""
    ids = kv[0][0][0, 0, :, 0].tolist()
    for layer, (keys, values) in enumerate(kv):
        assert keys.shape == (1, NUM_HEADS, len(ids), HEAD_DIM)
        assert keys[0, :, :, :].sub(1000 * layer).eq(torch.tensor(ids)[None, :, None]).all()
        assert values.neg().sub(1000 * layer).eq(torch.tensor(ids)[None, :, None]).all()
    return [int(t) for t in ids]


def seq(start: int, length: int) -> list[int]:
    return list(range(start, start + length))


def stored(cache: PrefixCache, ids) -> None:
    cache.insert(ids, make_kv(ids))


# ---- lookup ---------------------------------------------------------------------------
def test_empty_cache_misses():
    cache = PrefixCache(1000)
    hit = cache.lookup(seq(1, 40), 39)
    assert hit.num_tokens == 0 and hit.kv is None
    assert cache.hit_rate == 0.0


@pytest.mark.parametrize("length", [1, 5, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 3 * BLOCK_SIZE + 7])
def test_lookup_returns_the_kv_of_the_stored_prefix(length):
    cache = PrefixCache(1000)
    stored(cache, seq(1, length))
    hit = cache.lookup(seq(1, length) + [999], length)
    assert hit.num_tokens == length
    assert ids_in(hit.kv) == seq(1, length)


def test_lookup_respects_max_length():
    cache = PrefixCache(1000)
    stored(cache, seq(1, 40))
    hit = cache.lookup(seq(1, 40), 23)
    assert hit.num_tokens == 23
    assert ids_in(hit.kv) == seq(1, 23)


@pytest.mark.parametrize("shared", [1, 7, BLOCK_SIZE, BLOCK_SIZE + 2, 2 * BLOCK_SIZE + 15])
def test_partial_block_matches(shared):
    cache = PrefixCache(1000)
    stored(cache, seq(1, 50))
    query = seq(1, shared) + [777] * 20
    hit = cache.lookup(query, len(query) - 1)
    assert hit.num_tokens == shared
    assert ids_in(hit.kv) == seq(1, shared)


def test_no_match_when_the_first_token_differs():
    cache = PrefixCache(1000)
    stored(cache, seq(1, 40))
    assert cache.lookup(seq(2, 40), 39).num_tokens == 0


def test_lookup_picks_the_longest_prefix():
    cache = PrefixCache(1000)
    base = seq(1, 40)
    stored(cache, base[:20] + [500] * 10)
    stored(cache, base[:33] + [600] * 10)
    stored(cache, base[:5] + [700] * 40)
    hit = cache.lookup(base, 39)
    assert hit.num_tokens == 33
    assert ids_in(hit.kv) == base[:33]


def test_branches_are_kept_apart():
    cache = PrefixCache(1000)
    prompt = seq(1, 20)
    left, right = prompt + seq(100, 12), prompt + seq(200, 12)
    stored(cache, left)
    stored(cache, right)
    assert len(cache.entries) == 2 and cache.num_tokens == 64
    assert ids_in(cache.lookup(left + [5], 40).kv) == left
    assert ids_in(cache.lookup(right + [5], 40).kv) == right
    assert ids_in(cache.lookup(prompt + [300], 20).kv) == prompt


def test_hit_rate_counts_looked_up_tokens():
    cache = PrefixCache(1000)
    stored(cache, seq(1, 30))
    cache.lookup(seq(1, 30) + [0] * 10, 39)  # 30 of 40 tokens hit
    cache.lookup(seq(500, 10), 9)  # 0 of 10
    assert cache.hit_rate == pytest.approx(30 / 50)
    assert cache.num_lookups == 2 and cache.num_hits == 1


def test_hash_collision_is_not_trusted(monkeypatch):
    """Blocks are found by hash, but a hit is only served after comparing the ids."""
    import lmql_backends.engine.prefix_cache as prefix_cache

    monkeypatch.setattr(prefix_cache, "block_hashes", lambda ids, num_blocks=None: [0] * (len(ids) // BLOCK_SIZE))
    cache = PrefixCache(1000)
    stored(cache, seq(1, 40))
    other = [1] + seq(500, 39)  # same first token and (forced) same block hashes, different ids
    assert cache.lookup(other, 39).num_tokens <= 1


# ---- insert ---------------------------------------------------------------------------
def test_storing_an_extension_replaces_its_prefix():
    cache = PrefixCache(1000)
    stored(cache, seq(1, 20))
    stored(cache, seq(1, 25))
    stored(cache, seq(1, 40))
    assert len(cache.entries) == 1
    assert cache.num_tokens == 40
    assert ids_in(cache.lookup(seq(1, 40), 22).kv) == seq(1, 22)


def test_storing_a_prefix_of_an_entry_adds_nothing():
    cache = PrefixCache(1000)
    stored(cache, seq(1, 40))
    stored(cache, seq(1, 30))
    assert len(cache.entries) == 1 and cache.num_tokens == 40


def test_storing_the_same_ids_twice_keeps_one_entry():
    cache = PrefixCache(1000)
    stored(cache, seq(1, 17))
    stored(cache, seq(1, 17))
    assert len(cache.entries) == 1 and cache.num_tokens == 17


def test_entry_larger_than_the_cache_is_not_stored():
    cache = PrefixCache(30)
    stored(cache, seq(1, 31))
    assert cache.num_tokens == 0 and not cache.entries


def test_views_of_a_larger_tensor_are_copied_on_insert():
    batch = torch.arange(2 * NUM_HEADS * 10 * HEAD_DIM, dtype=torch.float32).view(2, NUM_HEADS, 10, HEAD_DIM)
    view = batch[1:2, :, 2:10]
    cache = PrefixCache(100)
    cache.insert(seq(1, 8), [(view, view)])
    stored_keys = cache.entries[next(iter(cache.entries))].kv[0][0]
    assert stored_keys._base is None
    assert torch.equal(stored_keys, view)


def test_clear_empties_the_cache():
    cache = PrefixCache(1000)
    stored(cache, seq(1, 20))
    stored(cache, seq(50, 20))
    cache.clear()
    assert cache.num_tokens == 0 and not cache.entries and not cache.by_block and not cache.by_first_token


# ---- eviction -------------------------------------------------------------------------
def test_least_recently_used_entry_is_evicted_first():
    cache = PrefixCache(50)
    a, b, c = seq(1, 20), seq(100, 20), seq(200, 20)
    stored(cache, a)
    stored(cache, b)
    cache.lookup(a + [0], 20)  # a is now more recent than b
    stored(cache, c)
    assert cache.num_tokens == 40 <= cache.max_tokens
    assert cache.lookup(b + [0], 20).num_tokens == 0
    assert cache.lookup(a + [0], 20).num_tokens == 20
    assert cache.lookup(c + [0], 20).num_tokens == 20


def test_token_bound_holds_under_many_inserts():
    cache = PrefixCache(100)
    for i in range(60):
        stored(cache, [i % 7] + seq(1000 * i, 5 + (i * 13) % 40))
        assert cache.num_tokens <= cache.max_tokens
        assert cache.num_tokens == sum(len(e.ids) for e in cache.entries.values())
    assert cache.num_tokens > 50  # the cache is used, not emptied


def assert_indexes_match_entries(cache: PrefixCache) -> None:
    """Every index of `cache` is exactly what its entries imply (as if each had been added anew)."""
    by_block, by_first, short_by_first = {}, {}, {}
    for key, entry in cache.entries.items():
        assert entry.block_hashes == tuple(block_hashes(entry.ids))
        for h in entry.block_hashes:
            by_block.setdefault(h, set()).add(key)
        by_first.setdefault(entry.ids[0], set()).add(key)
        if len(entry.ids) < BLOCK_SIZE:
            short_by_first.setdefault(entry.ids[0], set()).add(key)
    assert dict(cache.by_block) == by_block and dict(cache.by_first_token) == by_first
    assert dict(cache.short_by_first_token) == short_by_first
    assert len({entry.ids for entry in cache.entries.values()}) == len(cache.entries)  # no two hold the same ids
    assert cache.num_tokens == sum(len(entry.ids) for entry in cache.entries.values())


def test_growing_an_entry_token_by_token_keeps_the_indexes_exact():
    """The legacy protocol's pattern: each request is the previous sequence plus one token."""
    cache = PrefixCache(1000)
    ids = seq(1, 5)
    stored(cache, ids)
    for token in range(100, 100 + 2 * BLOCK_SIZE + 3):  # crosses two block boundaries
        assert cache.lookup(ids + [token], len(ids)).num_tokens == len(ids)
        ids = ids + [token]
        stored(cache, ids)
        assert [e.ids for e in cache.entries.values()] == [tuple(ids)]
        assert_indexes_match_entries(cache)
    assert ids_in(cache.lookup(ids + [7], len(ids)).kv) == ids


def test_replacing_several_prefixes_keeps_the_indexes_exact():
    cache = PrefixCache(1000)
    base = seq(1, 40)
    for ids in (base[:3], base[:20], base[:35] + [900], base[:33]):
        stored(cache, ids)
    stored(cache, base)
    assert sorted(len(e.ids) for e in cache.entries.values()) == [36, 40]
    assert_indexes_match_entries(cache)
    cache.insert(base, make_growable_kv(base))  # same ids, a KV that can grow: replaces the entry
    assert len(cache.entries) == 2
    assert_indexes_match_entries(cache)


def test_an_insert_weighs_only_entries_sharing_its_first_block_or_shorter_than_a_block():
    """Sequences that all start with BOS: an insert must not compare itself with every one of them."""
    cache = PrefixCache(100_000)
    for start in range(50):
        stored(cache, [0] + seq(100 * start + 1, 40))  # BOS, then a different first block each
    stored(cache, [0, 5001, 5002])  # short: a prefix of the next one
    ids = [0] + seq(101, 40) + [9, 9]  # extends the second entry
    hashes = tuple(block_hashes(ids))
    weighed = {tuple(cache.entries[key].ids) for key, _ in cache._overlapping(ids, hashes)}
    assert weighed == {tuple([0] + seq(101, 40)), (0, 5001, 5002)}
    stored(cache, ids)
    held = {entry.ids for entry in cache.entries.values()}
    assert tuple(ids) in held and tuple([0] + seq(101, 40)) not in held
    assert len(cache.entries) == 51
    stored(cache, [0, 5001, 5002] + seq(7000, 20))  # the short entry grows past a block
    assert len(cache.entries) == 51
    assert_indexes_match_entries(cache)


def test_eviction_cleans_the_indexes():
    cache = PrefixCache(40)
    stored(cache, seq(1, 40))
    stored(cache, seq(100, 40))
    assert len(cache.entries) == 1
    assert set(cache.by_first_token) == {100}
    assert set(cache.by_block) == set(block_hashes(seq(100, 40)))
    assert_indexes_match_entries(cache)


# ---- the KV stores the cache shares with running sequences -----------------------------
def make_store(ids, rows=1, capacity=64) -> StoredKV:
    store = KVStore(rows, capacity, NUM_LAYERS)
    copy_past(store, 0, 0, make_kv(ids), len(ids))
    store.end = len(ids)
    return StoredKV(store, 0, 0, len(ids))


def test_stored_kv_prefix_is_a_view_of_the_same_store():
    kv = make_store(seq(1, 10))
    head = kv.prefix(4)
    assert head.store is kv.store and head.length == 4
    assert ids_in(head) == seq(1, 4)


def test_only_the_kv_at_the_end_of_its_store_can_grow_in_place():
    kv = make_store(seq(1, 10), capacity=12)
    assert kv.is_growable(2)
    assert not kv.is_growable(3)  # over capacity
    assert not kv.prefix(9).is_growable(1)  # column 9 is already written: growing would overwrite it


def test_a_cached_prefix_of_a_store_is_served_from_the_cache_unchanged():
    cache = PrefixCache(1000)
    kv = make_store(seq(1, 20))
    cache.insert(seq(1, 20), kv)
    hit = cache.lookup(seq(1, 20) + [5], 20)
    assert isinstance(hit.kv, StoredKV) and hit.kv.store is kv.store
    assert ids_in(hit.kv) == seq(1, 20)


def test_views_of_a_batch_store_are_detached_into_their_own_store():
    store = KVStore(3, 32, NUM_LAYERS)
    for row, ids in enumerate([seq(1, 6), seq(100, 9), seq(200, 4)]):
        copy_past(store, row, 9 - len(ids), make_kv(ids), len(ids))
    store.end = 9
    row_kv = StoredKV(store, 1, 0, 9)
    detached = detach_kv(row_kv)
    assert detached.store is not store and detached.store.rows == 1
    assert ids_in(detached) == seq(100, 9)
    assert detached.is_growable(1)
    padded = StoredKV(store, 2, 5, 9)
    assert ids_in(detach_kv(padded)) == seq(200, 4)


def test_storing_an_extension_replaces_every_stored_prefix_of_it():
    cache = PrefixCache(1000)
    base = seq(1, 40)
    stored(cache, base[:20])  # a prefix sharing one full block
    stored(cache, base[:35] + [900])  # a branch sharing two full blocks
    stored(cache, base)
    assert sorted(len(e.ids) for e in cache.entries.values()) == [36, 40]
    assert cache.num_tokens == 76


# ---- re-running a cached sequence ------------------------------------------------------
def make_growable_kv(ids) -> StoredKV:
    """`make_kv(ids)` copied into a one-row store with room to grow (as the runner makes them)."""
    store = KVStore(1, len(ids) + 8, NUM_LAYERS)
    copy_past(store, 0, 0, make_kv(ids), len(ids))
    store.end = len(ids)
    return StoredKV(store, 0, 0, len(ids))


def test_a_growable_copy_of_a_cached_prefix_is_kept_and_preferred_on_a_tie():
    cache = PrefixCache(1000)
    long = seq(1, 40)
    cache.insert(long, make_growable_kv(long))
    copy = make_growable_kv(long[:20])  # computed in a store of its own after a prefix hit
    cache.insert(long[:20], copy)
    assert len(cache.entries) == 2
    hit = cache.lookup(long[:21], 20)  # the next row: both entries match 20 tokens
    assert hit.num_tokens == 20 and hit.kv.store is copy.store and hit.kv.is_growable(1)
    assert cache.lookup(long, 30).kv.store is not copy.store  # a longer match still wins


def test_a_covered_kv_that_cannot_grow_is_not_stored_twice():
    cache = PrefixCache(1000)
    long = seq(1, 40)
    cache.insert(long, make_growable_kv(long))
    cache.insert(long[:20], make_kv(long[:20]))  # plain tensors: nothing to gain
    cache.insert(long[:20], cache.lookup(long[:21], 20).kv)  # a view of the stored entry itself
    assert len(cache.entries) == 1
