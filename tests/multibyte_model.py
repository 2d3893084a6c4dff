"""A tiny GPT-2 model whose byte-level BPE splits multi-byte characters across tokens.

The tokenizer is trained here (tokenizers library) on text with accents, emoji and CJK, with a
vocabulary small enough that most non-ASCII characters are spelled with tokens that hold only
part of their UTF-8 bytes. The model is built from a config with seeded random weights and saved
with ``save_pretrained``, so every backend (and LMQL itself) can load the same directory.
"""

from __future__ import annotations

import pathlib

TRAINING_TEXT = [
    "Hello world, café crème brûlée, naïve façade, jalapeño, Ærø, smörgåsbord.",
    "Straße über Größe, déjà vu, São Paulo, Kraków, Zürich, Ελληνικά, русский язык.",
    "日本語のテキスト、中文文本，한국어 텍스트. 東京 北京 서울",
    "Emoji: 😀 😃 🎉 🚀 👍🏽 ❤️ 🐍 🌍 — and “quotes” … ¿qué? ¡sí!",
    "A number: 3, 42, 1999. Your Age: 27! The best of them all.",
    "\n",
]
VOCAB_SIZE = 300
EOS = "<|endoftext|>"


def corpus(repeat: int = 20) -> list[str]:
    return [line for _ in range(repeat) for line in TRAINING_TEXT]


def build_tokenizer():
    """A byte-level BPE trained on `TRAINING_TEXT`, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS)


def build_multibyte_model(path: pathlib.Path, seed: int = 7) -> str:
    """Save the tokenizer and a seeded random 2-layer GPT-2 at `path`; returns the path."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=256, vocab_size=len(tokenizer),
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    name_generic_tokenizer_class(pathlib.Path(path))
    return str(path)


def name_generic_tokenizer_class(path: pathlib.Path) -> None:
    """Name the tokenizer class older transformers releases know (LMQL 0.7.3 pins 4.34)."""
    import json

    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2))
    # tokenizers < 0.15 reads merges only as "a b" strings
    tokenizer_path = path / "tokenizer.json"
    data = json.loads(tokenizer_path.read_text())
    data["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    data["model"].pop("ignore_merges", None)
    tokenizer_path.write_text(json.dumps(data, ensure_ascii=False))


def split_tokens(tokenizer) -> list[int]:
    """Ids of tokens whose bytes are not whole UTF-8 text (part of a multi-byte character)."""
    from lmql_backends.runtime.tokens import token_table

    table = token_table(tokenizer)
    broken = []
    for token_id, data in enumerate(table.token_bytes):
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            broken.append(token_id)
    return broken
