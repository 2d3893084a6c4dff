"""The text side of completions: token ids → OpenAI ``text`` and ``logprobs`` fields.

`IncrementalDecoder` turns tokens into text without ever splitting a multi-byte character,
`TokenNamer` names tokens in ``logprobs`` (their text, ``bytes:\\x..`` or ``token_id:N``),
`StopMatcher` cuts text at stop strings across chunk boundaries, and `ChoiceBuilder` uses
the three to turn one engine request's outputs into the `ChoiceDelta`s of one choice.
"""

from __future__ import annotations

import dataclasses
import itertools
import re

from ...byte_level import unicode_to_byte
from ...engine import PromptOutput, TokenOutput
from .completions import ChoicePlan, CompletionRequest

MIN_LOGPROB = -9999.0  # what -inf is reported as (JSON has no infinity), as vLLM does
DETOKENIZE_CONTEXT = 5  # prompt tokens decoded before the first new one (leading spaces)
TOKEN_ID_PREFIX = "token_id:"
REPLACEMENT_CHAR = "\ufffd"


def decode_ids(tokenizer, ids: list[int], skip_special_tokens: bool) -> str:
    """The text of `ids` exactly as tokenized (no clean-up of spaces)."""
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)


# ---- incremental decoding ----------------------------------------------------------------


class IncrementalDecoder:
    """Turns token ids into text piece by piece without splitting multi-byte characters.

    Each push decodes a short window ending at the new token and returns only the text that
    became stable; a trailing U+FFFD (an incomplete character) is held back until completed.
    """

    def __init__(self, tokenizer, context_ids=(), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(context_ids)
        self.prefix_start = max(0, len(self.ids) - DETOKENIZE_CONTEXT)
        self.read_start = len(self.ids)

    def push(self, token_id: int) -> str:
        """Add one token; return the new stable text (maybe empty)."""
        self.ids.append(token_id)
        return self._advance(is_final=False)

    def flush(self) -> str:
        """Return whatever is still held back (the sequence ended)."""
        return self._advance(is_final=True)

    def _advance(self, is_final: bool) -> str:
        prefix = self._decode(self.ids[self.prefix_start:self.read_start])
        full = self._decode(self.ids[self.prefix_start:])
        if len(full) <= len(prefix) or (full.endswith(REPLACEMENT_CHAR) and not is_final):
            return ""
        self.prefix_start, self.read_start = self.read_start, len(self.ids)
        return full[len(prefix):]

    def _decode(self, ids: list[int]) -> str:
        return decode_ids(self.tokenizer, ids, self.skip_special_tokens)


def decode_all(tokenizer, ids, skip_special_tokens: bool) -> list[str]:
    """The incremental text piece of every token of `ids` (they join to the whole text)."""
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
    pieces = [decoder.push(t) for t in ids]
    if pieces:
        pieces[-1] += decoder.flush()
    return pieces


# ---- token names -------------------------------------------------------------------------


class TokenNamer:
    """The strings that name tokens in `logprobs`: their text, "bytes:\\x.." or "token_id:N"."""

    def __init__(self, tokenizer, as_token_ids: bool):
        self.tokenizer = tokenizer
        self.as_token_ids = as_token_ids
        self._names: dict[int, str] = {}

    def name(self, token_id: int) -> str:
        """The name of `token_id` (computed once, then cached)."""
        if token_id not in self._names:
            self._names[token_id] = self._make_name(token_id)
        return self._names[token_id]

    def _make_name(self, token_id: int) -> str:
        if self.as_token_ids or token_id >= len(self.tokenizer):
            return f"{TOKEN_ID_PREFIX}{token_id}"
        text = decode_ids(self.tokenizer, [token_id], skip_special_tokens=False)
        if REPLACEMENT_CHAR not in text:
            return text
        raw = token_bytes(self.tokenizer.convert_ids_to_tokens(token_id))
        return text if raw is None else bytes_name(raw)


def bytes_name(raw: bytes) -> str:
    """The name of a token that is not whole characters: "bytes:" and its bytes as \\xNN escapes."""
    return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def token_bytes(token: str) -> bytes | None:
    """The raw bytes of a byte-level BPE token or a "<0xNN>" byte-fallback token, else None."""
    match = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", token)
    if match:
        return bytes([int(match.group(1), 16)])
    table = unicode_to_byte()
    if all(c in table for c in token):
        return bytes(table[c] for c in token)
    return None


# ---- stop strings ------------------------------------------------------------------------


class StopMatcher:
    """Finds stop strings in growing text; releases only text that cannot start a stop."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.max_stop_len = max((len(s) for s in stops), default=0)
        self.text = ""
        self.num_released = 0
        self.is_stopped = False

    def add(self, piece: str, is_final: bool = False) -> str:
        """Append `piece`; return the text that is now safe to send."""
        search_from = max(0, len(self.text) - self.max_stop_len)
        self.text += piece
        end = self._release_end(search_from, is_final)
        released = self.text[self.num_released:end]
        self.num_released = max(self.num_released, end)
        return released

    def _release_end(self, search_from: int, is_final: bool) -> int:
        """Where the releasable text ends: at a stop, or before a possible stop start."""
        stop_at = self._stop_position(search_from)
        if stop_at is None:
            return len(self.text) if is_final else len(self.text) - self._num_held_back()
        earlier = None if is_final else self._incomplete_stop_start(search_from, stop_at)
        if earlier is not None:  # a longer stop may still complete before the one found
            return earlier
        self.is_stopped = True
        return stop_at

    def _incomplete_stop_start(self, search_from: int, before: int) -> int | None:
        """The first position before `before` where the text ends inside a stop string."""
        for start in range(max(search_from, len(self.text) - self.max_stop_len + 1), before):
            tail = self.text[start:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self.stops):
                return start
        return None

    def _stop_position(self, search_from: int) -> int | None:
        found = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _num_held_back(self) -> int:
        """Length of the longest end of the text that is the start of a stop string."""
        for size in range(min(len(self.text), self.max_stop_len - 1), 0, -1):
            if any(s.startswith(self.text[-size:]) for s in self.stops):
                return size
        return 0


# ---- choice deltas -----------------------------------------------------------------------


def finite(logprob: float) -> float:
    """`logprob` with -inf reported as MIN_LOGPROB."""
    return max(logprob, MIN_LOGPROB)


@dataclasses.dataclass
class LogprobsPart:
    """The OpenAI `logprobs` lists for some tokens of a choice."""

    tokens: list[str] = dataclasses.field(default_factory=list)
    token_logprobs: list[float | None] = dataclasses.field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = dataclasses.field(default_factory=list)
    text_offset: list[int] = dataclasses.field(default_factory=list)

    def add(self, token: str, logprob: float | None, top: dict[str, float] | None, offset: int) -> None:
        self.tokens.append(token)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(offset)

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, other: "LogprobsPart") -> None:
        for field in dataclasses.fields(self):
            getattr(self, field.name).extend(getattr(other, field.name))

    def to_json(self) -> dict:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


@dataclasses.dataclass
class ChoiceDelta:
    """New text (and logprobs) of one choice; the last delta carries the finish_reason."""

    index: int
    text: str = ""
    logprobs: LogprobsPart | None = None
    finish_reason: str | None = None
    num_tokens: int = 0

    @classmethod
    def empty(cls, index: int, with_logprobs: bool, num_tokens: int = 0) -> "ChoiceDelta":
        """A delta with no text yet (and empty logprobs lists when they are wanted)."""
        return cls(index, logprobs=LogprobsPart() if with_logprobs else None, num_tokens=num_tokens)

    @property
    def is_empty(self) -> bool:
        has_tokens = self.logprobs is not None and len(self.logprobs) > 0
        return not self.text and not has_tokens and self.finish_reason is None

    def merge(self, delta: "ChoiceDelta") -> None:
        """Append a later delta of the same choice."""
        self.text += delta.text
        if self.logprobs is not None and delta.logprobs is not None:
            self.logprobs.extend(delta.logprobs)
        self.finish_reason = delta.finish_reason or self.finish_reason

    def to_json(self) -> dict:
        logprobs = self.logprobs.to_json() if self.logprobs is not None else None
        return {"text": self.text, "index": self.index, "logprobs": logprobs, "finish_reason": self.finish_reason}


class ChoiceBuilder:
    """Follows one engine request and produces the deltas of its choice."""

    def __init__(self, plan: ChoicePlan, completion: CompletionRequest, tokenizer, namer: TokenNamer):
        self.plan = plan
        self.completion = completion
        self.tokenizer = tokenizer
        self.namer = namer
        self.decoder = IncrementalDecoder(tokenizer, plan.prompt_ids)
        self.stops = StopMatcher(completion.stop)
        self.num_chars = 0  # characters of the choice's full text so far (echo included)

    def on_output(self, out: PromptOutput | TokenOutput) -> ChoiceDelta:
        """The delta for one engine output (a PromptOutput or a TokenOutput)."""
        if isinstance(out, PromptOutput):
            return self.on_prompt(out)
        return self.on_token(out)

    def on_prompt(self, out: PromptOutput) -> ChoiceDelta:
        delta = self.new_delta()
        if self.completion.echo:
            delta.text = self.echo_prompt(out, delta.logprobs)
        delta.finish_reason = out.finish_reason
        return delta

    def on_token(self, out: TokenOutput) -> ChoiceDelta:
        delta = self.new_delta(num_tokens=1)
        is_final = out.finish_reason is not None
        piece = self.decode_piece(out.token_id, is_final)
        if delta.logprobs is not None:
            self.add_logprobs(delta.logprobs, out.token_id, out.logprob, out.top_logprobs, self.num_chars)
        self.num_chars += len(piece)
        delta.text = self.stops.add(piece, is_final=is_final)
        delta.finish_reason = "stop" if self.stops.is_stopped else out.finish_reason
        return delta

    def new_delta(self, num_tokens: int = 0) -> ChoiceDelta:
        return ChoiceDelta.empty(self.plan.index, self.completion.wants_logprobs, num_tokens)

    def decode_piece(self, token_id: int, is_final: bool) -> str:
        """The new stable text of `token_id`; the last token also flushes what was held back."""
        piece = self.decoder.push(token_id)
        return piece + self.decoder.flush() if is_final else piece

    def echo_prompt(self, out: PromptOutput, part: LogprobsPart | None) -> str:
        """The prompt's text; with logprobs, its tokens' raw logprobs (the first one is null)."""
        pieces = decode_all(self.tokenizer, self.plan.prompt_ids, skip_special_tokens=False)
        if part is not None:
            self.add_prompt_logprobs(out, pieces, part)
        text = "".join(pieces)
        self.num_chars = len(text)
        return text

    def add_prompt_logprobs(self, out: PromptOutput, pieces: list[str], part: LogprobsPart) -> None:
        scores = [None, *(out.prompt_logprobs or [])]
        tops = [None, *(out.prompt_top_logprobs or [])]
        offsets = itertools.accumulate(map(len, pieces), initial=0)
        for token_id, offset, score, top in zip(self.plan.prompt_ids, offsets, scores, tops):
            self.add_logprobs(part, token_id, score, top, offset)

    def add_logprobs(self, part: LogprobsPart, token_id: int, logprob: float | None, top, offset: int) -> None:
        """One token's entry; a token without a logprob (the first of the prompt) has nulls."""
        name = self.namer.name(token_id)
        if logprob is None:
            part.add(name, None, None, offset)
        else:
            part.add(name, finite(logprob), self.top_dict(top, token_id, logprob), offset)

    def top_dict(self, top, token_id: int, logprob: float) -> dict[str, float]:
        """The top-k alternatives plus the chosen token (so up to k + 1 entries, as OpenAI)."""
        entries: dict[str, float] = {}
        for alt_id, alt_logprob in top:
            if alt_logprob > float("-inf"):
                entries.setdefault(self.namer.name(alt_id), finite(alt_logprob))
        entries.setdefault(self.namer.name(token_id), finite(logprob))
        return entries
