"""A model whose output layer is larger than its tokenizer never yields ids the tokenizer lacks."""

from __future__ import annotations

import shutil

import pytest
import torch

import lmql_backends
from lmql_backends.client.base import restrict_to_tokenizer
from lmql_backends.models import TINY_MODEL_DIR


def test_restrict_to_tokenizer_only_changes_every_token_masks():
    mask = torch.tensor([True, False])
    assert restrict_to_tokenizer(mask, 2, 5) is mask
    assert restrict_to_tokenizer(None, 4, 4) is None
    assert restrict_to_tokenizer(None, 3, 5).tolist() == [True, True, True]


@pytest.fixture(scope="module")
def padded_model_dir(tmp_path_factory):
    """GPT-2 with 4096 output rows, the extra ones strongly favoured, and the 2048-token tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("padded-vocab")
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=128, vocab_size=4096,
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    with torch.no_grad():
        model.transformer.wte.weight[len(tokenizer):] *= 50  # padding rows would win every argmax
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_MODEL_DIR / name, path / name)
    return str(path)


@pytest.mark.timeout(120)
def test_padded_vocab_query_agrees_and_stays_in_the_tokenizer(padded_model_dir):
    from lmql_backends.loader import load_tokenizer

    num_tokens = len(load_tokenizer(padded_model_dir))
    query = 'argmax "Hello[X]" where len(TOKENS(X)) < 6'
    local = lmql_backends.run_sync(query, model=f"local:{padded_model_dir}")
    server = lmql_backends.serve(padded_model_dir, port=0, background=True)
    legacy = lmql_backends.serve(padded_model_dir, port=0, legacy=True, background=True)
    try:
        new = lmql_backends.run_sync(query, model=lmql_backends.model(padded_model_dir, endpoint=server.endpoint))
        old = lmql_backends.run_sync(query, model=lmql_backends.model(padded_model_dir, endpoint=legacy.endpoint),
                                     decoder=lmql_backends.argmax(backend="legacy"))
    finally:
        server.stop()
        legacy.stop()
    assert local.variables["X"] and new.variables == local.variables == old.variables
    ids = load_tokenizer(padded_model_dir)(local.variables["X"], add_special_tokens=False).input_ids
    assert all(i < num_tokens for i in ids)
