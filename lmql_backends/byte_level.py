"""GPT-2's byte-level BPE alphabet: each of the 256 bytes as a printable character, and back.

Token strings of byte-level tokenizers are written in this alphabet; the server (token names,
token bytes) and the runtime (the token table) both read token bytes through it.
"""

from __future__ import annotations

import functools


@functools.cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 bytes to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {b: chr(b) for b in printable}, 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


@functools.cache
def unicode_to_byte() -> dict[str, int]:
    """The inverse of `byte_to_unicode`: a byte-level character to its byte."""
    return {char: byte for byte, char in byte_to_unicode().items()}
