"""The text helpers of the new API (server/openai/text.py) on the embedded tokenizer.

The tiny model's byte-level BPE splits every non-ASCII character into several tokens, so it
exercises the multi-byte cases for real: an emoji is four single-byte tokens.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmql_backends.byte_level import unicode_to_byte
from lmql_backends.loader import load_tokenizer
from lmql_backends.server.openai.text import (
    IncrementalDecoder, StopMatcher, TokenNamer, decode_all, decode_ids, token_bytes,
)

pytestmark = pytest.mark.timeout(60)

EMOJI = "\U0001F600"  # 4 UTF-8 bytes


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin:tiny")


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


# ---- incremental decoding ----------------------------------------------------------------


def test_a_character_split_across_tokens_comes_out_whole_with_its_last_byte(tokenizer):
    ids = encode(tokenizer, EMOJI)
    assert len(ids) == 4  # one byte per token: the character really is split
    decoder = IncrementalDecoder(tokenizer)
    assert [decoder.push(t) for t in ids] == ["", "", "", EMOJI]
    assert decoder.flush() == ""


def test_pieces_never_hold_half_a_character_and_join_to_the_text(tokenizer):
    text = "naïve — 日本語 " + EMOJI * 2 + " end"
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(t) for t in encode(tokenizer, text)] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_flush_releases_an_unfinished_character_as_a_replacement_character(tokenizer):
    decoder = IncrementalDecoder(tokenizer)
    assert decoder.push(encode(tokenizer, EMOJI)[0]) == ""
    assert decoder.flush() == "\ufffd"


def test_context_tokens_are_not_repeated_and_keep_the_leading_space(tokenizer):
    prompt = encode(tokenizer, "Once upon a time")
    decoder = IncrementalDecoder(tokenizer, context_ids=prompt)
    pieces = [decoder.push(t) for t in encode(tokenizer, " there was")] + [decoder.flush()]
    assert "".join(pieces) == " there was"


def test_special_tokens_are_skipped_unless_asked_for(tokenizer):
    ids = [*encode(tokenizer, "Hi"), tokenizer.eos_token_id]
    assert "".join(decode_all(tokenizer, ids, skip_special_tokens=True)) == "Hi"
    pieces = decode_all(tokenizer, ids, skip_special_tokens=False)
    assert len(pieces) == len(ids) and pieces[-1] == "<|endoftext|>"


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_ids_is_transformers_decode_without_clean_up(tokenizer, skip_special_tokens):
    ids = [tokenizer.eos_token_id, *encode(tokenizer, f"  Hi {EMOJI} there,\n\tyou"), tokenizer.eos_token_id]
    for end in range(len(ids) + 1):
        expected = tokenizer.decode(ids[:end], skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)
        assert decode_ids(tokenizer, ids[:end], skip_special_tokens) == expected
    assert decode_ids(tokenizer, encode(tokenizer, "a ."), True) == "a ."  # no clean-up of the space


def test_decode_all_puts_a_split_character_on_its_last_token(tokenizer):
    ids = encode(tokenizer, "é!")
    assert decode_all(tokenizer, ids, skip_special_tokens=False) == ["", "é", "!"]
    assert decode_all(tokenizer, [], skip_special_tokens=False) == []


# ---- token names -------------------------------------------------------------------------


def test_whole_character_tokens_are_named_by_their_text(tokenizer):
    namer = TokenNamer(tokenizer, as_token_ids=False)
    assert [namer.name(t) for t in encode(tokenizer, " hello")] == [" he", "ll", "o"]
    assert namer.name(tokenizer.eos_token_id) == "<|endoftext|>"


def test_partial_character_tokens_are_named_by_their_bytes(tokenizer):
    namer = TokenNamer(tokenizer, as_token_ids=False)
    names = [namer.name(t) for t in encode(tokenizer, EMOJI)]
    assert names == ["bytes:\\xf0", "bytes:\\x9f", "bytes:\\x98", "bytes:\\x80"]
    assert b"".join(bytes([int(n[-2:], 16)]) for n in names).decode() == EMOJI


def test_token_id_names_when_asked_or_outside_the_tokenizer(tokenizer):
    assert TokenNamer(tokenizer, as_token_ids=True).name(281) == "token_id:281"
    assert TokenNamer(tokenizer, as_token_ids=False).name(len(tokenizer) + 3) == f"token_id:{len(tokenizer) + 3}"


def test_token_bytes_reads_byte_level_and_byte_fallback_tokens():
    assert token_bytes("Ġhe") == b" he"
    assert token_bytes("<0xE2>") == b"\xe2"
    assert token_bytes("\u65e5") is None  # not a byte-level character
    assert sorted(unicode_to_byte().values()) == list(range(256))


# ---- stop strings ------------------------------------------------------------------------


def test_a_stop_split_across_chunks_is_held_back_then_cut():
    matcher = StopMatcher(("END",))
    assert matcher.add("abc E") == "abc "
    assert matcher.add("N") == ""
    assert not matcher.is_stopped
    assert matcher.add("D and more") == ""
    assert matcher.is_stopped


def test_a_false_start_is_released_once_it_cannot_be_a_stop():
    matcher = StopMatcher(("END",))
    assert matcher.add("xE") == "x"
    assert matcher.add("Nx") == "ENx"
    assert not matcher.is_stopped


def test_the_earliest_of_several_stops_wins():
    matcher = StopMatcher(("zzz", "b"))
    assert matcher.add("a") == "a"
    assert matcher.add("zzzab") == ""
    assert matcher.is_stopped


def test_the_final_piece_releases_what_was_held_back():
    matcher = StopMatcher(("END",))
    assert matcher.add("the EN") == "the "
    assert matcher.add("", is_final=True) == "EN"
    assert not matcher.is_stopped


def test_without_stops_everything_is_released_at_once():
    matcher = StopMatcher(())
    assert matcher.add("abc") == "abc" and matcher.add("E") == "E"


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="abEND", max_size=30),
    cuts=st.lists(st.integers(0, 30), max_size=8),
    stops=st.lists(st.text(alphabet="abEND", min_size=1, max_size=4), min_size=1, max_size=4),
)
def test_any_chunking_releases_exactly_the_text_before_the_first_stop(text, cuts, stops):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])] or [""]
    matcher = StopMatcher(tuple(stops))
    released = ""
    for i, chunk in enumerate(chunks):
        released += matcher.add(chunk, is_final=i == len(chunks) - 1)
        if matcher.is_stopped:
            break
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    expected = text[:min(found)] if found else text
    assert released == expected
    assert matcher.is_stopped == bool(found)
