"""Mask primitives: which next tokens keep a constraint satisfiable, computed on token bytes.

An `Allowed` is what one constraint says about the next token of a variable: `tokens` (a
boolean tensor over the vocabulary, or None for "any text token") and `can_end` (whether the
variable may end now, i.e. whether EOS is allowed). `model_mask` turns it into the hard mask
sent to the model.
"""

from __future__ import annotations

import codecs
import dataclasses
from typing import Sequence

import torch

from ..errors import InvalidRequestError
from .tokens import TokenTable

MAX_CACHED_REGEX_STATES = 4096


@dataclasses.dataclass(frozen=True)
class Allowed:
    """The next tokens a constraint allows (None: every text token) and whether it may end."""

    tokens: torch.Tensor | None
    can_end: bool


def allow_all(can_end: bool = True) -> Allowed:
    return Allowed(None, can_end)


def allow_none(table: TokenTable, can_end: bool = False) -> Allowed:
    return Allowed(table.empty_mask(), can_end)


def intersect(a: Allowed, b: Allowed) -> Allowed:
    """Both constraints hold."""
    if a.tokens is None or b.tokens is None:
        tokens = b.tokens if a.tokens is None else a.tokens
    else:
        tokens = a.tokens & b.tokens
    return Allowed(tokens, a.can_end and b.can_end)


def union(a: Allowed, b: Allowed) -> Allowed:
    """Either constraint holds."""
    tokens = None if a.tokens is None or b.tokens is None else a.tokens | b.tokens
    return Allowed(tokens, a.can_end or b.can_end)


def text_tokens(table: TokenTable, allowed: Allowed) -> torch.Tensor:
    """The text tokens (never special ones) `allowed` lets through."""
    return table.text_mask if allowed.tokens is None else allowed.tokens & table.text_mask


def model_mask(table: TokenTable, tokens: torch.Tensor, can_end: bool) -> torch.Tensor | None:
    """The hard mask for the model: `tokens` plus EOS when the variable may end (None: all)."""
    mask = tokens.clone()
    if can_end and table.eos_token_id is not None:
        mask[table.eos_token_id] = True
    return None if bool(mask.all()) else mask


def same_mask(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a, b)


# ---- the UTF-8 rule: every constraint judges the value as it will be returned ----------------
#
# A value is the bytes of its tokens, and a token may hold only part of a multi-byte character.
# The one rule, applied to every constraint on every backend: the value's bytes are always a
# valid UTF-8 text followed by at most one unfinished character (`pending_char`); a token is
# allowed only if the value stays so, the variable may end only when no character is
# unfinished, and a token that leaves a character unfinished is allowed only when at least one
# more token may follow (to finish it). Character counts (``len(X)``) count an unfinished
# character as the one character it will become. "At least one more token" is counted
# conservatively: a character missing k bytes needs k more tokens (every byte-level vocabulary
# has a token for each single byte, and longer continuations only finish sooner). Constraints on text that the unfinished
# character cannot change (``len``, ``in``, ``==``, INT, REGEX) judge it on bytes or by its
# possible completions; every other condition is checked when the variable ends, where no
# character is unfinished.

def pending_char(data: bytes) -> bytes | None:
    """The bytes of the unfinished last character of `data` (b"" if none), None if not UTF-8.

    None too when the unfinished character can never be finished: Python's incremental decoder
    keeps ``ED A0``-``ED BF`` (the start of a UTF-16 surrogate, never valid UTF-8) pending and
    fails only at the third byte, so the pending bytes are checked for a valid completion.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        decoder.decode(data, final=False)
    except UnicodeDecodeError:
        return None
    pending = decoder.getstate()[0]
    return pending if can_finish(pending) else None


def can_finish(pending: bytes) -> bool:
    """Whether some continuation bytes make the unfinished character `pending` a valid one."""
    if not pending:
        return True
    missing = missing_bytes(pending)
    fillers = (b"\x80", b"\x90", b"\xa0")  # the lowest byte of every second-byte range
    return any(_decodes(pending + (filler + b"\x80" * missing)[:missing]) for filler in fillers)


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def utf8_mask(table: TokenTable, pending: bytes, tokens_after: int | None = None) -> torch.Tensor:
    """Text tokens that keep a value ending in `pending` valid UTF-8, finishable in `tokens_after`.

    `tokens_after`: how many tokens may follow this one (None: no limit).
    """
    if tokens_after is not None:
        tokens_after = max(0, min(tokens_after, 3))  # a character misses at most 3 bytes
    return table.cached(("utf8", pending, tokens_after), lambda: table.mask_of([
        token_id for token_id, data in enumerate(table.token_bytes)
        if continues_utf8(pending, data, tokens_after)
    ]) & table.text_mask)


def continues_utf8(pending: bytes, data: bytes, tokens_after: int | None) -> bool:
    rest = pending_char(pending + data)
    return rest is not None and (tokens_after is None or missing_bytes(rest) <= tokens_after)


def missing_bytes(pending: bytes) -> int:
    """How many bytes the unfinished character `pending` still needs (0 for b"")."""
    if not pending:
        return 0
    lead = pending[0]
    size = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    return size - len(pending)


def apply_utf8_rule(table: TokenTable, allowed: Allowed, pending: bytes, tokens_left: int | None) -> Allowed:
    """`allowed` restricted by the UTF-8 rule for a value whose unfinished character is `pending`.

    `tokens_left`: how many more tokens the value may have, this one included (None: no limit).
    """
    mask = utf8_mask(table, pending, None if tokens_left is None else tokens_left - 1)
    tokens = mask if allowed.tokens is None else allowed.tokens & mask
    return Allowed(tokens, allowed.can_end and pending == b"")


# ---- primitives -----------------------------------------------------------------------

def prefix_mask(table: TokenTable, value: bytes, options: Sequence[bytes]) -> torch.Tensor:
    """The tokens that may follow `value` towards an option (``X in [...]``, ``X == ...``).

    LMQL 0.7.3's rule (``ops/ops.py`` InOpStrInSet.follow, lines 676-698, and its
    ``tset(*suffixes, prefix=True)``, ``ops/token_set.py:194-197``): for each option that
    `value` starts, the first token of the tokenizer's tokenization of the rest. Where the rest
    is not text (`value` ends inside a multi-byte character) or the table has no tokenizer,
    every token whose bytes start the rest.
    """
    found: list[int] = []
    for option in options:
        if len(option) > len(value) and option.startswith(value):
            found.extend(first_tokens(table, option[len(value):]))
    return table.mask_of(found)


def first_tokens(table: TokenTable, rest: bytes) -> list[int]:
    """The tokens a value may continue with towards `rest` (see prefix_mask)."""
    if table.encode is not None:
        try:
            first = table.first_token_of(rest.decode("utf-8"))
        except UnicodeDecodeError:  # `value` ends inside a character, or `rest` does
            first = None
        if first is not None and rest.startswith(table.token_bytes[first]) and first not in table.special_ids:
            return [first]
    return [token_id for end in range(1, len(rest) + 1) for token_id in table.ids_by_bytes.get(rest[:end], ())]


def char_budget_mask(table: TokenTable, budget: int) -> torch.Tensor:
    """Text tokens adding at most `budget` characters."""
    if budget < 0:
        return table.empty_mask()
    return (table.num_chars <= budget) & table.text_mask


class RegexIndex:
    """Token-level masks of a regular expression over a token table.

    The pattern becomes a character automaton (`interegular`). Text tokens are grouped by the
    sequence of automaton symbols their characters map to, and those sequences are stored in a
    trie, so the tokens allowed in a state are found by walking the trie alongside the automaton
    (dead branches are never visited) instead of scanning the vocabulary. Tokens that are not
    whole UTF-8 characters (a multi-byte character split across tokens) are walked one by one;
    a matcher state is ``(automaton state, pending bytes of a split character)``. Masks are
    cached per matcher state.
    """

    def __init__(self, table: TokenTable, pattern: str):
        self.table, self.pattern = table, pattern
        fsm = make_fsm(pattern)
        self.transitions, self.finals, self.initial = fsm.map, frozenset(fsm.finals), fsm.initial
        self.symbols = dict(fsm.alphabet.items())
        self.other_symbol = self.symbols.get(anything_else())
        self.live_states = live_states(fsm)
        self.trie = _SymbolTrie()
        self.split_tokens: list[int] = []
        self.index_tokens()
        self.state_masks: dict[tuple[int, bytes], torch.Tensor] = {}

    # ---- building ----------------------------------------------------------------------
    def index_tokens(self) -> None:
        text_ids = torch.nonzero(self.table.text_mask).flatten().tolist()
        for token_id in text_ids:
            try:
                text = self.table.token_bytes[token_id].decode("utf-8")
            except UnicodeDecodeError:
                self.split_tokens.append(token_id)
                continue
            self.trie.add(self.symbol_sequence(text), token_id)

    def symbol_sequence(self, text: str) -> tuple:
        return tuple(self.symbols.get(char, self.other_symbol) for char in text)

    # ---- walking -----------------------------------------------------------------------
    def step_symbol(self, state: int | None, symbol) -> int | None:
        if state is None or symbol is None:
            return None
        return self.transitions.get(state, {}).get(symbol)

    def walk_text(self, state: int | None, text: str) -> int | None:
        for char in text:
            state = self.step_symbol(state, self.symbols.get(char, self.other_symbol))
        return state

    def walk_bytes(self, state: tuple[int, bytes] | None, data: bytes) -> tuple[int, bytes] | None:
        """The matcher state after `data`, or None when it leaves the language."""
        if state is None:
            return None
        split = split_utf8(state[1] + data)
        if split is None:
            return None
        text, pending = split
        fsm_state = self.walk_text(state[0], text)
        if fsm_state is None or not self.is_live(fsm_state, pending):
            return None
        return fsm_state, pending

    def is_live(self, fsm_state: int, pending: bytes) -> bool:
        if not pending:
            return fsm_state in self.live_states
        # a split character: live if some character starting with these bytes moves to a live state
        moves = self.transitions.get(fsm_state, {})
        if self.other_symbol is not None and moves.get(self.other_symbol) in self.live_states:
            return True
        return any(
            char.encode().startswith(pending) and moves.get(symbol) in self.live_states
            for char, symbol in self.symbols.items() if isinstance(char, str)
        )

    def state_after(self, token_ids: Sequence[int]) -> tuple[int, bytes] | None:
        """The matcher state after `token_ids`, or None when they leave the language."""
        state = (self.initial, b"") if self.initial in self.live_states else None
        for token_id in token_ids:
            state = self.walk_bytes(state, self.table.token_bytes[token_id])
        return state

    # ---- masks -------------------------------------------------------------------------
    def allowed(self, token_ids: Sequence[int]) -> Allowed:
        state = self.state_after(token_ids)
        if state is None:
            return allow_none(self.table)
        return Allowed(self.state_mask(state), state[1] == b"" and state[0] in self.finals)

    def state_mask(self, state: tuple[int, bytes]) -> torch.Tensor:
        mask = self.state_masks.get(state)
        if mask is None:
            mask = self.table.mask_of(self.allowed_ids(state))
            if len(self.state_masks) < MAX_CACHED_REGEX_STATES:
                self.state_masks[state] = mask
        return mask

    def allowed_ids(self, state: tuple[int, bytes]) -> list[int]:
        candidates = self.split_tokens if not state[1] else self.table_continuations()
        found = [t for t in candidates if self.walk_bytes(state, self.table.token_bytes[t]) is not None]
        if not state[1]:
            found.extend(self.trie.live_ids(state[0], self))
        return found

    def table_continuations(self) -> list[int]:
        """Text tokens starting with a UTF-8 continuation byte (the only ones after a split)."""
        return self.table.cached("continuation-tokens", lambda: [
            t for t in torch.nonzero(self.table.text_mask).flatten().tolist()
            if 0x80 <= self.table.token_bytes[t][0] <= 0xBF
        ])


class _SymbolTrie:
    """Token ids stored under their symbol sequences."""

    def __init__(self):
        self.children: dict = {}
        self.ids: list[int] = []

    def add(self, sequence: tuple, token_id: int) -> None:
        node = self
        for symbol in sequence:
            node = node.children.setdefault(symbol, _SymbolTrie())
        node.ids.append(token_id)

    def live_ids(self, fsm_state: int, index: RegexIndex) -> list[int]:
        """Ids of every sequence that keeps the automaton live from `fsm_state`."""
        found, stack = [], [(self, fsm_state)]
        while stack:
            node, state = stack.pop()
            moves = index.transitions.get(state, {})
            for symbol, child in node.children.items():
                target = moves.get(symbol)
                if target is not None and target in index.live_states:
                    found.extend(child.ids)
                    stack.append((child, target))
        return found


def split_utf8(data: bytes) -> tuple[str, bytes] | None:
    """(decoded text, trailing incomplete character) or None when `data` is not UTF-8."""
    try:
        return data.decode("utf-8"), b""
    except UnicodeDecodeError:
        pass
    for cut in (1, 2, 3):
        head, tail = data[:-cut], data[-cut:]
        if is_incomplete_char(tail):
            try:
                return head.decode("utf-8"), tail
            except UnicodeDecodeError:
                return None
    return None


def is_incomplete_char(tail: bytes) -> bool:
    """Whether `tail` is the start of a multi-byte UTF-8 character (lead byte plus continuations)."""
    lead = tail[0]
    needed = 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if 0xF0 <= lead <= 0xF4 else 0
    return len(tail) < needed and all(0x80 <= b <= 0xBF for b in tail[1:])


def live_states(fsm) -> frozenset[int]:
    """States from which a final state can be reached."""
    live = set(fsm.finals)
    changed = True
    while changed:
        changed = False
        for state, moves in fsm.map.items():
            if state not in live and any(target in live for target in moves.values()):
                live.add(state)
                changed = True
    return frozenset(live)


def anything_else():
    from interegular.fsm import anything_else as marker

    return marker


def make_fsm(pattern: str):
    """The character automaton of `pattern`; unsupported patterns name the problem."""
    try:
        import interegular
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise InvalidRequestError("REGEX constraints need the package 'interegular': pip install interegular") from exc
    try:
        return interegular.parse_pattern(pattern).to_fsm().reduce()
    except Exception as exc:  # interegular raises several types for bad or unsupported patterns
        raise InvalidRequestError(f"REGEX pattern {pattern!r} cannot be used: {type(exc).__name__}: {exc}", "REGEX") from exc


def regex_index(table: TokenTable, pattern: str) -> RegexIndex:
    """The (cached) regex index of `pattern` over `table`."""
    return table.cached(("regex", pattern), lambda: RegexIndex(table, pattern))
