"""Shared fixtures: the embedded model, config-built models in temp dirs, servers on loopback."""

from __future__ import annotations

import os
import shutil

import pytest

from lmql_backends.process_env import apply_process_defaults

apply_process_defaults(os.environ)  # what serve-model does, before torch is imported
import torch  # noqa: E402

from lmql_backends.models import TINY_MODEL_DIR, TINY_MODEL_NAME

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="session", autouse=True)
def few_threads():
    torch.set_num_threads(1)  # tiny models: more threads only contend on the shared cores


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """The name of the embedded model."""
    return TINY_MODEL_NAME


def build_model_dir(path, architecture: str) -> str:
    """A random-weight model of `architecture` built from a config, with the tiny tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(1234)
    if architecture == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=512, **ids))
    else:
        model = LlamaForCausalLM(LlamaConfig(
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
            intermediate_size=128, max_position_embeddings=1024, **ids,
        ))
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (TINY_MODEL_DIR / name).exists():
            shutil.copy(TINY_MODEL_DIR / name, path / name)
    return str(path)


@pytest.fixture(scope="session")
def gpt2_model_dir(tmp_path_factory) -> str:
    """Path of a random-weight GPT-2-architecture model built from a config."""
    return build_model_dir(tmp_path_factory.mktemp("gpt2-random"), "gpt2")


@pytest.fixture(scope="session")
def llama_model_dir(tmp_path_factory) -> str:
    """Path of a random-weight Llama-architecture model built from a config."""
    return build_model_dir(tmp_path_factory.mktemp("llama-random"), "llama")


@pytest.fixture(scope="session")
def new_server(tiny_model):
    """The embedded model behind the new (OpenAI-like) API on a free loopback port."""
    from lmql_backends.server.app import serve

    handle = serve(tiny_model, port=0, background=True)
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def legacy_server(tiny_model):
    """The embedded model behind the legacy API on a free loopback port."""
    from lmql_backends.server.app import serve

    handle = serve(tiny_model, port=0, legacy=True, background=True)
    yield handle
    handle.stop()


# ---- a chat model (issue 24): ChatML-style template, its turn markers as special tokens ----

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_chat_model_dir(path, chat_template: str | None = CHAT_TEMPLATE) -> str:
    """A random-weight Llama model whose tokenizer (the tiny one plus <|im_start|>/<|im_end|>,
    EOS <|im_end|>) has `chat_template` (None: no template)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = chat_template
    torch.manual_seed(4321)
    model = LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64, intermediate_size=128,
        max_position_embeddings=512, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    ))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory) -> str:
    """Path of a random-weight Llama model with a chat template (CHAT_TEMPLATE)."""
    return build_chat_model_dir(tmp_path_factory.mktemp("chat-model"))


@pytest.fixture(scope="session")
def no_template_model_dir(tmp_path_factory) -> str:
    """Path of the same kind of model whose tokenizer has no chat template."""
    return build_chat_model_dir(tmp_path_factory.mktemp("no-template-model"), chat_template=None)
