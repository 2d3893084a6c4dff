"""Checks of decoded JSON values that every protocol shares: numbers, token ids, Unicode."""

from __future__ import annotations

from typing import Any

from ..engine.engine import are_in_vocabulary, are_plain_ints


def is_int(value: Any) -> bool:
    """An integer that is not a bool (JSON ``true`` is no token id or count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_positive_int(value: Any) -> bool:
    return is_int(value) and value > 0


def is_number(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int_list(value: Any) -> bool:
    """A list of ints (not bools); plain ints are checked at C speed first."""
    return isinstance(value, list) and (are_plain_ints(value) or all(is_int(v) for v in value))


def is_id_list(value: Any) -> bool:
    """A non-empty list of ints (not bools)."""
    return bool(value) and is_int_list(value)


def first_outside_vocabulary(ids, vocab_size: int) -> int | None:
    """The first id of `ids` outside [0, vocab_size), or None when all are inside."""
    if not ids or are_in_vocabulary(ids, vocab_size):  # C-speed passes; the loop below finds the culprit
        return None
    return next(t for t in ids if not 0 <= t < vocab_size)


def is_valid_unicode(text: str) -> bool:
    """Whether `text` encodes as UTF-8 (JSON's ``\\ud800`` escapes decode to lone surrogates, which do not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), type(value).__name__)
