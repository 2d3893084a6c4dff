"""Shared-prefix attention for models that run through transformers' forward (Llama, Mistral, Qwen2...).

transformers' attention layers call the function their config names (``config._attn_implementation``)
from its `AttentionInterface`, passing on the keyword arguments of the model's forward. This
module registers one more function there, under `ATTENTION_NAME`: given the keyword
`SHARED_PREFIX_KEYWORD` (a KV indexed by layer: keys and values [1, K, P, d] of a prefix every
row of the batch starts with), it computes attention as the native GPT-2 forward does
(kv_attention.shared_prefix_attention: the prefix read once for all rows, each row's own keys,
combined by log-sum-exp); the keys the layer passes are the rows' own (the runner's cache holds
only those), at the rows' true positions (the runner passes them, so rotary embeddings are
right). Without that keyword it is transformers' SDPA attention unchanged, and its mask function
is SDPA's.

Nothing changes in the process until a runner is built for a model that can use it
(`register_shared_attention`), and a model's attention is switched to it only for the duration
of the runner's own forward calls that read a shared prefix (`swapped_attention`), then back.

Which models: those whose attention layers go through the interface, of an architecture checked
here to pass nothing the shared path would ignore (`CHECKED_MODEL_TYPES`), on SDPA attention,
with every layer attending to all earlier tokens. `shared_attention_unsupported_reason` says why
another model keeps copying shared prefixes (sliding windows, other attention implementations,
other architectures: soft-capped logits, attention sinks...).
"""

from __future__ import annotations

import contextlib
import threading

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .kv_attention import shared_prefix_attention

#: our name in transformers' attention interface (and its mask interface)
ATTENTION_NAME = "lmql_backends_shared_prefix"
#: the model forward's keyword that carries the shared prefix to every attention layer
SHARED_PREFIX_KEYWORD = "lmql_backends_shared_prefix"
#: model types whose attention layers pass the interface only what the shared path honours
#: (query, keys, values, mask, scaling; no soft-capping, sinks or per-layer windows of their own)
CHECKED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
#: the attention implementation the shared path stands in for (its results, other rounding)
BASE_IMPLEMENTATION = "sdpa"

_registered = threading.Lock()
_is_registered = False
_swaps_lock = threading.Lock()
_swaps: dict[int, int] = {}  # id(model config) -> blocks of swapped_attention running on it


def shared_attention_unsupported_reason(model) -> str | None:
    """Why `model`'s attention cannot read a shared prefix through `ATTENTION_NAME` (None: it can)."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in CHECKED_MODEL_TYPES:
        return (f"its model type {model_type!r} is not one whose attention is checked to go through "
                f"transformers' attention interface unchanged ({', '.join(CHECKED_MODEL_TYPES)})")
    if not type(model)._can_set_attn_implementation():
        return "its attention layers do not go through transformers' attention interface"
    if config._attn_implementation != BASE_IMPLEMENTATION:
        return (f"its attention implementation is {config._attn_implementation!r}; "
                f"sharing stands in for {BASE_IMPLEMENTATION!r} (transformers' default)")
    if any(m.config is not config for m in model.modules() if hasattr(m, "config") and hasattr(m, "layer_idx")):
        return "its attention layers have configs of their own (a composite model)"
    return window_reason(config)


def window_reason(config) -> str | None:
    """Why some layer of `config` may not attend to every earlier token (None: all do).

    A sliding window at least as long as the model's context never hides a token.
    """
    other_kinds = sorted(set(getattr(config, "layer_types", None) or ()) - {"full_attention"})
    if other_kinds:
        return f"some of its layers are {', '.join(other_kinds)} layers, not full attention"
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window is not None and window < getattr(config, "max_position_embeddings", window + 1):
        return f"its layers attend within a sliding window of {window} tokens"
    return None


def register_shared_attention() -> None:
    """Add `ATTENTION_NAME` to transformers' attention and mask interfaces (once per process)."""
    global _is_registered
    with _registered:
        if not _is_registered:
            AttentionInterface.register(ATTENTION_NAME, attention_forward)
            AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
            _is_registered = True


@contextlib.contextmanager
def swapped_attention(model):
    """`model` runs its attention through `ATTENTION_NAME` inside the block, SDPA's again after the last.

    Runners of the same model in several threads may overlap: the model's attention goes back to
    `BASE_IMPLEMENTATION` when the last block ends. Another thread running the model meanwhile
    without a shared prefix is unaffected: the function is then SDPA's, with SDPA's mask.
    """
    config = model.config
    with _swaps_lock:
        _swaps[id(config)] = _swaps.get(id(config), 0) + 1
        config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        with _swaps_lock:
            _swaps[id(config)] -= 1
            if not _swaps[id(config)]:
                del _swaps[id(config)]
                config._attn_implementation = BASE_IMPLEMENTATION


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function signature: output [B, T, H, d] and no weights.

    With `SHARED_PREFIX_KEYWORD`, `key`/`value` [B, K, S, d] are each row's own states after
    the shared prefix and `attention_mask` (SDPA's: boolean, True = attend, or None) covers them.
    """
    shared = kwargs.pop(SHARED_PREFIX_KEYWORD, None)
    if shared is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    shared_keys, shared_values = shared[module.layer_idx]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = shared_prefix_attention(query, shared_keys, shared_values, key, value,
                                  additive(attention_mask, query.dtype), scale)
    return out.transpose(1, 2).contiguous(), None


def additive(mask, dtype):
    """SDPA's mask (boolean, True = attend; or already additive; or None) as an additive one."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return mask.new_zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))

