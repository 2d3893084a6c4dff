"""An `LMClient` that reports every decoding step to an observer: `ObservedClient`.

It wraps a client whose backend can return raw next-token logits (the in-process client) and
passes every call through, so a decoder runs exactly as it would on the wrapped client. Each
`generate` asks the wrapped client for one token (allowed by the `LMClient` contract: a
decoder asks again with a fresh mask), so every token it returns is one the decoder keeps,
decided under the mask it was given. For that step it reads the model's unmasked
distribution and reports, in order:

- `PromptEvent`: context ids not reported yet (the prompt text between variables);
- `TokenEvent`: the chosen token, its log-probability (as the decoder sees it), how many
  tokens the mask allowed, the model's top-k alternatives (masked ones marked) and the best
  token the mask removed when the model preferred it to the chosen one;
- `VariableEndEvent`: why the variable just generated ended (the decoders call
  `variable_ended` with the variable's finish reason).

Apart from that one call, everything is read from the calls the decoders make.
"""

from __future__ import annotations

import dataclasses
import os.path
from typing import Callable, Union

import torch

from ..sampling import SamplingParams, top_logprobs
from .base import LMClient, TokenChoice, masked_logprobs, restrict_to_tokenizer

DEFAULT_TOP_K = 5


@dataclasses.dataclass(frozen=True)
class Alternative:
    """A token the model could have chosen: its id, text and unmasked log-probability."""

    token_id: int
    text: str
    logprob: float
    is_allowed: bool


@dataclasses.dataclass(frozen=True)
class PromptEvent:
    """Prompt text the decoder put before the next token (ids not reported before)."""

    token_ids: tuple[int, ...]
    text: str


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One generated token and what the model and the constraints said at its step."""

    token_id: int
    text: str
    #: log-probability in the distribution the token was chosen from (masked, renormalised)
    logprob: float
    #: the model's own (unmasked) log-probability of the token
    model_logprob: float
    #: how many tokens the constraints allowed at this step
    num_allowed: int
    num_tokens: int
    top: tuple[Alternative, ...]
    #: the likeliest token the mask removed, when the model preferred it to the chosen one
    best_masked: Alternative | None
    is_eos: bool


@dataclasses.dataclass(frozen=True)
class VariableEndEvent:
    """The variable that produced the last `TokenEvent`s ended; `reason` says why."""

    variable: str
    reason: str  # "eos", "stop", "forced", "length"
    description: str


Event = Union[PromptEvent, TokenEvent, VariableEndEvent]

END_DESCRIPTIONS = {
    "eos": "the model chose the end-of-sequence token",
    "stop": "a stop phrase of {variable} (STOPS_AT / STOPS_BEFORE) occurred",
    "forced": "the where clause allows no further token for {variable}",
    "length": "the query reached max_len (or the model's context length)",
}


class ObservedClient(LMClient):
    """Passes every call to `inner` and reports each decoding step to `observe` (see the module doc)."""

    def __init__(self, inner: LMClient, observe: Callable[[Event], None], top_k: int = DEFAULT_TOP_K):
        if not hasattr(inner, "next_token_logits"):
            raise TypeError(f"{type(inner).__name__} cannot return next-token logits; observe an in-process client")
        self.inner, self.observe, self.top_k = inner, observe, top_k
        self.name, self.tokenizer = inner.name, inner.tokenizer
        self.context_length = getattr(inner, "context_length", None)
        self._shown: list[int] = []  # the ids reported so far (prompt and tokens), in order

    async def generate(self, ids, mask, max_tokens, sampling: SamplingParams) -> list[TokenChoice]:
        ids = list(ids)
        self._report_context(ids)
        logits = await self.inner.next_token_logits(ids)
        choices = (await self.inner.generate(ids, mask, 1, sampling))[:1]
        for choice in choices:
            self.observe(self._token_event(logits, mask, choice))
            self._shown = ids + [choice.token_id]
        return choices

    async def top_tokens(self, ids, mask, k: int) -> list[TokenChoice]:
        return await self.inner.top_tokens(ids, mask, k)

    async def score(self, ids, num_context: int) -> list[float]:
        return await self.inner.score(ids, num_context)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def variable_ended(self, variable: str, reason: str) -> None:
        """Called by the decoders when `variable` has ended with `reason` (a finish reason)."""
        description = END_DESCRIPTIONS.get(reason, reason).format(variable=variable)
        self.observe(VariableEndEvent(variable, reason, description))

    def finish(self, prompt: str) -> None:
        """Report the prompt text after the last variable, once the query has returned with the
        whole prompt text `prompt` (``QueryResult.prompt``)."""
        self._report_text(prompt, ())

    # ---- what each call tells --------------------------------------------------------------

    def _report_context(self, ids: list[int]) -> None:
        """A prompt event for what `ids` adds to what was reported."""
        if ids != self._shown:
            self._report_text(self.text_of(ids), ids[common_prefix_length(self._shown, ids):])
        self._shown = ids

    def _report_text(self, text: str, new_ids) -> None:
        """The decoder moved on to a context whose text is `text`: show what it adds (after a stop
        phrase cut a value, what follows the kept text)."""
        shown = self.text_of(self._shown)
        new_text = text[len(shown):] if text.startswith(shown) else text[len(os.path.commonprefix([shown, text])):]
        if new_text:
            self.observe(PromptEvent(tuple(new_ids), new_text))

    def text_of(self, ids: list[int]) -> str:
        """The prompt text of context `ids`: without the BOS token and EOS tokens (as results show it)."""
        if ids and ids[0] == self.bos_token_id:
            ids = ids[1:]
        return self.tokenizer.decode([t for t in ids if t != self.eos_token_id])

    def _token_event(self, logits: torch.Tensor, mask, choice: TokenChoice) -> TokenEvent:
        num_tokens = self.num_tokens
        logits = logits[:num_tokens] if logits.shape[-1] > num_tokens else logits
        model = masked_logprobs(logits, None, SamplingParams())
        mask = restrict_to_tokenizer(mask, num_tokens, logits.shape[-1])
        allowed = torch.ones(model.shape[-1], dtype=torch.bool) if mask is None else mask[:model.shape[-1]]
        top = tuple(self._alternative(t, lp, allowed) for t, lp in top_logprobs(model, self.top_k))
        removed = model.masked_fill(allowed, float("-inf"))
        best_masked = None
        if not bool(allowed.all()):
            best = int(torch.argmax(removed))
            if removed[best] > model[choice.token_id]:
                best_masked = self._alternative(best, float(removed[best]), allowed)
        return TokenEvent(
            choice.token_id, self.tokenizer.decode([choice.token_id]), choice.logprob, float(model[choice.token_id]),
            int(allowed.sum()), num_tokens, top, best_masked, choice.token_id == self.eos_token_id,
        )

    def _alternative(self, token_id: int, logprob: float, allowed: torch.Tensor) -> Alternative:
        return Alternative(token_id, self.tokenizer.decode([token_id]), float(logprob), bool(allowed[token_id]))


def common_prefix_length(a: list[int], b: list[int]) -> int:
    return len(os.path.commonprefix([a, b]))
