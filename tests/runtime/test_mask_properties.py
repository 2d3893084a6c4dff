"""Masks agree with brute force on random token tables (hypothesis)."""

import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from lmql_backends.runtime.masks import prefix_mask, regex_index
from lmql_backends.runtime.tokens import TokenTable

PIECES = st.text(alphabet="ab1. é", min_size=1, max_size=3)
PATTERNS = ["(ab)+", "a*b?1", r"[0-9]+(\.[0-9]+)?", "(a|b)*é", " ?[ab]{2,3}", "a.b"]


def make_table(pieces):
    return TokenTable(tuple([b"<eos>"] + [p.encode() for p in pieces]), eos_token_id=0)


@settings(max_examples=60, deadline=None)
@given(st.lists(PIECES, min_size=1, max_size=25), st.lists(PIECES, min_size=1, max_size=4), st.text("ab1", max_size=2))
def test_prefix_mask_is_brute_force(pieces, options, value):
    table = make_table(pieces)
    encoded = [o.encode() for o in options]
    mask = prefix_mask(table, value.encode(), encoded)
    for token_id, data in enumerate(table.token_bytes):
        expected = token_id != 0 and any(o.startswith(value.encode() + data) for o in encoded)
        assert bool(mask[token_id]) == expected


@settings(max_examples=60, deadline=None)
@given(st.lists(PIECES, min_size=1, max_size=25), st.sampled_from(PATTERNS), st.lists(st.integers(1, 25), max_size=3))
def test_regex_mask_is_brute_force(pieces, pattern, walk):
    table = make_table(pieces)
    prefix_ids = [i for i in walk if i < table.num_tokens]
    text = b"".join(table.token_bytes[i] for i in prefix_ids).decode()
    allowed = regex_index(table, pattern).allowed(prefix_ids)
    if regex.fullmatch(pattern, text, partial=True) is None:
        assert not bool(allowed.tokens.any()) and not allowed.can_end
        return
    assert allowed.can_end == (regex.fullmatch(pattern, text) is not None)
    for token_id in range(1, table.num_tokens):
        candidate = text + table.token_bytes[token_id].decode()
        assert bool(allowed.tokens[token_id]) == (regex.fullmatch(pattern, candidate, partial=True) is not None)
