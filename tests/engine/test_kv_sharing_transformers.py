"""What sharing a prefix does to a model run through transformers, and which models keep copying.

The exactness and memory of shared prefixes on Llama, Mistral, Qwen2 and Qwen3 are in
test_kv_sharing.py; here: the model's own attention is untouched outside the runner's shared
forward, nothing is registered before a runner needs it, and a model whose attention cannot be
swapped keeps copying, with the reason.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from lmql_backends.engine import transformers_attention
from lmql_backends.engine.runner import ModelRunner, SharedPrefixKV, kv_bytes
from tests.engine.test_kv_sharing import PAST, SHAPE, VOCAB, build, forks, full_logits


def test_the_models_attention_is_its_own_outside_the_runners_shared_forward():
    model, runner = build("llama")
    torch.manual_seed(0)
    reference = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()  # the same weights, never run by a runner
    prompt = [i * 3 % VOCAB for i in range(PAST)]
    forks(runner, prompt, 2)
    assert model.config._attn_implementation == "sdpa"
    assert torch.allclose(full_logits(model, prompt), full_logits(reference, prompt), atol=1e-5)
    # while swapped, a forward without a shared prefix is SDPA's (another thread's call is unchanged)
    with transformers_attention.swapped_attention(model):
        assert model.config._attn_implementation == transformers_attention.ATTENTION_NAME
        assert torch.allclose(full_logits(model, prompt), full_logits(reference, prompt), atol=1e-5)
    assert model.config._attn_implementation == "sdpa"


def test_importing_the_runner_registers_nothing_until_a_sharing_runner_is_built():
    script = f"""
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from lmql_backends.engine.runner import ModelRunner
name = {transformers_attention.ATTENTION_NAME!r}
assert name not in AttentionInterface._global_mapping
runner = ModelRunner(LlamaForCausalLM(LlamaConfig(**{SHAPE!r})).eval(), "transformers")
assert runner.shares_prefixes and name in AttentionInterface._global_mapping
"""
    subprocess.run([sys.executable, "-c", script], check=True)


def sliding_mistral(window: int = 16):
    return MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=window)).eval()


def eager_llama():
    return LlamaForCausalLM(LlamaConfig(**SHAPE, attn_implementation="eager")).eval()


def gpt2_through_transformers():
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, n_positions=256)).eval()


@pytest.mark.parametrize("make_model, reason", [
    (sliding_mistral, "sliding window of 16 tokens"),
    (eager_llama, "implementation is 'eager'"),
    (gpt2_through_transformers, "model type 'gpt2'"),
])
def test_a_model_whose_attention_cannot_be_swapped_keeps_copying_and_says_why(make_model, reason):
    torch.manual_seed(0)
    model = make_model()
    runner = ModelRunner(model, "transformers")
    assert not runner.shares_prefixes and reason in runner.forward.sharing_unsupported_reason
    prompt = [i * 5 % VOCAB for i in range(PAST)]
    past, outs = forks(runner, prompt, 2)
    assert all(not isinstance(kv, SharedPrefixKV) for _, kv in outs)
    logits, kvs = runner.decode([2, 3], [kv for _, kv in outs], [PAST + 1] * 2)
    assert kv_bytes(kvs) == kv_bytes([past]) // past.length * 2 * (PAST + 2)  # each row its own copy
    assert torch.allclose(logits[1], full_logits(model, prompt + [1, 3])[-1], atol=1e-4)
    assert model.config._attn_implementation != transformers_attention.ATTENTION_NAME


def test_a_sliding_window_as_long_as_the_context_hides_nothing_and_shares():
    assert ModelRunner(sliding_mistral(window=SHAPE["max_position_embeddings"]), "transformers").shares_prefixes


def test_overlapping_swaps_of_one_model_restore_its_attention_when_the_last_ends():
    model, _ = build("llama")
    outer = transformers_attention.swapped_attention(model)
    inner = transformers_attention.swapped_attention(model)
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # the other thread's forward is still running: still ours
    assert model.config._attn_implementation == transformers_attention.ATTENTION_NAME
    inner.__exit__(None, None, None)
    assert model.config._attn_implementation == "sdpa"
