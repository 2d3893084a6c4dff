"""Sequences forked from one long past share its KV: no copy, the same logits, one prefix in memory."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lmql_backends.engine.runner import SHARE_FROM_TOKENS, ModelRunner, SharedPrefixKV, kv_bytes, same_columns

PAST = SHARE_FROM_TOKENS + 20


def random_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=300, n_layer=3, n_head=4, n_embd=32, n_positions=256)
    return GPT2LMHeadModel(config).eval()


def full_logits(model, ids) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()


def forks(runner, prompt, num_forks):
    """A past of `prompt` (all but its last token) that cannot grow in place, and its forks."""
    _, kv = runner.prefill(prompt, None, 0, False)
    past = kv.prefix(len(prompt) - 1)
    outs = [runner.prefill(prompt[-1:], past, past.length, False) for _ in range(num_forks)]
    return past, outs


def test_forks_of_a_long_past_share_it_and_give_the_full_sequences_logits():
    model = random_gpt2()
    runner, prompt = ModelRunner(model, "native"), [i * 7 % 300 for i in range(PAST)]
    past, outs = forks(runner, prompt, 3)
    for logits, kv in outs:
        assert isinstance(kv, SharedPrefixKV) and same_columns(kv.shared, past)
        assert kv.tail.length == 1
        assert torch.allclose(logits[-1], full_logits(model, prompt), atol=1e-4)


def test_batched_decode_of_forks_reads_the_shared_prefix_and_matches_the_full_sequences():
    model = random_gpt2()
    runner, prompt = ModelRunner(model, "native"), [i * 11 % 300 for i in range(PAST)]
    _, outs = forks(runner, prompt, 3)
    sequences = [prompt + [row + 1] for row in range(3)]
    kvs, lengths = [kv for _, kv in outs], [len(prompt)] * 3
    # one fork one token ahead: tails of different lengths in one batch
    _, [kvs[0]] = runner.decode([sequences[0][-1]], [kvs[0]], [lengths[0]])
    sequences[0].append(5)
    lengths[0] += 1
    for step in range(4):
        logits, kvs = runner.decode([s[-1] for s in sequences], kvs, lengths)
        for row, sequence in enumerate(sequences):
            assert isinstance(kvs[row], SharedPrefixKV)
            assert torch.allclose(logits[row], full_logits(model, sequence), atol=1e-4), (step, row)
        for row, sequence in enumerate(sequences):
            sequence.append((step * 3 + row) % 300)
        lengths = [n + 1 for n in lengths]


def test_many_forks_hold_one_prefix_plus_their_tails():
    runner, prompt = ModelRunner(random_gpt2(), "native"), list(range(PAST))
    past, outs = forks(runner, prompt, 16)
    kvs, lengths = [kv for _, kv in outs], [len(prompt)] * 16
    for step in range(8):
        _, kvs = runner.decode([step + 1] * 16, kvs, lengths)
        lengths = [n + 1 for n in lengths]
    column = kv_bytes([past]) // past.length
    assert kv_bytes(kvs) == column * (past.length + 16 * 9)
    assert kv_bytes(kvs[:1]) == column * (past.length + 9)


def test_the_transformers_forward_keeps_copying_pasts(llama_model_dir):
    from lmql_backends.loader import load_model

    runner = ModelRunner(load_model(llama_model_dir).model, "transformers")
    past, outs = forks(runner, list(range(5, 5 + PAST)), 2)
    assert not runner.shares_prefixes
    assert all(not isinstance(kv, SharedPrefixKV) for _, kv in outs)


def test_the_fork_that_grew_the_prefix_in_place_joins_the_shared_batch():
    model = random_gpt2()
    runner, prompt = ModelRunner(model, "native"), [i * 13 % 300 for i in range(PAST)]
    _, kv = runner.prefill(prompt, None, 0, False)
    first = runner.prefill([7], kv, kv.length, False)[1]  # grows the prompt's store in place
    second = runner.prefill([8], kv, kv.length, False)[1]  # shares the prompt's columns
    assert not isinstance(first, SharedPrefixKV) and isinstance(second, SharedPrefixKV)
    logits, kvs = runner.decode([9, 10], [first, second], [first.length, second.length])
    assert all(isinstance(out, SharedPrefixKV) for out in kvs)
    for row, sequence in enumerate([prompt + [7, 9], prompt + [8, 10]]):
        assert torch.allclose(logits[row], full_logits(model, sequence), atol=1e-4)


def test_plain_views_of_one_cached_kv_decode_sharing_it():
    """Beams of one parent: each past is a plain view of the parent's store (of the same or shorter
    length); the batch reads the shortest as the shared prefix instead of copying every past."""
    model = random_gpt2()
    runner, prompt = ModelRunner(model, "native"), [i * 13 % 300 for i in range(PAST)]
    _, parent = runner.prefill(prompt, None, 0, False)
    pasts = [parent.prefix(len(prompt) - 1), parent.prefix(len(prompt) - 1), parent.prefix(len(prompt) - 3)]
    sequences = [prompt[:-1] + [9], prompt[:-1] + [10], prompt[:-3] + [11]]
    logits, kvs = runner.decode([s[-1] for s in sequences], pasts, [p.length for p in pasts])
    for row, sequence in enumerate(sequences):
        assert isinstance(kvs[row], SharedPrefixKV) and kvs[row].shared.store is parent.store
        assert torch.allclose(logits[row], full_logits(model, sequence), atol=1e-4)
    assert kv_bytes(kvs) < 1.2 * kv_bytes([kvs[0]])  # one prefix plus three short tails
