"""The runner over transformers' own forward (models the native GPT-2 forward does not cover)."""

from __future__ import annotations

import warnings

import pytest
import torch

from lmql_backends.engine.runner import ModelRunner
from lmql_backends.loader import load_model


def test_transformers_forward_is_silent_and_matches_the_models_own_logits(llama_model_dir):
    model = load_model(llama_model_dir).model
    runner = ModelRunner(model, "transformers")
    ids = [5, 17, 42, 9, 3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. transformers >= 5.24's FutureWarning for `past_key_values`
        _, past = runner.prefill(ids[:-1], None, 0, all_logits=False)
        logits, _ = runner.decode([ids[-1]], [past], [past.length])
    with torch.inference_mode():
        expected = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()
    assert torch.allclose(logits[0], expected, atol=1e-4)


def batched_then_alone(runner, prompts, next_tokens):
    """(logits of prefill_batch then one decode step, the same for each prompt on its own)."""
    batch_logits, kvs = runner.prefill_batch(prompts)
    step_logits, _ = runner.decode(next_tokens, kvs, [len(p) for p in prompts])
    alone_prefill, alone_step = [], []
    for prompt, token in zip(prompts, next_tokens):
        logits, kv = runner.prefill(prompt, None, 0, all_logits=False)
        alone_prefill.append(logits[-1])
        alone_step.append(runner.decode([token], [kv], [len(prompt)])[0][0])
    return (batch_logits, step_logits), (torch.stack(alone_prefill), torch.stack(alone_step))


@pytest.mark.parametrize("impl", ["native", "transformers"])
def test_prefill_batch_of_different_lengths_equals_each_prompt_alone(tiny_model, impl):
    runner = ModelRunner(load_model(tiny_model).model, impl)
    prompts = [[5, 17, 42, 9, 3, 11, 8], [7, 2], [30, 31, 32, 33], [4, 4, 4, 4, 4, 4, 4]]
    batched, alone = batched_then_alone(runner, prompts, [1, 2, 3, 4])
    for got, expected in zip(batched, alone):
        assert torch.allclose(got, expected, atol=1e-4)


def test_prefill_batch_on_a_llama_model_equals_each_prompt_alone(llama_model_dir):
    runner = ModelRunner(load_model(llama_model_dir).model, "transformers")
    prompts = [[5, 17, 42, 9, 3], [7, 2], [30, 31, 32]]
    batched, alone = batched_then_alone(runner, prompts, [1, 2, 3])
    for got, expected in zip(batched, alone):
        assert torch.isfinite(got).all()
        assert torch.allclose(got, expected, atol=1e-4)


def test_prefill_batch_leaves_a_store_the_first_decode_step_reuses(tiny_model):
    runner = ModelRunner(load_model(tiny_model).model)
    _, kvs = runner.prefill_batch([[5, 6, 7], [8, 9]])
    _, next_kvs = runner.decode([1, 2], kvs, [3, 2])
    assert next_kvs[0].store is kvs[0].store and next_kvs[1].store is kvs[0].store  # no repacking copy
