"""The model runner: the only code that builds tensors for the model and calls it.

Three kinds of forward pass:
- `prefill`: one sequence, any number of new tokens after its cached prefix;
- `prefill_batch`: several sequences without a past, their prompts left-padded to one width;
- `decode`: many sequences, one new token each, with pasts of different lengths. Pasts are
  left-padded to one width; an attention mask hides the padding and explicit position ids
  give every sequence its own positions, so results equal unbatched runs.

Keys and values live in preallocated `KVStore` buffers that the model writes into in place
(no concatenation per step). A sequence's KV is a `StoredKV`: views of one row of a store.
Columns of a store below its `end` are written once and never change, so views can be shared
by the prefix cache and by other sequences. Only a KV whose last column is the store's `end`
may grow in place (claiming the next columns); any other KV is first copied into a new store.
So a sequence never reads columns written by another, and a legacy request that extends the
previous one by a token computes one token without copying its past. A decode batch keeps
its store while its members stay the same; when membership changes, the pasts are repacked.

Branches of one prompt share its KV: a sequence that continues a long KV it cannot grow in place
(a cached prompt other sequences fork from too) is not copied but kept as a `SharedPrefixKV`,
the prompt's columns read where they are and only the new tokens in a tail of its own. A decode
batch whose sequences share one prefix packs only their tails and reads the prefix once per step
(kv_attention.shared_prefix_attention), where the forward supports it (`shares_prefixes`): the
native GPT-2 forward, and transformers' forward of the models whose attention can be swapped for
the function transformers_attention registers (Llama, Mistral, Qwen2, Qwen3 on SDPA, without a
sliding window; `TransformersForward.sharing_unsupported_reason` says why another model copies).
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..errors import InvalidRequestError
from ..loader import MODEL_IMPLS, check_choice
from .linear_kernels import KernelChoice, choose_kernels, uses_onednn
from .native_gpt2 import NativeGpt2Forward, unsupported_reason
from .sequence import KVCache
from .transformers_attention import (
    SHARED_PREFIX_KEYWORD, register_shared_attention, shared_attention_unsupported_reason, swapped_attention,
)

MIN_HEADROOM = 64
#: a past at least this long that cannot grow in place is shared (SharedPrefixKV), a shorter one copied
SHARE_FROM_TOKENS = 64


class KVStore:
    """Per layer keys and values of `rows` sequences: [rows, heads, capacity, head_dim] each.

    Buffers are allocated on the first write of each layer (their shapes come from the model).
    """

    def __init__(self, rows: int, capacity: int, num_layers: int):
        self.rows, self.capacity = rows, capacity
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.end = 0

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor):
        """Write new states at columns [start, start + n); return views of columns [0, start + n)."""
        self.ensure_layer(layer, keys, values)
        stop = start + keys.shape[2]
        self.keys[layer][:, :, start:stop] = keys
        self.values[layer][:, :, start:stop] = values
        return self.keys[layer][:, :, :stop], self.values[layer][:, :, :stop]

    def ensure_layer(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Allocate the buffers of `layer` (zeros) shaped like `keys`/`values` if not done yet."""
        if self.keys[layer] is None:
            self.keys[layer] = self._allocate(keys)
            self.values[layer] = self._allocate(values)

    def _allocate(self, like: torch.Tensor) -> torch.Tensor:
        _, heads, _, width = like.shape
        return like.new_zeros(self.rows, heads, self.capacity, width)

    def column_bytes(self) -> int:
        """Bytes of one column of one row, over every layer's keys and values."""
        return sum(t[0, :, 0].numel() * t.element_size() for t in (*self.keys, *self.values) if t is not None)

    def can_grow(self, stop: int, num_new: int) -> bool:
        """Whether a KV ending at column `stop` may write `num_new` more columns in place."""
        return stop == self.end and self.end + num_new <= self.capacity


class StoredKV:
    """One sequence's KV (a `KVCache`): per layer views [1, heads, length, head_dim] of a store row.

    The views are made when read (most KVs of a decode step are only passed on, never read).
    """

    def __init__(self, store: KVStore, row: int, start: int, stop: int):
        self.store, self.row, self.start, self.stop = store, row, start, stop

    def __len__(self) -> int:
        return self.store.num_layers

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.store.keys[layer], self.store.values[layer]
        rows, columns = slice(self.row, self.row + 1), slice(self.start, self.stop)
        return keys[rows, :, columns], values[rows, :, columns]

    def __iter__(self):
        return (self[layer] for layer in range(len(self)))

    @property
    def length(self) -> int:
        return self.stop - self.start

    def pieces(self) -> list[tuple[KVStore, int, int, int]]:
        """The (store, row, start, stop) column ranges this KV reads."""
        return [(self.store, self.row, self.start, self.stop)]

    def prefix(self, length: int) -> "StoredKV":
        """The KV of the first `length` tokens (views of the same store)."""
        return StoredKV(self.store, self.row, self.start, self.start + length)

    def is_growable(self, num_new: int) -> bool:
        """Whether `num_new` tokens can be appended in place (a one-row store, at its end)."""
        return self.store.rows == 1 and self.store.can_grow(self.stop, num_new)


class SharedPrefixKV:
    """A sequence's KV (a `KVCache`) as a prefix it shares with other sequences and a tail of its own.

    `shared` (columns of a one-row store, never written again) may be held by the prefix cache and
    by any number of sequences; `tail` holds this sequence's tokens after it.
    """

    def __init__(self, shared: StoredKV, tail: StoredKV):
        self.shared, self.tail = shared, tail

    def __len__(self) -> int:
        return self.tail.store.num_layers

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's keys and values as one tensor each (a copy: the batches that mix KVs need it)."""
        (shared_keys, shared_values), (keys, values) = self.shared[layer], self.tail[layer]
        return torch.cat([shared_keys, keys], dim=2), torch.cat([shared_values, values], dim=2)

    def __iter__(self):
        return (self[layer] for layer in range(len(self)))

    @property
    def length(self) -> int:
        return self.shared.length + self.tail.length

    def pieces(self) -> list[tuple[KVStore, int, int, int]]:
        return self.shared.pieces() + self.tail.pieces()

    def prefix(self, length: int) -> "StoredKV | SharedPrefixKV":
        """The KV of the first `length` tokens (views of the same stores)."""
        if length <= self.shared.length:
            return self.shared.prefix(length)
        return SharedPrefixKV(self.shared, self.tail.prefix(length - self.shared.length))


def same_columns(a: StoredKV, b: StoredKV) -> bool:
    """Whether two KVs are views of the same columns of the same store row."""
    return a.store is b.store and a.row == b.row and a.start == b.start and a.stop == b.stop


def common_shared_prefix(pasts) -> StoredKV | None:
    """The prefix all `pasts` start with, else None: the shared part of the first SharedPrefixKV,
    or, when every past is a view of one row of one-row store from the same column (forks of one
    cached KV, e.g. beams of one parent), their shortest common part if it is long enough to share.

    A plain KV of the prefix's own store row that extends it (the fork that grew the prefix in
    place) counts as sharing it.
    """
    shared = next((past.shared for past in pasts if isinstance(past, SharedPrefixKV)), None)
    if shared is None:
        shared = common_plain_prefix(pasts)
    if shared is None or not all(as_shared(past, shared) is not None for past in pasts):
        return None
    return shared


def common_plain_prefix(pasts) -> StoredKV | None:
    """The shortest of `pasts` if all are plain views of one one-row store from one column and it
    has at least SHARE_FROM_TOKENS tokens (else None)."""
    first = pasts[0]
    if not (isinstance(first, StoredKV) and first.store.rows == 1):
        return None
    if not all(isinstance(p, StoredKV) and p.store is first.store and p.start == first.start for p in pasts):
        return None
    shortest = min(pasts, key=lambda p: p.stop)
    return shortest if shortest.length >= SHARE_FROM_TOKENS else None


def as_shared(past, shared: StoredKV) -> "SharedPrefixKV | None":
    """`past` as `shared` and a tail, if it starts with exactly those columns (else None)."""
    if isinstance(past, SharedPrefixKV):
        return past if same_columns(past.shared, shared) else None
    if (isinstance(past, StoredKV) and past.store is shared.store and past.row == shared.row
            and past.start == shared.start and past.stop >= shared.stop):
        return SharedPrefixKV(shared, StoredKV(past.store, past.row, shared.stop, past.stop))
    return None


class StoreLayer(DynamicLayer):
    """One layer of a store seen as a transformers cache layer; new states go in place."""

    def __init__(self, store: KVStore, index: int, length: int):
        super().__init__()
        self.store, self.index, self.length = store, index, length
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = self.store.write(self.index, self.length, key_states, value_states)
        self.keys, self.values = keys, values
        self.length += key_states.shape[2]
        return keys, values

    def get_seq_length(self) -> int:
        return self.length


class StoreCache(Cache):
    """A transformers `Cache` over a `KVStore` whose first `length` columns are filled."""

    def __init__(self, store: KVStore, length: int):
        super().__init__(layers=[StoreLayer(store, i, length) for i in range(store.num_layers)])


class TransformersForward:
    """The model's own transformers forward, with a `StoreCache` over the runner's store.

    Where the model's attention can read a shared prefix (`sharing_unsupported_reason` is None), it does: the prefix's keys and values go to the attention function as they are, the
    cache holds only each row's own states, the positions are each row's true ones.
    """

    def __init__(self, model):
        self.model = model
        self.cache_keyword = cache_keyword(model)
        #: why the model keeps copying shared prefixes into each row (None: it reads them once)
        self.sharing_unsupported_reason = shared_attention_unsupported_reason(model)
        self.shares_prefixes = self.sharing_unsupported_reason is None
        if self.shares_prefixes:
            register_shared_attention()

    def __call__(self, ids, positions, padding, store: KVStore, past_len: int, all_logits: bool,
                 shared=None) -> torch.Tensor:
        """Logits [B, T or 1, V] of `ids` [B, T] after `past_len` stored columns (see NativeGpt2Forward)."""
        kwargs = {self.cache_keyword: StoreCache(store, past_len)}
        if shared is None:
            return self._run(ids, positions, padding, all_logits, kwargs)
        if not self.shares_prefixes:
            raise ValueError(f"this model cannot read a shared prefix: {self.sharing_unsupported_reason}")
        kwargs[SHARED_PREFIX_KEYWORD] = shared
        with swapped_attention(self.model):
            return self._run(ids, positions, padding, all_logits, kwargs)

    def _run(self, ids, positions, padding, all_logits: bool, kwargs: dict) -> torch.Tensor:
        out = self.model(input_ids=ids, position_ids=positions, attention_mask=padding, use_cache=True,
                         logits_to_keep=0 if all_logits else 1, **kwargs)
        return out.logits


def cache_keyword(model) -> str:
    """The forward's name for the KV cache: ``cache`` since transformers 5.24, ``past_key_values`` before
    (5.24 still takes the old name, with a FutureWarning in every forward)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def make_forward(model, model_impl: str = "auto"):
    """The forward pass the runner calls: the native GPT-2 one where it applies (auto), or transformers'."""
    check_choice("model_impl", model_impl, MODEL_IMPLS)
    if model_impl == "transformers":
        return TransformersForward(model)
    reason = unsupported_reason(model)
    if reason is None:
        return NativeGpt2Forward(model)
    if model_impl == "native":
        raise InvalidRequestError(
            f"model_impl 'native' cannot run this model: {reason}; use 'auto' or 'transformers'", "model_impl")
    return TransformersForward(model)


class ModelRunner:
    """Runs a loaded Hugging Face causal LM on token ids with per-sequence KV caches."""

    def __init__(self, model, model_impl: str = "auto"):
        self.model = model
        self.forward = make_forward(model, model_impl)
        self.device = next(model.parameters()).device
        self.num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        #: False: forks copy a shared past into each row even where the forward could read it once
        #: (what every runner did before SharedPrefixKV; benchmarks compare the two)
        self.prefix_sharing = True

    @property
    def is_native(self) -> bool:
        """Whether the runner uses its own forward pass rather than transformers'."""
        return isinstance(self.forward, NativeGpt2Forward)

    def choose_linear_kernels(self, matmul: str, max_rows: int) -> dict[tuple, KernelChoice]:
        """Set the native forward's matrix-product kernels (see linear_kernels.choose_kernels)."""
        if self.is_native:
            return choose_kernels(self.forward.linears, matmul, max_rows)
        if matmul == "onednn":
            raise InvalidRequestError(
                "matmul 'onednn' applies to the native GPT-2 forward only; this model runs through "
                "transformers' forward: use 'auto' or 'blas'", "matmul")
        return {}

    @property
    def num_onednn_linears(self) -> int:
        """How many linear layers run on oneDNN for some row count."""
        if not self.is_native:
            return 0
        return sum(uses_onednn(linear) for linear in self.forward.linears)

    @property
    def packed_weight_bytes(self) -> int:
        """Bytes of the weight copies packed for oneDNN (see linear_kernels)."""
        if not self.is_native:
            return 0
        return sum(linear.packed_bytes for linear in self.forward.linears)

    @torch.inference_mode()
    def prefill(self, new_ids: list[int], past: KVCache | None, past_len: int, all_logits: bool):
        """Run `new_ids` after a cached past; return logits ([n, V] or [1, V]) and the new KV."""
        return self._forward_one(new_ids, past, past_len, all_logits)

    @torch.inference_mode()
    def prefill_batch(self, prompts: list[list[int]]) -> tuple[torch.Tensor, list[KVCache]]:
        """Several prompts without a past in one forward: each one's last-token logits [B, V] and its KV.

        Rows are left-padded to the longest prompt; the padding is masked and every row has its own
        positions, so each row's logits equal its own `prefill`. The store's rows end together,
        ready for the batch's first decode step without a copy.
        """
        lengths = [len(prompt) for prompt in prompts]
        width = max(lengths)
        store = KVStore(len(prompts), with_headroom(width), self.num_layers)
        ids = torch.tensor([[0] * (width - n) + list(p) for p, n in zip(prompts, lengths)], device=self.device)
        positions = torch.tensor([[0] * (width - n) + list(range(n)) for n in lengths], device=self.device)
        padding = self._padding_mask([n - 1 for n in lengths], width - 1)
        logits = self.forward(ids, positions, padding, store, 0, False)
        store.end = width
        kvs = [StoredKV(store, row, width - n, width) for row, n in enumerate(lengths)]
        return logits[:, -1].float().cpu(), kvs

    @torch.inference_mode()
    def decode(self, tokens: list[int], pasts: list[KVCache | None], past_lens: list[int]):
        """One new token for each of several sequences; return logits [B, V] and each new KV."""
        if len(tokens) == 1:
            logits, kv = self._forward_one(tokens, pasts[0], past_lens[0], all_logits=False)
            return logits, [kv]
        shared = common_shared_prefix(pasts) if self.shares_prefixes else None
        if shared is not None:
            pasts, stored_lens = [as_shared(past, shared).tail for past in pasts], [n - shared.length for n in past_lens]
        else:
            stored_lens = past_lens
        store, rows = self._reusable_batch(pasts, stored_lens) or self._pack_batch(pasts, stored_lens)
        width = store.end
        logits = self._forward_batch(store, in_row_order(tokens, rows), in_row_order(past_lens, rows),
                                     in_row_order(stored_lens, rows), shared)
        store.end = width + 1
        kvs = [with_shared(shared, StoredKV(store, row, width - n, width + 1)) for row, n in zip(rows, stored_lens)]
        return logits.index_select(0, torch.tensor(rows)).cpu(), kvs

    @property
    def shares_prefixes(self) -> bool:
        """Whether the forward reads a prefix shared by a batch's rows once (see SharedPrefixKV)."""
        return self.prefix_sharing and getattr(self.forward, "shares_prefixes", False)

    def _forward_batch(self, store: KVStore, tokens: list[int], positions: list[int], lengths: list[int],
                       shared: StoredKV | None) -> torch.Tensor:
        """Logits [B, V] of one token per store row at `positions`; row b has `lengths[b]` stored past tokens."""
        logits = self.forward(
            torch.tensor(tokens, device=self.device)[:, None], torch.tensor(positions, device=self.device)[:, None],
            self._padding_mask(lengths, store.end), store, store.end, False, shared,
        )
        return logits[:, -1].float()

    def _forward_one(self, new_ids: list[int], past: KVCache | None, past_len: int, all_logits: bool):
        shared, past, stored_len = self._split_past(past, past_len, len(new_ids))
        store = self._growable_store(past, stored_len, len(new_ids))
        ids = torch.tensor([new_ids], device=self.device)
        positions = torch.arange(past_len, past_len + len(new_ids), device=self.device)[None]
        logits = self.forward(ids, positions, None, store, stored_len, all_logits, shared)
        store.end = stored_len + len(new_ids)
        return logits[0].float().cpu(), with_shared(shared, StoredKV(store, 0, 0, store.end))

    def _split_past(self, past: KVCache | None, past_len: int, num_new: int):
        """(the prefix the new tokens share, or None; the past after it; that past's length).

        A long past that cannot grow in place is shared rather than copied (see SharedPrefixKV).
        """
        if isinstance(past, SharedPrefixKV) and self.shares_prefixes:
            return past.shared, past.tail, past_len - past.shared.length
        if (isinstance(past, StoredKV) and self.shares_prefixes and past_len >= SHARE_FROM_TOKENS
                and past.store.rows == 1 and not (past.start == 0 and past.is_growable(num_new))):
            return past, None, 0
        return None, past, past_len

    def _growable_store(self, past: KVCache | None, past_len: int, num_new: int) -> KVStore:
        """The one-row store `past` lives in if it can grow in place, else a copy of `past`."""
        if isinstance(past, StoredKV) and past.start == 0 and past.is_growable(num_new):
            return past.store
        store = KVStore(1, with_headroom(past_len + num_new), self.num_layers)
        if past_len:
            copy_past(store, 0, 0, past, past_len)
        return store

    def _reusable_batch(self, pasts, past_lens) -> tuple[KVStore, list[int]] | None:
        """The batch store of the previous step, if exactly these sequences ran in it."""
        first = pasts[0]
        if not isinstance(first, StoredKV):
            return None
        store = first.store
        if store.rows != len(pasts) or store.end >= store.capacity:
            return None
        for past, length in zip(pasts, past_lens):
            if not (isinstance(past, StoredKV) and past.store is store and past.stop == store.end
                    and past.length == length):
                return None
        rows = [past.row for past in pasts]
        return (store, rows) if sorted(rows) == list(range(len(pasts))) else None

    def _pack_batch(self, pasts, past_lens) -> tuple[KVStore, list[int]]:
        """A new store with every past right-aligned (left-padded with zeros) in its own row."""
        width = max(past_lens)
        store = KVStore(len(pasts), with_headroom(width + 1), self.num_layers)
        for row, (past, length) in enumerate(zip(pasts, past_lens)):
            if length:
                copy_past(store, row, width - length, past, length)
        store.end = width
        return store, list(range(len(pasts)))

    def _padding_mask(self, lengths: list[int], width: int) -> torch.Tensor | None:
        """Attention mask [B, width + 1] hiding each row's left padding, for rows of `lengths` tokens
        before the last column (None: no padding)."""
        if all(n == width for n in lengths):
            return None
        first_real = width - torch.tensor(lengths, device=self.device)
        return (torch.arange(width + 1, device=self.device)[None, :] >= first_real[:, None]).long()


def with_shared(shared: StoredKV | None, tail: StoredKV) -> KVCache:
    """`tail` after the shared prefix (just `tail` when nothing is shared)."""
    return tail if shared is None else SharedPrefixKV(shared, tail)


def in_row_order(values: list[int], rows: list[int]) -> list[int]:
    """`values` given per sequence, rearranged so that entry `rows[i]` holds `values[i]`."""
    ordered = [0] * len(values)
    for value, row in zip(values, rows):
        ordered[row] = value
    return ordered


def with_headroom(num_tokens: int) -> int:
    """Store capacity for `num_tokens`: room to grow without reallocating every step."""
    return num_tokens + max(MIN_HEADROOM, num_tokens // 4)


def copy_past(store: KVStore, row: int, column: int, past: KVCache, length: int) -> None:
    """Copy the first `length` positions of `past` into `store` at (row, column)."""
    for layer, (keys, values) in enumerate(past):
        store.ensure_layer(layer, keys, values)
        store.keys[layer][row:row + 1, :, column:column + length] = keys[:, :, :length]
        store.values[layer][row:row + 1, :, column:column + length] = values[:, :, :length]


@torch.inference_mode()
def detach_kv(kv: KVCache) -> KVCache:
    """A KV that keeps nothing else alive: views of a batch store are copied into a one-row store."""
    if isinstance(kv, SharedPrefixKV):
        shared = kv.shared if kv.shared.store.rows == 1 else detach_kv(kv.shared)
        return SharedPrefixKV(shared, detach_kv(kv.tail))
    if isinstance(kv, StoredKV) and kv.store.rows == 1 and kv.start == 0:
        return kv
    if isinstance(kv, StoredKV):
        store = KVStore(1, with_headroom(kv.length), kv.store.num_layers)
        copy_past(store, 0, 0, kv, kv.length)
        store.end = kv.length
        return StoredKV(store, 0, 0, kv.length)
    return [(own(k), own(v)) for k, v in kv]


def kv_bytes(kvs: list[KVCache]) -> int:
    """Bytes of the distinct KV columns `kvs` hold (a column shared by several counts once)."""
    spans: dict[tuple[int, int], list[tuple[int, int]]] = {}
    column_bytes: dict[int, int] = {}
    total = 0
    for kv in kvs:
        if not isinstance(kv, (StoredKV, SharedPrefixKV)):
            total += sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
            continue
        for store, row, start, stop in kv.pieces():
            spans.setdefault((id(store), row), []).append((start, stop))
            if id(store) not in column_bytes:
                column_bytes[id(store)] = store.column_bytes()
    for (store_id, _), intervals in spans.items():
        total += column_bytes[store_id] * covered_length(intervals)
    return total


def covered_length(intervals: list[tuple[int, int]]) -> int:
    """How many integers the half-open `intervals` cover together."""
    covered, reach = 0, None
    for start, stop in sorted(intervals):
        if reach is None or start >= reach:
            covered, reach = covered + stop - start, stop
        elif stop > reach:
            covered, reach = covered + stop - reach, stop
    return covered


def own(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor that does not keep a larger tensor alive."""
    return tensor.clone() if tensor._base is not None else tensor
