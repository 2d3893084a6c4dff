"""Token tables: the bytes of every token of a tokenizer, and per-table precomputed masks.

Masks are computed on bytes, never on decoded text, so a multi-byte character split across
tokens is handled exactly. A table is built once per tokenizer object (`token_table`) and
cached in a weak-keyed dictionary, so it lives exactly as long as its tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import weakref
from typing import Any, Callable, Sequence

import torch

from ..byte_level import unicode_to_byte
from ..errors import InvalidRequestError
from .chat import has_role_tags, render_prompt

INT_START = re.compile(rb"[ 1-9][0-9]*")  # LMQL 0.7.3's first INT token
INT_CONTINUE = re.compile(rb"[1-9][0-9]*")  # its INT token after only whitespace
INT_BODY = re.compile(rb"[0-9,\s]*")  # an INT value that may still grow
CONTINUATION_BYTES = re.compile(rb"[\x80-\xbf]")
BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
METASPACE = "\u2581"

_tables: "weakref.WeakKeyDictionary[Any, TokenTable]" = weakref.WeakKeyDictionary()


FIRST_TOKEN_MEMO = 65536  # texts whose first token a table remembers


@dataclasses.dataclass(eq=False)
class TokenTable:
    """The bytes of every token id, which ids are special, and the end-of-sequence id.

    `special_ids` are never part of a value (EOS only ends one). Derived tensors are computed
    on first use and kept on the table.
    """

    token_bytes: tuple[bytes, ...]
    eos_token_id: int | None = None
    special_ids: frozenset[int] = frozenset()
    encode: Callable[[str], list[int]] | None = dataclasses.field(default=None, repr=False)  # text -> ids
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.eos_token_id is not None:
            self.special_ids = self.special_ids | {self.eos_token_id}

    @property
    def num_tokens(self) -> int:
        return len(self.token_bytes)

    @functools.cached_property
    def text_mask(self) -> torch.Tensor:
        """Tokens that may appear in a value: not special and not empty."""
        mask = torch.tensor([len(b) > 0 for b in self.token_bytes], dtype=torch.bool)
        if self.special_ids:
            mask[torch.tensor(sorted(self.special_ids))] = False
        return mask

    @functools.cached_property
    def num_chars(self) -> torch.Tensor:
        """How many characters each token starts (its UTF-8 bytes that are not continuations)."""
        return torch.tensor([count_chars(b) for b in self.token_bytes], dtype=torch.int32)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters any text token adds."""
        return int(self.num_chars[self.text_mask].max()) if bool(self.text_mask.any()) else 0

    @functools.cached_property
    def ids_by_bytes(self) -> dict[bytes, tuple[int, ...]]:
        """Text token ids grouped by their bytes (several ids may share the same bytes)."""
        groups: dict[bytes, list[int]] = {}
        allowed = self.text_mask.tolist()
        for token_id, data in enumerate(self.token_bytes):
            if allowed[token_id]:
                groups.setdefault(data, []).append(token_id)
        return {data: tuple(ids) for data, ids in groups.items()}

    @functools.cached_property
    def int_start_mask(self) -> torch.Tensor:
        """Tokens that may start an INT value (as in LMQL: ``[ 1-9][0-9]*``, a lone space too)."""
        return self.bytes_mask(lambda b: INT_START.fullmatch(b) is not None)

    @functools.cached_property
    def int_continue_mask(self) -> torch.Tensor:
        """Tokens that may follow an INT value of only whitespace: ``[1-9][0-9]*``."""
        return self.bytes_mask(lambda b: INT_CONTINUE.fullmatch(b) is not None)

    def bytes_mask(self, predicate) -> torch.Tensor:
        mask = torch.tensor([predicate(b) for b in self.token_bytes], dtype=torch.bool)
        return mask & self.text_mask

    def empty_mask(self) -> torch.Tensor:
        return torch.zeros(self.num_tokens, dtype=torch.bool)

    def mask_of(self, token_ids: Sequence[int]) -> torch.Tensor:
        """A mask allowing exactly `token_ids`."""
        mask = self.empty_mask()
        if len(token_ids):
            mask[torch.as_tensor(token_ids, dtype=torch.long)] = True
        return mask

    def cached(self, key, make):
        """A value derived from this table (e.g. a regex index), computed once per key."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @functools.cached_property
    def first_token_of(self) -> Callable[[str], int | None]:
        """The first id of the tokenizer's tokenization of a text (None: no tokenizer, empty text).

        Memoised (bounded): option constraints ask it for every option's rest at every step,
        and queries repeat their options.
        """
        encode = self.encode

        @functools.lru_cache(maxsize=FIRST_TOKEN_MEMO)
        def first_token_of(text: str) -> int | None:
            ids = encode(text) if encode is not None else []
            return ids[0] if ids else None

        return first_token_of

    def decode(self, token_ids: Sequence[int]) -> str:
        """The text of `token_ids` (bytes joined, then decoded; a cut character becomes U+FFFD)."""
        return b"".join(self.token_bytes[t] for t in token_ids).decode("utf-8", errors="replace")


def count_chars(data: bytes) -> int:
    """Characters started in `data`: its bytes that are not UTF-8 continuation bytes."""
    return len(data) - len(CONTINUATION_BYTES.findall(data))


def token_table(tokenizer) -> TokenTable:
    """The table of a Hugging Face tokenizer, built on first use and cached per tokenizer."""
    table = _tables.get(tokenizer)
    if table is None:
        table = make_token_table(tokenizer)
        _tables[tokenizer] = table
    return table


def make_token_table(tokenizer) -> TokenTable:
    """Build the byte table of a Hugging Face tokenizer (byte-level BPE or SentencePiece style)."""
    num_tokens = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(num_tokens)))
    decode_piece = byte_level_decoder() if is_byte_level(tokenizer) else sentencepiece_bytes
    special = special_token_ids(tokenizer, num_tokens)
    token_bytes = tuple(
        piece.encode() if i in special else decode_piece(piece or "") for i, piece in enumerate(pieces)
    )
    return TokenTable(token_bytes, tokenizer.eos_token_id, frozenset(special), text_encoder(tokenizer))


def text_encoder(tokenizer) -> Callable[[str], list[int]]:
    """The tokenizer's ids of a text, without specials; holds the tokenizer weakly (tables are cached by it)."""
    reference = weakref.ref(tokenizer)

    def encode(text: str) -> list[int]:
        live = reference()
        if live is None:
            raise RuntimeError("the tokenizer of this token table no longer exists")
        backend = getattr(live, "backend_tokenizer", None)  # a fast tokenizer's `tokenizers` object
        if backend is not None:
            return backend.encode(text, add_special_tokens=False).ids
        return list(live.encode(text, add_special_tokens=False))

    return encode


def special_token_ids(tokenizer, num_tokens: int) -> set[int]:
    """Ids of special tokens (EOS, BOS, padding, added special tokens)."""
    ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    return {i for i in ids if 0 <= i < num_tokens}


def is_byte_level(tokenizer) -> bool:
    """Whether token strings use GPT-2's byte-to-unicode alphabet."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [getattr(backend, "decoder", None), getattr(backend, "pre_tokenizer", None)]
    return any("ByteLevel" in repr(part) for part in parts if part is not None)


@functools.lru_cache(maxsize=1)
def byte_level_decoder():
    """A function from a byte-level BPE token string to its bytes."""
    alphabet = unicode_to_byte()

    def decode(piece: str) -> bytes:
        return bytes(alphabet[c] for c in piece) if all(c in alphabet for c in piece) else piece.encode()

    return decode


def sentencepiece_bytes(piece: str) -> bytes:
    """Bytes of a SentencePiece-style token: ``▁`` is a space and ``<0xNN>`` a raw byte."""
    match = BYTE_FALLBACK.fullmatch(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    return piece.replace(METASPACE, " ").encode()


def prompt_ids(tokenizer, text: str, bos_token_id: int | None) -> list[int]:
    """The ids of a prompt: BOS (when the tokenizer has one) then the text, without specials.

    Text with role tags (``<lmql:user/>``, ...) is rendered as chat messages instead (runtime/chat.py).
    """
    if has_role_tags(text):  # chat: the model's chat template (issue 24)
        return render_prompt(tokenizer, text, bos_token_id).ids
    ids = list(tokenizer(text, add_special_tokens=False).input_ids) if text else []
    ids = ([bos_token_id] if bos_token_id is not None else []) + ids
    if not ids:
        raise InvalidRequestError("the prompt is empty and the tokenizer has no BOS token; start with text", "prompt")
    return ids
