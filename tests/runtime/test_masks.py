"""Mask primitives and token tables, on hand-made tables and on the embedded tokenizer."""

import pytest
import torch

from lmql_backends.errors import InvalidRequestError
from lmql_backends.runtime.masks import (
    Allowed, char_budget_mask, intersect, model_mask, prefix_mask, regex_index, same_mask, union,
)
from lmql_backends.runtime.tokens import TokenTable, make_token_table, prompt_ids, token_table

VOCAB = [b"<eos>", b"a", b"b", b"ab", b" ", b"1", b"12", b" 3", b"\n", b"x\ny", b"\xc3", b"\xa9", b"caf", b"", b"a"]


@pytest.fixture
def table():
    return TokenTable(tuple(VOCAB), eos_token_id=0, special_ids=frozenset({0}))


def tokens_of(mask):
    return sorted({VOCAB[i] for i in range(len(VOCAB)) if mask[i]})


def test_text_mask_excludes_special_and_empty_tokens(table):
    assert tokens_of(table.text_mask) == sorted(set(VOCAB) - {b"<eos>", b""})


def test_prefix_mask_keeps_value_a_prefix_of_an_option(table):
    assert tokens_of(prefix_mask(table, b"", [b"ab", b"b"])) == [b"a", b"ab", b"b"]
    assert tokens_of(prefix_mask(table, b"a", [b"ab", b"b"])) == [b"b"]
    assert tokens_of(prefix_mask(table, b"ab", [b"ab", b"b"])) == []


def test_prefix_mask_allows_every_id_sharing_the_bytes(table):
    mask = prefix_mask(table, b"", [b"a"])
    assert mask[1] and mask[14]


def test_prefix_mask_handles_multibyte_characters_split_across_tokens(table):
    option = "café".encode()
    assert tokens_of(prefix_mask(table, b"caf", [option])) == [b"\xc3"]
    assert tokens_of(prefix_mask(table, b"caf\xc3", [option])) == [b"\xa9"]


def test_char_budget_counts_characters_not_bytes(table):
    assert tokens_of(char_budget_mask(table, 1)) == sorted([b"a", b"b", b" ", b"1", b"\n", b"\xc3", b"\xa9"])
    assert tokens_of(char_budget_mask(table, -1)) == []
    assert table.num_chars[11] == 0  # a continuation byte starts no character


def test_regex_index_masks_and_final_states(table):
    index = regex_index(table, r"(ab)+")
    start = index.allowed([])
    assert tokens_of(start.tokens) == [b"a", b"ab"] and not start.can_end
    after_ab = index.allowed([3])
    assert tokens_of(after_ab.tokens) == [b"a", b"ab"] and after_ab.can_end
    assert tokens_of(index.allowed([1]).tokens) == [b"b"]
    dead = index.allowed([2])
    assert tokens_of(dead.tokens) == [] and not dead.can_end


def test_regex_index_is_cached_per_table_and_pattern(table):
    assert regex_index(table, "a+") is regex_index(table, "a+")
    assert regex_index(table, "a+") is not regex_index(table, "b+")


def test_regex_over_multibyte_characters(table):
    index = regex_index(table, "café")
    assert tokens_of(index.allowed([12]).tokens) == [b"\xc3"]
    assert index.allowed([12, 10, 11]).can_end


def test_regex_continues_after_a_final_state(table):
    index = regex_index(table, r"[0-9]+(\.[0-9]+)?|(ab)+")
    assert tokens_of(index.allowed([3]).tokens) == [b"a", b"ab"]
    assert tokens_of(index.allowed([6]).tokens) == [b"1", b"12"]


def test_regex_split_character_is_allowed_only_when_it_can_complete(table):
    assert tokens_of(regex_index(table, "(ab)+").allowed([]).tokens) == [b"a", b"ab"]
    assert b"\xc3" in tokens_of(regex_index(table, "é").allowed([]).tokens)
    assert tokens_of(regex_index(table, "é").allowed([10]).tokens) == [b"\xa9"]


@pytest.mark.parametrize("pattern", ["(unclosed", r"(?<=a)b"])
def test_bad_regex_names_the_pattern(table, pattern):
    with pytest.raises(InvalidRequestError, match="REGEX pattern"):
        regex_index(table, pattern)


def test_model_mask_adds_eos_only_when_the_variable_may_end(table):
    tokens = prefix_mask(table, b"", [b"a"])
    assert not model_mask(table, tokens, can_end=False)[0]
    assert model_mask(table, tokens, can_end=True)[0]
    assert model_mask(table, torch.ones(len(VOCAB), dtype=torch.bool), can_end=True) is None


def test_combining_allowed_sets(table):
    a = Allowed(prefix_mask(table, b"", [b"a"]), True)
    b = Allowed(prefix_mask(table, b"", [b"b"]), False)
    assert tokens_of(union(a, b).tokens) == [b"a", b"b"] and union(a, b).can_end
    assert tokens_of(intersect(a, b).tokens) == [] and not intersect(a, b).can_end
    assert intersect(Allowed(None, True), b).tokens is b.tokens
    assert union(Allowed(None, False), b).tokens is None


def test_same_mask():
    x = torch.tensor([True, False])
    assert same_mask(None, None) and same_mask(x, x.clone())
    assert not same_mask(x, None) and not same_mask(x, ~x)


def test_table_of_the_embedded_tokenizer_round_trips_bytes(tiny_model):
    from lmql_backends.loader import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    table = token_table(tokenizer)
    assert table is token_table(tokenizer)  # cached per tokenizer object
    assert table.num_tokens == len(tokenizer)
    assert tokenizer.eos_token_id in table.special_ids and not table.text_mask[tokenizer.eos_token_id]
    text = "Hello, Mr. Darcy! Ça va? 3 × 4 = 12\n"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert table.decode(ids) == text
    assert b"".join(table.token_bytes[i] for i in ids) == text.encode()


def test_first_token_of_is_the_tokenizers_own_first_token(tiny_model):
    from lmql_backends.loader import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    table = token_table(tokenizer)
    for text in [" Darcy", "Ça va", "12345", "\n\nHello", " × 4"]:
        assert table.encode(text) == tokenizer(text, add_special_tokens=False).input_ids
        assert table.first_token_of(text) == tokenizer(text, add_special_tokens=False).input_ids[0]
    assert table.first_token_of("") is None
    assert table.first_token_of.cache_info().maxsize is not None  # bounded memo


def test_prompt_ids_start_with_bos(tiny_model):
    from lmql_backends.loader import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    ids = prompt_ids(tokenizer, "Hello", tokenizer.bos_token_id)
    assert ids[0] == tokenizer.bos_token_id
    assert ids[1:] == tokenizer("Hello", add_special_tokens=False).input_ids
    assert prompt_ids(tokenizer, "", tokenizer.bos_token_id) == [tokenizer.bos_token_id]


def test_table_of_a_sentencepiece_style_vocabulary():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "\u2581the": 2, "cat": 3, "<0x0A>": 4, "\u2581": 5}
    backend = Tokenizer(models.BPE(vocab, [], unk_token=None))
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    table = make_token_table(tokenizer)
    assert table.token_bytes[2:] == (b" the", b"cat", b"\n", b" ")
    assert table.special_ids == {0, 1}
