"""The new API: OpenAI-compatible ``/v1/completions`` (JSON and SSE) and ``/v1/models``.

A thin protocol adapter over the engine: the JSON body becomes a validated
`CompletionRequest`, each (prompt, choice) becomes one engine `Request` (they run
concurrently, so they batch), and the engine's typed outputs become OpenAI
``text_completion`` objects. Text is decoded incrementally so that characters split
across tokens are never corrupted. See docs/new-api.md for the reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import re
import secrets
import time
import uuid
from typing import Any, AsyncGenerator, AsyncIterator

import torch
from aiohttp import web

from ..engine import PromptOutput, Request, SamplingParams, TokenOutput
from ..engine.sampling import make_bias_processor, make_mask_processor
from ..errors import InvalidRequestError, LmqlBackendsError, ModelNotFoundError
from .app import ServerState, get_state, json_error
from .errors import openai_error_body

log = logging.getLogger("lmql_backends.server.openai_api")

DEFAULT_MAX_TOKENS = 16
MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOPS = 4
MAX_TEMPERATURE = 2.0
MAX_BIAS = 100.0
MIN_LOGPROB = -9999.0  # what -inf is reported as (JSON has no infinity), as vLLM does
DETOKENIZE_CONTEXT = 5  # prompt tokens decoded before the first new one (leading spaces)
SEED_RANGE = (-(2**63), 2**64)
TOKEN_ID_PREFIX = "token_id:"


def add_routes(app: web.Application) -> None:
    """Add the completions and models endpoints (with and without the /v1 prefix)."""
    for prefix in ("/v1", ""):
        app.router.add_post(f"{prefix}/completions", create_completion)
        app.router.add_get(f"{prefix}/models", list_models)


# ---- the request ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    """A validated ``/v1/completions`` body; prompts are token ids."""

    model: str
    prompts: tuple[tuple[int, ...], ...]
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    echo: bool = False
    stream: bool = False
    include_usage: bool = False
    allowed_token_ids: tuple[int, ...] | None = None
    return_tokens_as_token_ids: bool = False
    ignore_eos: bool = False

    @classmethod
    def from_json(cls, body: Any, state: ServerState) -> "CompletionRequest":
        """Validate a decoded JSON body; every bad value raises InvalidRequestError naming it."""
        if not isinstance(body, dict):
            raise InvalidRequestError(f"the request body must be a JSON object, got {json_type(body)}")
        model = read_model(body, state.served_names)
        vocab_size = state.loaded.vocab_size
        echo = read_bool(body, "echo", False)
        n = read_int(body, "n", 1, 1, MAX_N)
        check_unsupported(body, n)
        return cls(
            model=model,
            prompts=read_prompts(body, state.loaded.tokenizer, vocab_size),
            max_tokens=read_max_tokens(body, echo),
            temperature=read_float(body, "temperature", 1.0, 0.0, MAX_TEMPERATURE),
            top_p=read_top_p(body),
            n=n,
            seed=read_int(body, "seed", None, *SEED_RANGE),
            stop=read_stop(body),
            logprobs=read_int(body, "logprobs", None, 0, MAX_LOGPROBS),
            logit_bias=read_logit_bias(body, vocab_size),
            echo=echo,
            stream=read_bool(body, "stream", False),
            include_usage=read_include_usage(body),
            allowed_token_ids=read_allowed_token_ids(body, vocab_size),
            return_tokens_as_token_ids=read_bool(body, "return_tokens_as_token_ids", False),
            ignore_eos=read_bool(body, "ignore_eos", False),
        )

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_model(body: dict, served: tuple[str, ...]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError(
            f"'model' must be a non-empty string (this server serves {served[0]!r}), got {json_type(model)}", "model"
        )
    if model not in served:
        raise ModelNotFoundError(
            f"the model {model!r} does not exist on this server; it serves {', '.join(map(repr, served))}"
        )
    return model


def read_bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequestError(f"'{name}' must be true or false, got {value!r}", name)
    return value


def read_int(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    """An integer in [low, high] (None: `default`)."""
    value = body.get(name)
    if value is None:
        return default
    if not is_int(value):
        raise InvalidRequestError(f"'{name}' must be an integer, got {json_type(value)} {value!r}", name)
    if not low <= value <= high:
        raise InvalidRequestError(f"'{name}' must be between {low} and {high}, got {value}", name)
    return value


def read_float(body: dict, name: str, default: float, low: float, high: float) -> float:
    """A number in [low, high] (None: `default`)."""
    value = body.get(name)
    if value is None:
        return default
    if not is_number(value):
        raise InvalidRequestError(f"'{name}' must be a number, got {json_type(value)} {value!r}", name)
    if not low <= value <= high:
        raise InvalidRequestError(f"'{name}' must be between {low} and {high}, got {value}", name)
    return float(value)


def read_top_p(body: dict) -> float:
    top_p = read_float(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise InvalidRequestError("'top_p' must be in (0, 1], got 0", "top_p")
    return top_p


def read_max_tokens(body: dict, echo: bool) -> int:
    value = body.get("max_tokens")
    if value is not None and is_int(value) and value < 0:
        raise InvalidRequestError(f"'max_tokens' must be >= 0, got {value}", "max_tokens")
    max_tokens = read_int(body, "max_tokens", DEFAULT_MAX_TOKENS, 0, 2**31)
    if max_tokens == 0 and not echo:
        raise InvalidRequestError(
            "'max_tokens' is 0 but 'echo' is false: max_tokens=0 only scores the prompt, so set echo=true "
            "(and logprobs) or ask for at least 1 token", "max_tokens"
        )
    return max_tokens


def read_prompts(body: dict, tokenizer, vocab_size: int) -> tuple[tuple[int, ...], ...]:
    """Every prompt as token ids: a string, strings, token ids, or lists of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return (encode(tokenizer, prompt),)
    if not isinstance(prompt, list) or not prompt:
        raise InvalidRequestError(
            f"'prompt' must be a string, an array of strings, an array of token ids or an array of "
            f"token-id arrays, got {'an empty array' if prompt == [] else json_type(prompt)}", "prompt"
        )
    if all(isinstance(p, str) for p in prompt):
        return tuple(encode(tokenizer, p) for p in prompt)
    if all(is_int(t) for t in prompt):
        return (check_token_ids(prompt, vocab_size, "prompt"),)
    if all(isinstance(p, list) for p in prompt):
        return tuple(read_id_list(p, vocab_size) for p in prompt)
    index, item = first_odd_item(prompt)
    raise InvalidRequestError(
        f"'prompt' items must be all strings, all token ids (integers) or all arrays of token ids; "
        f"item {index} is {json_type(item)} {item!r}", "prompt"
    )


def first_odd_item(items: list) -> tuple[int, Any]:
    """The first item that is not a string, an integer or an array, or not of the first item's kind."""
    kinds = [prompt_item_kind(x) for x in items]
    for i, kind in enumerate(kinds):
        if kind is None or kind != kinds[0]:
            return i, items[i]
    return 0, items[0]


def prompt_item_kind(item: Any) -> str | None:
    if isinstance(item, str):
        return "string"
    if is_int(item):
        return "token id"
    return "array" if isinstance(item, list) else None


def encode(tokenizer, text: str) -> tuple[int, ...]:
    """Tokenize a prompt string as given: no special tokens are added."""
    if not is_valid_unicode(text):
        raise InvalidRequestError(
            "'prompt' contains an unpaired surrogate (an invalid \\u escape); send valid Unicode", "prompt"
        )
    return tuple(tokenizer.encode(text, add_special_tokens=False))


def is_valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_id_list(ids: list, vocab_size: int) -> tuple[int, ...]:
    if not ids or not all(is_int(t) for t in ids):
        raise InvalidRequestError("every token-id array in 'prompt' must be a non-empty array of integers", "prompt")
    return check_token_ids(ids, vocab_size, "prompt")


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> tuple[int, ...]:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"token id {bad[0]} in '{param}' is outside the vocabulary [0, {vocab_size})", param)
    return tuple(ids)


def read_stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidRequestError(f"'stop' must be a string or an array of strings, got {json_type(stop)}", "stop")
    if len(stops) > MAX_STOPS:
        raise InvalidRequestError(f"'stop' may have at most {MAX_STOPS} strings, got {len(stops)}", "stop")
    if any(s == "" for s in stops):
        raise InvalidRequestError("'stop' strings must not be empty", "stop")
    return tuple(stops)


def read_logit_bias(body: dict, vocab_size: int) -> tuple[tuple[int, float], ...]:
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise InvalidRequestError(
            f"'logit_bias' must be an object mapping token ids to numbers, got {json_type(bias)}", "logit_bias"
        )
    return tuple(read_bias_item(key, value, vocab_size) for key, value in bias.items())


def read_bias_item(key: str, value: Any, vocab_size: int) -> tuple[int, float]:
    if not re.fullmatch(r"\d+", key) or not int(key) < vocab_size:
        raise InvalidRequestError(
            f"'logit_bias' key {key!r} is not a token id in the vocabulary [0, {vocab_size})", "logit_bias"
        )
    if not is_number(value) or not -MAX_BIAS <= value <= MAX_BIAS:
        raise InvalidRequestError(
            f"'logit_bias' value for token {key} must be a number in [-100, 100], got {value!r}", "logit_bias"
        )
    return int(key), float(value)


def read_include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise InvalidRequestError(f"'stream_options' must be an object, got {json_type(options)}", "stream_options")
    return read_bool(options, "include_usage", False)


def read_allowed_token_ids(body: dict, vocab_size: int) -> tuple[int, ...] | None:
    ids = body.get("allowed_token_ids")
    if ids is None:
        return None
    if not isinstance(ids, list) or not ids or not all(is_int(t) for t in ids):
        raise InvalidRequestError(
            "'allowed_token_ids' must be a non-empty array of token ids (an empty one allows no token)",
            "allowed_token_ids",
        )
    return check_token_ids(ids, vocab_size, "allowed_token_ids")


def check_unsupported(body: dict, n: int) -> None:
    """OpenAI parameters this server accepts only at their neutral values."""
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise InvalidRequestError(f"'{name}' is not supported by this server; send 0 or omit it", name)
    if body.get("best_of") not in (None, n):
        raise InvalidRequestError(f"'best_of' is not supported; omit it or set it equal to n ({n})", "best_of")
    if body.get("suffix") is not None:
        raise InvalidRequestError("'suffix' is not supported by this server; omit it", "suffix")


# ---- engine requests -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChoicePlan:
    """One choice of the response: its index, its prompt and the engine request that makes it."""

    index: int
    prompt_ids: tuple[int, ...]
    request: Request


def make_choice_plans(completion: CompletionRequest, state: ServerState) -> list[ChoicePlan]:
    """One validated engine request per (prompt, choice); choice i samples with seed + i."""
    base_seed = completion.seed if completion.seed is not None else secrets.randbelow(2**63)
    processors = make_processors(completion, state.loaded.vocab_size)
    stop_ids = stop_token_ids(completion, state.loaded.eos_token_id)
    check_num_choices(completion, state.engine.config)
    plans = []
    for p, prompt in enumerate(completion.prompts):
        for i in range(completion.n):
            sampling = make_sampling(completion, base_seed + i)
            request = Request(
                list(prompt), completion.max_tokens, sampling, processors, stop_ids,
                score_from=1 if completion.echo and completion.logprobs is not None else None,
            )
            state.engine.validate(request)
            plans.append(ChoicePlan(p * completion.n + i, prompt, request))
    return plans


def check_num_choices(completion: CompletionRequest, config) -> None:
    """A request may not ask for more choices than the engine can ever hold at once."""
    limit = config.max_num_seqs + config.max_queue
    if completion.num_choices > limit:
        raise InvalidRequestError(
            f"{len(completion.prompts)} prompts x n={completion.n} is {completion.num_choices} choices, more than "
            f"this server can hold ({limit}); send fewer prompts per request", "prompt"
        )


def make_sampling(completion: CompletionRequest, seed: int) -> SamplingParams:
    return SamplingParams(completion.temperature, completion.top_p, seed, completion.logprobs or 0)


def make_processors(completion: CompletionRequest, vocab_size: int) -> tuple:
    """logit_bias first, then the hard allowed_token_ids mask."""
    processors = []
    if completion.logit_bias:
        processors.append(make_bias_processor(dict(completion.logit_bias)))
    if completion.allowed_token_ids is not None:
        allowed = torch.zeros(vocab_size, dtype=torch.bool)
        allowed[list(completion.allowed_token_ids)] = True
        processors.append(make_mask_processor(allowed))
    return tuple(processors)


def stop_token_ids(completion: CompletionRequest, eos_token_id: int | None) -> frozenset[int]:
    if completion.ignore_eos or eos_token_id is None:
        return frozenset()
    return frozenset({eos_token_id})


# ---- text: incremental decoding, token names, stop strings ----------------------------


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
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not is_final):
            return ""
        self.prefix_start, self.read_start = self.read_start, len(self.ids)
        return full[len(prefix):]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )


def decode_all(tokenizer, ids, skip_special_tokens: bool) -> list[str]:
    """The incremental text piece of every token of `ids` (they join to the whole text)."""
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
    pieces = [decoder.push(t) for t in ids]
    if pieces:
        pieces[-1] += decoder.flush()
    return pieces


class TokenNamer:
    """The strings that name tokens in `logprobs`: their text, "bytes:\\x.." or "token_id:N"."""

    def __init__(self, tokenizer, as_token_ids: bool):
        self.tokenizer = tokenizer
        self.as_token_ids = as_token_ids
        self._names: dict[int, str] = {}

    def name(self, token_id: int) -> str:
        if token_id not in self._names:
            self._names[token_id] = self._make_name(token_id)
        return self._names[token_id]

    def _make_name(self, token_id: int) -> str:
        if self.as_token_ids or token_id >= len(self.tokenizer):
            return f"{TOKEN_ID_PREFIX}{token_id}"
        text = self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if "\ufffd" not in text:
            return text
        raw = token_bytes(self.tokenizer.convert_ids_to_tokens(token_id))
        return text if raw is None else "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def token_bytes(token: str) -> bytes | None:
    """The raw bytes of a byte-level BPE token or a "<0xNN>" byte-fallback token, else None."""
    match = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", token)
    if match:
        return bytes([int(match.group(1), 16)])
    table = unicode_to_byte()
    if all(c in table for c in token):
        return bytes(table[c] for c in token)
    return None


@functools.cache
def unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-printable-character table (byte-level BPE)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


class StopMatcher:
    """Finds stop strings in growing text; releases only text that cannot start a stop."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.text = ""
        self.num_released = 0
        self.is_stopped = False

    def add(self, piece: str, is_final: bool = False) -> str:
        """Append `piece`; return the text that is now safe to send."""
        search_from = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += piece
        end = self._stop_position(search_from)
        if end is not None:
            self.is_stopped = True
        elif not is_final:
            end = len(self.text) - self._num_held_back()
        else:
            end = len(self.text)
        released = self.text[self.num_released:end]
        self.num_released = max(self.num_released, end)
        return released

    def _stop_position(self, search_from: int) -> int | None:
        found = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _num_held_back(self) -> int:
        """Length of the longest end of the text that is the start of a stop string."""
        for size in range(min(len(self.text), max((len(s) - 1 for s in self.stops), default=0)), 0, -1):
            if any(s.startswith(self.text[-size:]) for s in self.stops):
                return size
        return 0


# ---- turning engine outputs into choice deltas ---------------------------------------


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

    def extend(self, other: "LogprobsPart") -> None:
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(self, name).extend(getattr(other, name))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ChoiceDelta:
    """New text (and logprobs) of one choice; the last delta carries the finish_reason."""

    index: int
    text: str = ""
    logprobs: LogprobsPart | None = None
    finish_reason: str | None = None
    num_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        has_tokens = self.logprobs is not None and bool(self.logprobs.tokens)
        return not self.text and not has_tokens and self.finish_reason is None

    def to_json(self) -> dict:
        logprobs = self.logprobs.to_json() if self.logprobs is not None else None
        return {"text": self.text, "index": self.index, "logprobs": logprobs, "finish_reason": self.finish_reason}


def finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


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

    @property
    def wants_logprobs(self) -> bool:
        return self.completion.logprobs is not None

    def on_output(self, out) -> ChoiceDelta:
        """The delta for one engine output (a PromptOutput or a TokenOutput)."""
        if isinstance(out, PromptOutput):
            return self.on_prompt(out)
        return self.on_token(out)

    def on_prompt(self, out: PromptOutput) -> ChoiceDelta:
        delta = ChoiceDelta(self.plan.index, logprobs=LogprobsPart() if self.wants_logprobs else None)
        if self.completion.echo:
            delta.text = self.echo_prompt(out, delta.logprobs)
        if out.finish_reason is not None:
            delta.finish_reason = out.finish_reason
        return delta

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
        offset = 0
        for token_id, piece, score, top in zip(self.plan.prompt_ids, pieces, scores, tops):
            if score is None:
                part.add(self.namer.name(token_id), None, None, offset)
            else:
                part.add(self.namer.name(token_id), finite(score), self.top_dict(top, token_id, score), offset)
            offset += len(piece)

    def on_token(self, out: TokenOutput) -> ChoiceDelta:
        delta = ChoiceDelta(self.plan.index, num_tokens=1, logprobs=LogprobsPart() if self.wants_logprobs else None)
        piece = self.decoder.push(out.token_id)
        if out.finish_reason is not None:
            piece += self.decoder.flush()
        if delta.logprobs is not None:
            top = self.top_dict(out.top_logprobs, out.token_id, out.logprob)
            delta.logprobs.add(self.namer.name(out.token_id), finite(out.logprob), top, self.num_chars)
        self.num_chars += len(piece)
        delta.text = self.stops.add(piece, is_final=out.finish_reason is not None)
        delta.finish_reason = "stop" if self.stops.is_stopped else out.finish_reason
        return delta

    def top_dict(self, top, token_id: int, logprob: float) -> dict[str, float]:
        """The top-k alternatives plus the chosen token (so up to k + 1 entries, as OpenAI)."""
        entries: dict[str, float] = {}
        for alt_id, alt_logprob in top:
            if alt_logprob > float("-inf"):
                entries.setdefault(self.namer.name(alt_id), finite(alt_logprob))
        entries.setdefault(self.namer.name(token_id), finite(logprob))
        return entries


# ---- running choices -------------------------------------------------------------------


@dataclasses.dataclass
class StartedChoice:
    """An engine request that was accepted, with its first output already received."""

    plan: ChoicePlan
    outputs: AsyncGenerator
    first: Any


async def start_choices(engine, plans: list[ChoicePlan]) -> list[StartedChoice]:
    """Submit every request and wait for each first output, so errors come before any byte."""
    streams = [engine.stream(plan.request) for plan in plans]
    firsts = await asyncio.gather(*(anext(s) for s in streams), return_exceptions=True)
    failures = [f for f in firsts if isinstance(f, BaseException)]
    if failures:
        await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)
        raise failures[0]
    return [StartedChoice(plan, s, first) for plan, s, first in zip(plans, streams, firsts)]


async def run_choice(started: StartedChoice, builder: ChoiceBuilder, sink: asyncio.Queue) -> None:
    """Turn one request's outputs into deltas on `sink`; the last item is None or an exception."""
    try:
        async with contextlib.aclosing(started.outputs) as outputs:
            delta = builder.on_output(started.first)
            sink.put_nowait(delta)
            if delta.finish_reason is None:
                async for out in outputs:
                    delta = builder.on_output(out)
                    sink.put_nowait(delta)
                    if delta.finish_reason is not None:
                        break
        sink.put_nowait(None)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        sink.put_nowait(exc)


class CompletionRun:
    """All the choices of one completion, running concurrently; yields their deltas."""

    def __init__(self, completion: CompletionRequest, state: ServerState, started: list[StartedChoice]):
        tokenizer = state.loaded.tokenizer
        namer = TokenNamer(tokenizer, completion.return_tokens_as_token_ids)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks = [
            asyncio.create_task(run_choice(s, ChoiceBuilder(s.plan, completion, tokenizer, namer), self.queue))
            for s in started
        ]

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        """Every delta as it comes; raises the first error of any choice."""
        remaining = len(self.tasks)
        while remaining:
            item = await self.queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item

    async def cancel(self) -> None:
        """Stop every choice still running (their engine requests are aborted)."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


# ---- the handlers ----------------------------------------------------------------------


@dataclasses.dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0

    def to_json(self) -> dict:
        total = self.prompt_tokens + self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": total}


@dataclasses.dataclass(frozen=True)
class ResponseHeader:
    """The fields every completion object and chunk of one response shares."""

    id: str
    created: int
    model: str

    def to_json(self) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model}


async def create_completion(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions: validate everything, start the choices, answer (JSON or SSE)."""
    state = get_state(request)
    try:
        completion = CompletionRequest.from_json(await read_json_body(request), state)
        started = await start_choices(state.engine, make_choice_plans(completion, state))
    except Exception as exc:
        log_unexpected(exc)
        return json_error(exc)
    header = ResponseHeader(f"cmpl-{uuid.uuid4().hex}", int(time.time()), completion.model)
    usage = Usage(sum(len(p) for p in completion.prompts))
    run = CompletionRun(completion, state, started)
    try:
        if completion.stream:
            return await stream_completion(request, completion, run, header, usage)
        return await complete(request, completion, run, header, usage)
    finally:
        await run.cancel()


async def read_json_body(request: web.Request) -> Any:
    """The decoded JSON body; anything that is not JSON (or not UTF-8) is a 400."""
    raw = await request.read()
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, too deep
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from None


async def complete(request, completion: CompletionRequest, run: CompletionRun, header: ResponseHeader, usage: Usage):
    """The non-streaming answer: one text_completion object (abandoned if the client leaves)."""
    choices = [ChoiceDelta(i) for i in range(completion.num_choices)]
    if completion.logprobs is not None:
        for choice in choices:
            choice.logprobs = LogprobsPart()
    try:
        async for delta in run.deltas():
            if is_disconnected(request):  # nobody will read the answer: create_completion aborts the choices
                return web.Response(status=499)
            merge_delta(choices[delta.index], delta)
            usage.completion_tokens += delta.num_tokens
    except Exception as exc:
        log_unexpected(exc)
        return json_error(exc)
    body = {**header.to_json(), "choices": [c.to_json() for c in choices], "usage": usage.to_json()}
    return web.json_response(body)


def merge_delta(choice: ChoiceDelta, delta: ChoiceDelta) -> None:
    choice.text += delta.text
    if choice.logprobs is not None and delta.logprobs is not None:
        choice.logprobs.extend(delta.logprobs)
    choice.finish_reason = delta.finish_reason or choice.finish_reason


async def stream_completion(request, completion, run: CompletionRun, header: ResponseHeader, usage: Usage):
    """The streaming answer: SSE chunks, an optional usage chunk, then [DONE]."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    try:
        await response.prepare(request)
        async for delta in run.deltas():
            usage.completion_tokens += delta.num_tokens
            if not delta.is_empty:
                await send_event(request, response, make_chunk(header, [delta.to_json()], completion))
        if completion.include_usage:
            await send_event(request, response, {**make_chunk(header, [], completion), "usage": usage.to_json()})
    except ConnectionResetError:  # the client went away: create_completion aborts the choices
        return response
    except Exception as exc:  # after the headers: the error becomes the last event
        log_unexpected(exc)
        with contextlib.suppress(ConnectionResetError):
            await send_event(request, response, openai_error_body(exc))
    await send_done(request, response)
    return response


def log_unexpected(exc: Exception) -> None:
    """Log errors that are not the user's or the engine's expected ones (bugs), with a traceback."""
    if not isinstance(exc, LmqlBackendsError):
        log.error("completion failed unexpectedly", exc_info=exc)


def make_chunk(header: ResponseHeader, choices: list[dict], completion: CompletionRequest) -> dict:
    chunk = {**header.to_json(), "choices": choices}
    if completion.include_usage:
        chunk["usage"] = None
    return chunk


async def send_event(request: web.Request, response: web.StreamResponse, data: dict) -> None:
    """Write one SSE frame; raise ConnectionResetError when the client is gone."""
    if is_disconnected(request):
        raise ConnectionResetError("the client closed the connection")
    await response.write(f"data: {json.dumps(data)}\n\n".encode())


def is_disconnected(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


async def send_done(request: web.Request, response: web.StreamResponse) -> None:
    with contextlib.suppress(ConnectionResetError):
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models: every served name, with the extension fields max_model_len and vocab_size."""
    state = get_state(request)
    loaded = state.loaded
    data = [
        {
            "id": name, "object": "model", "created": 0, "owned_by": "lmql-backends",
            "max_model_len": loaded.context_length, "vocab_size": loaded.vocab_size,
        }
        for name in state.served_names
    ]
    return web.json_response({"object": "list", "data": data})
