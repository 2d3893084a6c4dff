"""Attention over a prefix that a batch's sequences share, read once for all of them ("cascade").

Sequences forked from one prompt (``sample(n)`` branches, beams, a distribution's options) keep
one copy of the prompt's keys and values and a private tail each (see runner.SharedPrefixKV).
Attention of their queries is then computed in two parts and combined exactly:

- the shared part: the queries of every sequence of the batch against the shared keys, as one
  attention call (the batch folded into the query length), so the prefix is read once per step;
- the private part: each sequence's queries against its own tail (padding and causality masked);
- the combination: each part's output comes with the log-sum-exp of its scores; the softmax
  over all keys is their weighted sum, weights ``exp(lse_part - lse_all)`` (`combine_parts`).

Both parts run through torch's fused CPU attention kernel that also returns the log-sum-exp
(`torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`, the kernel behind
`scaled_dot_product_attention` on CPU); other devices use the same formula written out.
"""

from __future__ import annotations

import torch


def attention_with_lse(query, keys, values, mask, scale: float, is_causal: bool = False):
    """Softmax attention and the log-sum-exp of its scores: ([B, H, T, d], [B, H, T]).

    `mask` is additive (0 / -inf), broadcastable to [B, H, T, S], or None; `is_causal` (with
    T == S) hides the keys after each query.
    """
    if query.device.type == "cpu" and query.dtype in (torch.float32, torch.float64, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, keys, values, 0.0, is_causal, attn_mask=mask, scale=scale)
        return out, lse
    return attention_with_lse_reference(query, keys, values, mask, scale, is_causal)


def attention_with_lse_reference(query, keys, values, mask, scale: float, is_causal: bool = False):
    """`attention_with_lse` written out (any device and dtype; the tests' reference)."""
    scores = (query.float() @ keys.float().transpose(-1, -2)) * scale
    if is_causal:
        length = scores.shape[-1]
        hidden = torch.ones(length, length, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    if mask is not None:
        scores = scores + mask
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.exp(scores - lse[..., None]) @ values.float()
    return out.to(query.dtype), lse


def combine_parts(out_a, lse_a, out_b, lse_b):
    """Attention over the keys of two parts from each part's attention and log-sum-exp.

    out_*: [..., T, d], lse_*: [..., T]. Returns the combined output and log-sum-exp.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    weight_a = torch.exp(lse_a - lse).unsqueeze(-1)
    weight_b = torch.exp(lse_b - lse).unsqueeze(-1)
    return out_a * weight_a.to(out_a.dtype) + out_b * weight_b.to(out_b.dtype), lse


def shared_prefix_attention(query, shared_keys, shared_values, keys, values, mask, scale: float):
    """Attention of `query` [B, H, T, d] over a shared prefix and each row's own keys.

    shared_keys/values: [1, K, P, d], seen by every query of every row; keys/values:
    [B, K, S, d], row b's own (its last T are the queries' own tokens); `mask` (additive,
    [B, 1, T or 1, S]) hides padding and later tokens, None: no padding (causal when T > 1).
    K divides H (grouped-query attention: query heads k * H/K ... (k + 1) * H/K - 1 read key
    head k); each key head's group of query heads is folded into the query length, so no key
    is repeated per query head.
    """
    batch, heads, length, width = query.shape
    kv_heads = keys.shape[1]
    groups = heads // kv_heads
    grouped = query.reshape(batch, kv_heads, groups * length, width)
    rows = groups * length
    folded = grouped.transpose(0, 1).reshape(1, kv_heads, batch * rows, width)
    out_shared, lse_shared = attention_with_lse(folded, shared_keys, shared_values, None, scale)
    out_shared = out_shared.view(kv_heads, batch, rows, width).transpose(0, 1)
    lse_shared = lse_shared.view(kv_heads, batch, rows).transpose(0, 1)
    own_mask, is_causal = grouped_mask(mask, groups, length, keys.shape[2], query)
    out_own, lse_own = attention_with_lse(grouped, keys, values, own_mask, scale, is_causal)
    out = combine_parts(out_shared, lse_shared, out_own, lse_own)[0]
    return out.reshape(batch, heads, length, width)


def grouped_mask(mask, groups: int, length: int, num_keys: int, like: torch.Tensor):
    """The tail part's (mask, is_causal) for queries whose head groups are folded into their length.

    Query row g * T + t is token t of head g of its group: it gets row t of `mask`. Causality
    of several tokens without a mask is `is_causal` when nothing is folded, else a mask.
    """
    if mask is None and (length == 1 or groups == 1):
        return None, length > 1
    if mask is None:
        hidden = torch.ones(length, num_keys, dtype=torch.bool, device=like.device).triu(num_keys - length + 1)
        mask = torch.zeros(hidden.shape, dtype=like.dtype, device=like.device).masked_fill_(hidden, float("-inf"))
        mask = mask[None, None]
    if groups == 1 or mask.shape[2] == 1:
        return mask, False
    return mask.repeat(1, 1, groups, 1), False
