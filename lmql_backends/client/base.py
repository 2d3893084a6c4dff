"""The one interface every decoder calls: `LMClient`.

Three implementations: in-process (the engine in this process), the new OpenAI-like API, and
the legacy per-token API. A decoder never knows which one it talks to, which is what makes
results identical across backends.

Conventions shared by all implementations:
- token ids in, token ids out; nothing is re-tokenized from text;
- `mask` is a boolean tensor over the tokenizer's vocabulary (``len(tokenizer)``) or None for
  "every token"; it is a hard mask (masked tokens have probability exactly 0);
- a `TokenChoice.logprob` is the log-probability in the distribution the token was chosen from:
  the model's next-token distribution restricted to the mask and renormalised, with the
  temperature applied for sampling;
- seeded sampling draws the token at absolute position ``p = len(ids)`` with
  ``sampling.seeded_uniform(seed, p)`` (see lmql_backends/sampling.py), on every backend.
"""

from __future__ import annotations

import abc
import dataclasses
import urllib.parse
from typing import Any

import torch

from ..errors import InvalidRequestError
from ..sampling import SamplingParams, make_mask_processor, token_logprobs, top_logprobs

MAX_TOP_TOKENS = 20


@dataclasses.dataclass(frozen=True)
class TokenChoice:
    """A token and its log-probability in the distribution it was chosen from."""

    token_id: int
    logprob: float


class LMClient(abc.ABC):
    """What a decoder can ask of a model, whatever the backend."""

    #: the model string the client was made for
    name: str
    #: a Hugging Face tokenizer of the model, used for all tokenization on the client side
    tokenizer: Any

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def num_tokens(self) -> int:
        """Length of every mask: the tokenizer's vocabulary size including added tokens."""
        return len(self.tokenizer)

    @abc.abstractmethod
    async def generate(
        self, ids: list[int], mask: torch.Tensor | None, max_tokens: int, sampling: SamplingParams
    ) -> list[TokenChoice]:
        """Up to `max_tokens` tokens after `ids`, each chosen under the same fixed `mask`.

        Greedy when ``sampling.temperature == 0``, else seeded sampling. Stops after EOS.
        May return fewer tokens than asked (at least one): a backend that pays per token
        (legacy) returns one, and the decoder asks again with a fresh mask.
        """

    @abc.abstractmethod
    async def top_tokens(self, ids: list[int], mask: torch.Tensor | None, k: int) -> list[TokenChoice]:
        """The `k` (<= 20) most likely next tokens under `mask`, most likely first."""

    @abc.abstractmethod
    async def score(self, ids: list[int], num_context: int) -> list[float]:
        """The model's log-probability of each token of ``ids[num_context:]`` given what precedes it."""

    async def aclose(self) -> None:
        """Release connections (the default has nothing to release)."""

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()


def masked_logprobs(logits: torch.Tensor, mask: torch.Tensor | None, sampling: SamplingParams) -> torch.Tensor:
    """The distribution a token is chosen from, computed on the client from full logits."""
    if mask is not None:
        logits = make_mask_processor(mask)((), logits)
    return token_logprobs(logits, sampling)


def top_choices(logits: torch.Tensor, mask: torch.Tensor | None, k: int, num_tokens: int) -> list[TokenChoice]:
    """The `k` most likely tokens of full next-token `logits` under `mask` (for clients that get logits)."""
    mask = restrict_to_tokenizer(mask, num_tokens, logits.shape[-1])
    logprobs = masked_logprobs(logits, mask, SamplingParams())
    return [TokenChoice(t, lp) for t, lp in top_logprobs(logprobs, k) if lp > float("-inf")]


def is_allowed(mask: torch.Tensor | None, token_id: int) -> bool:
    """Whether `mask` (None: every token) allows `token_id`."""
    return mask is None or (0 <= token_id < mask.shape[0] and bool(mask[token_id]))


def restrict_to_tokenizer(mask: torch.Tensor | None, num_tokens: int, num_logits: int | None) -> torch.Tensor | None:
    """`mask`, or for "every token" a mask of the tokenizer's tokens when the model has more logits.

    Models often pad their output layer past the tokenizer's vocabulary; those ids decode to
    nothing, so "every token" means every token the tokenizer has.
    """
    if mask is not None or num_logits is None or num_logits <= num_tokens:
        return mask
    return torch.ones(num_tokens, dtype=torch.bool)


def make_base_url(endpoint: str, drop_suffix: str | None = None) -> str:
    """``"localhost:8080"`` or ``"http://host:port/"`` → ``"http://host:port"``.

    `drop_suffix` (e.g. ``"/v1"``) is removed when the endpoint ends with it, so the base URLs
    OpenAI SDKs use work too.
    """
    text = endpoint.strip().rstrip("/") if isinstance(endpoint, str) else ""
    if text and "://" not in text:
        text = "http://" + text
    if drop_suffix and text.endswith(drop_suffix):
        text = text[:-len(drop_suffix)]
    parsed = urllib.parse.urlsplit(text)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise InvalidRequestError(
            f"endpoint {endpoint!r} is not of the form 'host:port' or 'http://host:port'", "endpoint"
        )
    return text


def check_chunk_timeout(chunk_timeout: float) -> float:
    """`chunk_timeout` as a float, or InvalidRequestError naming it when it is not > 0."""
    if isinstance(chunk_timeout, bool) or not isinstance(chunk_timeout, (int, float)) or not chunk_timeout > 0:
        raise InvalidRequestError(f"chunk_timeout must be > 0 seconds, got {chunk_timeout!r}", "chunk_timeout")
    return float(chunk_timeout)


def check_top_k(k: int) -> None:
    if not 1 <= k <= MAX_TOP_TOKENS:
        raise InvalidRequestError(f"top_tokens k must be in [1, {MAX_TOP_TOKENS}], got {k}", "k")
