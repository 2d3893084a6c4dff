"""The runner over transformers' own forward (models the native GPT-2 forward does not cover)."""

from __future__ import annotations

import warnings

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
