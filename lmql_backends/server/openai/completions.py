"""The typed ``/v1/completions`` request: JSON body → `CompletionRequest` → engine `Request`s.

Every bad value raises `InvalidRequestError` (or `ModelNotFoundError`) naming the parameter,
the value and the fix, before any engine work starts. Each (prompt, choice) of a valid
request becomes one `ChoicePlan`: its index in the response, its prompt and its engine request.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
from typing import Any, Iterator

import torch

from ...engine import Request, SamplingParams
from ...engine.sampling import make_bias_processor
from ...sampling import make_mask_processor
from ...errors import ContextLengthError, InvalidRequestError, ModelNotFoundError
from ..state import ServerState
from ..validation import first_outside_vocabulary, is_id_list, is_int, is_number, is_valid_unicode, json_type

DEFAULT_MAX_TOKENS = 16
MAX_MAX_TOKENS = 2**31
MAX_N = 16
MAX_STOPS = 4
MAX_TEMPERATURE = 2.0
MAX_BIAS = 100.0
SEED_RANGE = (-(2**63), 2**64)


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
        check_is_object(body)
        shared = read_shared_fields(body, state)
        echo = read_bool(body, "echo", False)
        prompts = read_prompts(body, state.loaded.tokenizer, state.loaded.vocab_size)
        max_tokens = read_max_tokens(body, echo)
        check_fits_context(prompts, max_tokens, state.loaded.context_length)
        return cls(
            prompts=prompts,
            max_tokens=max_tokens,
            logprobs=read_int(body, "logprobs", None, 0, state.config.logprobs_limit(state.loaded.vocab_size)),
            echo=echo,
            **shared,
        )

    @property
    def num_choices(self) -> int:
        """How many choices the response has: every prompt times n."""
        return len(self.prompts) * self.n

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def read_shared_fields(body: dict, state: ServerState) -> dict[str, Any]:
    """The CompletionRequest fields that /v1/completions and /v1/chat/completions read alike."""
    model = read_model(body, state.served_names)
    vocab_size = state.loaded.vocab_size
    n = read_int(body, "n", 1, 1, MAX_N)
    check_unsupported(body, n)
    return dict(
        model=model,
        temperature=read_float(body, "temperature", 1.0, 0.0, MAX_TEMPERATURE),
        top_p=read_top_p(body),
        n=n,
        seed=read_int(body, "seed", None, *SEED_RANGE),
        stop=read_stop(body),
        logit_bias=read_logit_bias(body, vocab_size),
        stream=read_bool(body, "stream", False),
        include_usage=read_include_usage(body),
        allowed_token_ids=read_allowed_token_ids(body, vocab_size),
        return_tokens_as_token_ids=read_bool(body, "return_tokens_as_token_ids", False),
        ignore_eos=read_bool(body, "ignore_eos", False),
    )


def decode_json_body(raw: bytes) -> Any:
    """The decoded JSON body; anything that is not JSON (or not UTF-8) is an InvalidRequestError."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, too deep
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from None


# ---- value types -----------------------------------------------------------------------


def check_is_object(body: Any) -> None:
    if not isinstance(body, dict):
        raise InvalidRequestError(f"the request body must be a JSON object, got {json_type(body)}")


def check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise InvalidRequestError(f"'{name}' must be between {low} and {high}, got {value}", name)


# ---- generic parameters ----------------------------------------------------------------


def read_bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequestError(f"'{name}' must be true or false, got {value!r}", name)
    return value


def read_optional_int(body: dict, name: str) -> int | None:
    """The integer `name`, or None when it is missing or null."""
    value = body.get(name)
    if value is not None and not is_int(value):
        raise InvalidRequestError(f"'{name}' must be an integer, got {json_type(value)} {value!r}", name)
    return value


def read_int(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    """An integer in [low, high] (None: `default`)."""
    value = read_optional_int(body, name)
    if value is None:
        return default
    check_range(name, value, low, high)
    return value


def read_float(body: dict, name: str, default: float, low: float, high: float) -> float:
    """A number in [low, high] (None: `default`)."""
    value = body.get(name)
    if value is None:
        return default
    if not is_number(value):
        raise InvalidRequestError(f"'{name}' must be a number, got {json_type(value)} {value!r}", name)
    check_range(name, value, low, high)
    return float(value)


# ---- specific parameters ---------------------------------------------------------------


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


def read_top_p(body: dict) -> float:
    top_p = read_float(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise InvalidRequestError("'top_p' must be in (0, 1], got 0", "top_p")
    return top_p


def read_max_tokens(body: dict, echo: bool) -> int:
    """max_tokens >= 0; 0 only with echo (scoring the prompt)."""
    max_tokens = read_optional_int(body, "max_tokens")
    if max_tokens is None:
        return DEFAULT_MAX_TOKENS
    if max_tokens < 0:
        raise InvalidRequestError(f"'max_tokens' must be >= 0, got {max_tokens}", "max_tokens")
    check_range("max_tokens", max_tokens, 0, MAX_MAX_TOKENS)
    if max_tokens == 0 and not echo:
        raise InvalidRequestError(
            "'max_tokens' is 0 but 'echo' is false: max_tokens=0 only scores the prompt, so set echo=true "
            "(and logprobs) or ask for at least 1 token", "max_tokens"
        )
    return max_tokens


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
    if not re.fullmatch(r"[0-9]{1,18}", key) or not int(key) < vocab_size:
        raise InvalidRequestError(
            f"'logit_bias' key {key[:24]!r} is not a token id in the vocabulary [0, {vocab_size})", "logit_bias"
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
    if not is_id_list(ids):
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


# ---- prompts ---------------------------------------------------------------------------


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
    if is_id_list(prompt):
        return (check_token_ids(prompt, vocab_size, "prompt"),)
    if all(isinstance(p, list) for p in prompt):
        return tuple(read_id_list(p, vocab_size) for p in prompt)
    raise mixed_prompt_error(prompt)


def mixed_prompt_error(prompt: list) -> InvalidRequestError:
    index, item = first_odd_item(prompt)
    return InvalidRequestError(
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


def read_id_list(ids: list, vocab_size: int) -> tuple[int, ...]:
    if not is_id_list(ids):
        raise InvalidRequestError("every token-id array in 'prompt' must be a non-empty array of integers", "prompt")
    return check_token_ids(ids, vocab_size, "prompt")


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> tuple[int, ...]:
    bad = first_outside_vocabulary(ids, vocab_size)
    if bad is not None:
        raise InvalidRequestError(f"token id {bad} in '{param}' is outside the vocabulary [0, {vocab_size})", param)
    return tuple(ids)


def check_fits_context(prompts: tuple[tuple[int, ...], ...], max_tokens: int, context_length: int) -> None:
    """Every prompt has a token, and room for max_tokens more within the model's context."""
    for prompt in prompts:
        if not prompt:
            raise InvalidRequestError("the prompt is empty; send at least one token", "prompt")
        if len(prompt) + max_tokens > context_length:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens and max_tokens is {max_tokens}, "
                f"which exceeds the model's context length of {context_length} tokens", "max_tokens"
            )


# ---- engine requests -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChoicePlan:
    """One choice of the response: its index, its prompt and the engine request that makes it."""

    index: int
    prompt_ids: tuple[int, ...]
    request: Request


def make_choice_plans(completion: CompletionRequest, state: ServerState) -> list[ChoicePlan]:
    """One engine request per (prompt, choice) of the validated `completion`; choice i samples with seed + i."""
    base_seed = completion.seed if completion.seed is not None else secrets.randbelow(2**63)
    processors = make_processors(completion, state.loaded.vocab_size)
    stop_ids = stop_token_ids(completion, state.loaded.eos_token_id)
    check_num_choices(completion, state.engine.config)
    return [
        ChoicePlan(index, prompt, make_request(completion, prompt, base_seed + i, processors, stop_ids))
        for index, prompt, i in enumerate_choices(completion)
    ]


def enumerate_choices(completion: CompletionRequest) -> Iterator[tuple[int, tuple[int, ...], int]]:
    """(index in the response, prompt, number among the prompt's n choices) of every choice, in order."""
    for p, prompt in enumerate(completion.prompts):
        for i in range(completion.n):
            yield p * completion.n + i, prompt, i


def make_request(completion: CompletionRequest, prompt: tuple[int, ...], seed: int, processors, stop_ids) -> Request:
    """The engine request of one choice (echo with logprobs also scores the prompt from token 1)."""
    is_scoring_prompt = completion.echo and completion.wants_logprobs
    return Request(
        list(prompt), completion.max_tokens, make_sampling(completion, seed), processors, stop_ids,
        score_from=1 if is_scoring_prompt else None,
    )


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
        processors.append(make_mask_processor(make_allowed_mask(completion.allowed_token_ids, vocab_size)))
    return tuple(processors)


def make_allowed_mask(allowed_token_ids: tuple[int, ...], vocab_size: int) -> torch.Tensor:
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    allowed[list(allowed_token_ids)] = True
    return allowed


def stop_token_ids(completion: CompletionRequest, eos_token_id: int | None) -> frozenset[int]:
    if completion.ignore_eos or eos_token_id is None:
        return frozenset()
    return frozenset({eos_token_id})
