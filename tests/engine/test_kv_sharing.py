"""Sequences forked from one long past share its KV: no copy, the same logits, one prefix in memory.

On the native GPT-2 forward and on models run through transformers' forward (Llama with
grouped-query attention and rotary positions, Mistral, Qwen2, Qwen3; random weights).
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
    Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
)

from lmql_backends.engine.runner import SHARE_FROM_TOKENS, ModelRunner, SharedPrefixKV, kv_bytes, same_columns

PAST = SHARE_FROM_TOKENS + 20
VOCAB = 300
#: 4 query heads reading 2 key/value heads (grouped-query attention)
SHAPE = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
             intermediate_size=128, max_position_embeddings=512)
#: name -> (model class and config, the runner's model_impl)
MODELS = {
    "gpt2-native": (lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_layer=3, n_head=4, n_embd=32,
                                                       n_positions=256)), "native"),
    "llama": (lambda: LlamaForCausalLM(LlamaConfig(**SHAPE)), "transformers"),
    "mistral": (lambda: MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=None)), "transformers"),
    "qwen2": (lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE)), "transformers"),
    "qwen3": (lambda: Qwen3ForCausalLM(Qwen3Config(**SHAPE, head_dim=16)), "transformers"),
}


def build(name: str):
    """A random-weight model of `MODELS` and a runner of it."""
    make, model_impl = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    return model, ModelRunner(model, model_impl)


def full_logits(model, ids) -> torch.Tensor:
    """Logits [len(ids), V] of one plain forward without a cache (the model's own attention)."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()


def forks(runner, prompt, num_forks, new_ids=(1,)):
    """A past of `prompt` that cannot grow in place, and `num_forks` prefills of `new_ids` after it."""
    _, kv = runner.prefill(prompt + [1], None, 0, False)
    past = kv.prefix(len(prompt))
    return past, [runner.prefill(list(new_ids), past, past.length, True) for _ in range(num_forks)]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forks_of_a_long_past_share_it_and_prefill_the_full_sequences_logits(name):
    model, runner = build(name)
    prompt, new_ids = [i * 7 % VOCAB for i in range(PAST)], [5, 6, 7]
    assert runner.shares_prefixes
    past, outs = forks(runner, prompt, 3, new_ids)
    expected = full_logits(model, prompt + new_ids)[-len(new_ids):]
    for logits, kv in outs:
        assert isinstance(kv, SharedPrefixKV) and same_columns(kv.shared, past) and kv.tail.length == 3
        assert torch.allclose(logits, expected, atol=1e-4)
    # more tokens after a fork's own tail: causal within the new tokens, after the stored ones
    logits, kv = runner.prefill([8, 9], outs[0][1], PAST + 3, True)
    assert isinstance(kv, SharedPrefixKV) and same_columns(kv.shared, past) and kv.tail.length == 5
    assert torch.allclose(logits, full_logits(model, prompt + new_ids + [8, 9])[-2:], atol=1e-4)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_batched_decode_of_forks_reads_the_shared_prefix_and_matches_the_full_sequences(name):
    model, runner = build(name)
    prompt = [i * 11 % VOCAB for i in range(PAST)]
    _, outs = forks(runner, prompt, 3, [4])
    sequences = [prompt + [4, row + 1] for row in range(3)]
    kvs, lengths = [kv for _, kv in outs], [PAST + 1] * 3
    # one fork one token ahead: tails of different lengths (left padding) in one batch
    _, [kvs[0]] = runner.decode([sequences[0][-1]], [kvs[0]], [lengths[0]])
    sequences[0].append(5)
    lengths[0] += 1
    for step in range(4):
        logits, kvs = runner.decode([s[-1] for s in sequences], kvs, lengths)
        for row, sequence in enumerate(sequences):
            assert isinstance(kvs[row], SharedPrefixKV)
            assert torch.allclose(logits[row], full_logits(model, sequence)[-1], atol=1e-4), (step, row)
            sequence.append((step * 3 + row) % VOCAB)
        lengths = [n + 1 for n in lengths]


@pytest.mark.parametrize("name", ["gpt2-native", "llama"])
def test_many_forks_hold_one_prefix_plus_their_tails(name):
    _, runner = build(name)
    past, outs = forks(runner, list(range(PAST)), 16)
    kvs, lengths = [kv for _, kv in outs], [PAST + 1] * 16
    for step in range(8):
        _, kvs = runner.decode([step + 1] * 16, kvs, lengths)
        lengths = [n + 1 for n in lengths]
    column = kv_bytes([past]) // past.length
    assert kv_bytes(kvs) == column * (past.length + 16 * 9)
    assert kv_bytes(kvs[:1]) == column * (past.length + 9)


@pytest.mark.parametrize("name", ["gpt2-native", "llama"])
def test_the_fork_that_grew_the_prefix_in_place_joins_the_shared_batch(name):
    model, runner = build(name)
    prompt = [i * 13 % VOCAB for i in range(PAST)]
    _, kv = runner.prefill(prompt, None, 0, False)
    first = runner.prefill([7], kv, kv.length, False)[1]  # grows the prompt's store in place
    second = runner.prefill([8], kv, kv.length, False)[1]  # shares the prompt's columns
    assert not isinstance(first, SharedPrefixKV) and isinstance(second, SharedPrefixKV)
    logits, kvs = runner.decode([9, 10], [first, second], [first.length, second.length])
    assert all(isinstance(out, SharedPrefixKV) for out in kvs)
    for row, sequence in enumerate([prompt + [7, 9], prompt + [8, 10]]):
        assert torch.allclose(logits[row], full_logits(model, sequence)[-1], atol=1e-4)


@pytest.mark.parametrize("name", ["gpt2-native", "llama"])
def test_with_prefix_sharing_off_forks_copy_the_past_and_give_the_same_logits(name):
    model, runner = build(name)
    runner.prefix_sharing = False
    prompt = [i * 17 % VOCAB for i in range(PAST)]
    past, outs = forks(runner, prompt, 2, [4])
    assert not runner.shares_prefixes and all(not isinstance(kv, SharedPrefixKV) for _, kv in outs)
    logits, kvs = runner.decode([5, 6], [kv for _, kv in outs], [PAST + 1] * 2)
    assert kv_bytes(kvs) == kv_bytes([past]) // past.length * 2 * (PAST + 2)
    assert torch.allclose(logits[1], full_logits(model, prompt + [4, 6])[-1], atol=1e-4)


@pytest.mark.parametrize("name", ["gpt2-native", "llama"])
def test_plain_views_of_one_cached_kv_decode_sharing_it(name):
    """Beams of one parent: each past is a plain view of the parent's store (of the same or shorter
    length); the batch reads the shortest as the shared prefix instead of copying every past."""
    model, runner = build(name)
    prompt = [i * 13 % VOCAB for i in range(PAST)]
    _, parent = runner.prefill(prompt, None, 0, False)
    pasts = [parent.prefix(len(prompt) - 1), parent.prefix(len(prompt) - 1), parent.prefix(len(prompt) - 3)]
    sequences = [prompt[:-1] + [9], prompt[:-1] + [10], prompt[:-3] + [11]]
    logits, kvs = runner.decode([s[-1] for s in sequences], pasts, [p.length for p in pasts])
    for row, sequence in enumerate(sequences):
        assert isinstance(kvs[row], SharedPrefixKV) and kvs[row].shared.store is parent.store
        assert torch.allclose(logits[row], full_logits(model, sequence)[-1], atol=1e-4)
    assert kv_bytes(kvs) < 1.2 * kv_bytes([kvs[0]])  # one prefix plus three short tails
