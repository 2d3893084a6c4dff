"""Attention over a shared prefix plus private tails, combined by log-sum-exp, on hand-made tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmql_backends.engine.kv_attention import (
    attention_with_lse, attention_with_lse_reference, combine_parts, shared_prefix_attention,
)


def tensors(*shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator)


def test_combining_two_parts_equals_attention_over_all_keys():
    query, keys, values = tensors(2, 3, 4, 8), tensors(2, 3, 10, 8, seed=1), tensors(2, 3, 10, 8, seed=2)
    first = attention_with_lse_reference(query, keys[:, :, :6], values[:, :, :6], None, 0.3)
    second = attention_with_lse_reference(query, keys[:, :, 6:], values[:, :, 6:], None, 0.3)
    out, lse = combine_parts(*first, *second)
    expected = F.scaled_dot_product_attention(query, keys, values, scale=0.3)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(lse, torch.logsumexp(query @ keys.transpose(-1, -2) * 0.3, -1), atol=1e-5)


def test_a_part_whose_keys_are_all_hidden_gets_no_weight():
    out_a, out_b = torch.full((1, 2, 4), 5.0), torch.ones(1, 2, 4)
    lse_a, lse_b = torch.full((1, 2), float("-inf")), torch.zeros(1, 2)
    out, lse = combine_parts(out_a, lse_a, out_b, lse_b)
    assert torch.equal(out, out_b) and torch.equal(lse, lse_b)


@pytest.mark.parametrize("causal", [False, True])
def test_the_fused_kernel_gives_the_reference_output_and_log_sum_exp(causal):
    query, keys, values = tensors(2, 3, 5, 8), tensors(2, 3, 5, 8, seed=1), tensors(2, 3, 5, 8, seed=2)
    mask = None if causal else torch.zeros(2, 1, 5, 5).index_fill_(3, torch.tensor([0, 1]), float("-inf"))
    got, expected = (f(query, keys, values, mask, 0.5, causal)
                     for f in (attention_with_lse, attention_with_lse_reference))
    assert torch.allclose(got[0], expected[0], atol=1e-5) and torch.allclose(got[1], expected[1], atol=1e-5)


def test_shared_prefix_attention_equals_each_row_attending_to_prefix_and_its_padded_tail():
    batch, heads, prefix, width, tail = 3, 2, 7, 4, 5
    query = tensors(batch, heads, 1, width)
    shared_keys, shared_values = tensors(1, heads, prefix, width, seed=1), tensors(1, heads, prefix, width, seed=2)
    keys, values = tensors(batch, heads, tail, width, seed=3), tensors(batch, heads, tail, width, seed=4)
    lengths = [5, 2, 1]  # real tail columns of each row, left-padded
    mask = torch.zeros(batch, 1, 1, tail)
    for row, n in enumerate(lengths):
        mask[row, :, :, :tail - n] = float("-inf")
    got = shared_prefix_attention(query, shared_keys, shared_values, keys, values, mask, 0.5)
    for row, n in enumerate(lengths):
        all_keys = torch.cat([shared_keys[0], keys[row, :, tail - n:]], dim=1)
        all_values = torch.cat([shared_values[0], values[row, :, tail - n:]], dim=1)
        expected = F.scaled_dot_product_attention(query[row], all_keys, all_values, scale=0.5)
        assert torch.allclose(got[row], expected, atol=1e-5)


def test_shared_prefix_attention_of_several_new_tokens_is_causal_in_the_tail():
    heads, prefix, width, num_new = 2, 6, 4, 3
    query = tensors(1, heads, num_new, width)
    shared_keys, shared_values = tensors(1, heads, prefix, width, seed=1), tensors(1, heads, prefix, width, seed=2)
    keys, values = tensors(1, heads, num_new, width, seed=3), tensors(1, heads, num_new, width, seed=4)
    got = shared_prefix_attention(query, shared_keys, shared_values, keys, values, None, 0.5)
    all_keys, all_values = torch.cat([shared_keys, keys], 2), torch.cat([shared_values, values], 2)
    allowed = torch.ones(num_new, prefix + num_new, dtype=torch.bool).tril(prefix)
    expected = F.scaled_dot_product_attention(query, all_keys, all_values, attn_mask=allowed, scale=0.5)
    assert torch.allclose(got, expected, atol=1e-5)


def repeat_heads(tensor, groups):
    """Each key head repeated for its group of query heads, as grouped-query attention reads them."""
    return tensor.repeat_interleave(groups, dim=1)


@pytest.mark.parametrize("num_new", [1, 3])
def test_grouped_query_shared_prefix_attention_equals_attention_over_repeated_key_heads(num_new):
    batch, heads, kv_heads, prefix, width, tail = 3, 4, 2, 7, 4, 5
    query = tensors(batch, heads, num_new, width)
    shared_keys, shared_values = tensors(1, kv_heads, prefix, width, seed=1), tensors(1, kv_heads, prefix, width, seed=2)
    keys, values = tensors(batch, kv_heads, tail, width, seed=3), tensors(batch, kv_heads, tail, width, seed=4)
    lengths = [5, 4, 3]  # real tail columns of each row, left-padded, the last `num_new` the queries' own
    allowed = torch.ones(batch, 1, num_new, tail, dtype=torch.bool)
    for row, n in enumerate(lengths):
        allowed[row, :, :, :tail - n] = False
    allowed &= torch.ones(num_new, tail, dtype=torch.bool).tril(tail - num_new)
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
    got = shared_prefix_attention(query, shared_keys, shared_values, keys, values, mask, 0.5)
    all_keys = repeat_heads(torch.cat([shared_keys.expand(batch, -1, -1, -1), keys], 2), heads // kv_heads)
    all_values = repeat_heads(torch.cat([shared_values.expand(batch, -1, -1, -1), values], 2), heads // kv_heads)
    full_mask = torch.cat([torch.zeros(batch, 1, num_new, prefix), mask], 3)
    expected = F.scaled_dot_product_attention(query, all_keys, all_values, attn_mask=full_mask, scale=0.5)
    assert torch.allclose(got, expected, atol=1e-5)


def test_grouped_query_shared_prefix_attention_of_several_new_tokens_without_a_mask_is_causal():
    heads, kv_heads, prefix, width, num_new = 6, 2, 5, 4, 3
    query = tensors(1, heads, num_new, width)
    shared_keys, shared_values = tensors(1, kv_heads, prefix, width, seed=1), tensors(1, kv_heads, prefix, width, seed=2)
    keys, values = tensors(1, kv_heads, num_new, width, seed=3), tensors(1, kv_heads, num_new, width, seed=4)
    got = shared_prefix_attention(query, shared_keys, shared_values, keys, values, None, 0.5)
    all_keys = repeat_heads(torch.cat([shared_keys, keys], 2), 3)
    all_values = repeat_heads(torch.cat([shared_values, values], 2), 3)
    allowed = torch.ones(num_new, prefix + num_new, dtype=torch.bool).tril(prefix)
    expected = F.scaled_dot_product_attention(query, all_keys, all_values, attn_mask=allowed, scale=0.5)
    assert torch.allclose(got, expected, atol=1e-5)
