"""The runner's own GPT-2 forward: same logits as transformers' on every kind of pass, chosen only where it applies."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lmql_backends.engine import Engine, EngineConfig, Request
from lmql_backends.engine.sequence import TokenOutput
from lmql_backends.engine.native_gpt2 import unsupported_reason
from lmql_backends.engine.runner import ModelRunner
from lmql_backends.errors import InvalidRequestError
from lmql_backends.loader import load_model

PROMPT = [3, 17, 250, 9, 1000, 42, 7, 7, 300, 12, 5, 88]


def random_gpt2(dtype=torch.float32, **flags) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=300, n_layer=3, n_head=4, n_embd=32, n_positions=128, **flags)
    return GPT2LMHeadModel(config).eval().to(dtype)


def both_runners(model, matmul: str = "blas") -> tuple[ModelRunner, ModelRunner]:
    native, reference = ModelRunner(model, "native"), ModelRunner(model, "transformers")
    native.choose_linear_kernels(matmul, max_rows=8)
    assert native.is_native and not reference.is_native
    return native, reference


def assert_same_logits(native, reference, tolerance: float) -> None:
    assert native.shape == reference.shape
    assert torch.allclose(native, reference, atol=tolerance, rtol=0), (native - reference).abs().max()
    assert torch.equal(native.argmax(-1), reference.argmax(-1))


MODELS = {
    "embedded": lambda tiny: load_model(tiny).model,
    "inverse layer scaling, relu": lambda _: random_gpt2(scale_attn_by_inverse_layer_idx=True, activation_function="relu"),
    "unscaled attention, exact gelu": lambda _: random_gpt2(scale_attn_weights=False, activation_function="gelu"),
}


@pytest.fixture(params=list(MODELS), ids=list(MODELS))
def model(request, tiny_model):
    return MODELS[request.param](tiny_model)


@pytest.fixture(params=["blas", "onednn"])
def matmul(request):
    """The native forward's matrix-product kernels, each forced for every row count."""
    return request.param


def small_prompt(model) -> list[int]:
    return [i % model.config.vocab_size for i in PROMPT]


def test_prefill_with_every_logit_matches_transformers(model, matmul):
    native, reference = both_runners(model, matmul)
    ids = small_prompt(model)
    assert_same_logits(native.prefill(ids, None, 0, True)[0], reference.prefill(ids, None, 0, True)[0], 1e-5)


def test_prefill_after_a_cached_past_matches_transformers(model, matmul):
    native, reference = both_runners(model, matmul)
    ids = small_prompt(model)
    kv_native, kv_reference = native.prefill(ids, None, 0, False)[1], reference.prefill(ids, None, 0, False)[1]
    more = ids[:4]
    got = native.prefill(more, kv_native.prefix(8), 8, True)[0]
    assert_same_logits(got, reference.prefill(more, kv_reference.prefix(8), 8, True)[0], 1e-5)
    assert got.shape[0] == len(more)


def test_batched_decode_of_pasts_of_different_lengths_matches_transformers(model, matmul):
    native, reference = both_runners(model, matmul)
    ids, lengths = small_prompt(model), [3, 12, 7, 1]
    logits = []
    for runner in (native, reference):
        kv = runner.prefill(ids, None, 0, False)[1]
        pasts = [kv.prefix(n) for n in lengths]
        logits.append(runner.decode([5, 6, 7, 8], pasts, lengths)[0])
    assert_same_logits(*logits, 1e-5)


def test_greedy_decoding_step_by_step_matches_transformers(model):
    native, reference = both_runners(model)
    tokens = []
    for runner in (native, reference):
        logits, kv = runner.prefill(small_prompt(model), None, 0, False)
        chosen = []
        for _ in range(20):
            chosen.append(int(logits[-1].argmax()))
            logits, (kv,) = runner.decode([chosen[-1]], [kv], [kv.length])
        tokens.append(chosen)
    assert tokens[0] == tokens[1]


def test_half_precision_weights_give_close_logits():
    native, reference = both_runners(random_gpt2(torch.bfloat16))
    ids = small_prompt(native.model)
    assert_same_logits(native.prefill(ids, None, 0, True)[0], reference.prefill(ids, None, 0, True)[0], 0.05)


def test_auto_uses_the_native_forward_for_gpt2_and_transformers_for_llama(tiny_model, llama_model_dir):
    assert ModelRunner(load_model(tiny_model).model).is_native
    assert not ModelRunner(load_model(llama_model_dir).model).is_native


def test_asking_native_for_a_model_it_cannot_run_names_the_reason(llama_model_dir):
    with pytest.raises(InvalidRequestError, match="model_impl 'native' cannot run this model: the model is a LlamaForCausalLM"):
        ModelRunner(load_model(llama_model_dir).model, "native")


@pytest.mark.parametrize("bad", ["fast", "", None])
def test_an_unknown_model_impl_is_refused_naming_the_value(bad):
    with pytest.raises(InvalidRequestError, match=f"model_impl must be one of auto, native, transformers, got {bad!r}"):
        EngineConfig(model_impl=bad)


def test_gpt2_variants_it_does_not_implement_run_through_transformers():
    assert "reorder_and_upcast_attn" in unsupported_reason(random_gpt2(reorder_and_upcast_attn=True))
    quantized_like = random_gpt2()
    quantized_like.transformer.h[1].mlp.c_fc = torch.nn.Linear(32, 128)  # what a quantizing loader does
    assert "not plain Conv1D" in unsupported_reason(quantized_like)
    assert not ModelRunner(quantized_like).is_native
    offloaded = random_gpt2()
    offloaded.transformer.h[0]._hf_hook = object()  # what accelerate's offloading attaches
    assert "accelerate hooks" in unsupported_reason(offloaded)


def test_engines_on_both_forwards_generate_the_same_tokens_for_concurrent_requests(tiny_model):
    loaded = load_model(tiny_model)
    prompts = [[0, 5, 6], [0, 40, 41, 42, 43, 44], [0, 7]]
    outputs = []
    for model_impl in ("native", "transformers"):
        engine = Engine(loaded, EngineConfig(model_impl=model_impl)).start()
        try:
            assert engine.stats().is_native_forward == (model_impl == "native")
            outputs.append(engine_tokens(engine, prompts))
        finally:
            engine.stop()
    assert outputs[0] == outputs[1] and all(len(tokens) == 24 for tokens in outputs[0])


def engine_tokens(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    """The greedy tokens of `prompts` run together (24 each)."""
    import asyncio

    async def one(prompt):
        return [out.token_id async for out in engine.stream(Request(prompt, max_tokens=24)) if isinstance(out, TokenOutput)]

    async def all_of():
        return await asyncio.gather(*(one(p) for p in prompts))

    return asyncio.run(all_of())
