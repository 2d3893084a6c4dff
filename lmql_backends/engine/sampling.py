"""Token selection: logits processors and seeded samplers, small callables on plain tensors.

Seeded sampling is defined so that every backend draws the same token: the uniform number
used for the token at absolute sequence position ``p`` is ``seeded_uniform(seed, p)``, a pure
function of the seed and the position. A token is drawn by inverse CDF over the probabilities
in token-id order. So chunking, batching and the backend do not change what is drawn.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from ..errors import ConstraintError, InvalidRequestError

# (token ids so far, logits [V]) -> new logits [V]
LogitsProcessor = Callable[[Sequence[int], torch.Tensor], torch.Tensor]

MASK = 0x_FFFF_FFFF_FFFF_FFFF


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen: temperature 0 is greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    num_top_logprobs: int = 0

    def __post_init__(self):
        if not (self.temperature >= 0):
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not (0 < self.top_p <= 1):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


def splitmix64(x: int) -> int:
    """One round of the splitmix64 mixer: a fast, well-distributed 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def seeded_uniform(seed: int, position: int) -> float:
    """The uniform number in [0, 1) used to sample the token at `position` under `seed`."""
    return (splitmix64(splitmix64(seed & MASK) ^ position) >> 11) / float(1 << 53)


@dataclasses.dataclass(frozen=True, eq=False)
class MaskProcessor:
    """Sets every logit outside the boolean mask `allowed` to -inf (picklable: it crosses to the engine process)."""

    allowed: torch.Tensor

    def __call__(self, ids, logits: torch.Tensor) -> torch.Tensor:
        mask = pad_mask(self.allowed, logits.shape[-1])
        return logits.masked_fill(~mask, float("-inf"))


@dataclasses.dataclass(frozen=True, eq=False)
class BiasProcessor:
    """Adds OpenAI-style logit_bias values (`values` at `token_ids`) to the logits."""

    token_ids: torch.Tensor
    values: torch.Tensor

    def __call__(self, ids, logits: torch.Tensor) -> torch.Tensor:
        return logits.index_add(0, self.token_ids, self.values.to(logits.dtype))


def make_mask_processor(allowed: torch.Tensor) -> LogitsProcessor:
    """A processor that sets every logit outside the boolean mask `allowed` to -inf."""
    return MaskProcessor(allowed)


def make_bias_processor(bias: dict[int, float]) -> LogitsProcessor:
    """A processor adding OpenAI-style logit_bias values to the logits."""
    token_ids = torch.tensor(list(bias.keys()), dtype=torch.long)
    return BiasProcessor(token_ids, torch.tensor(list(bias.values()), dtype=torch.float32))


def pad_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Fit a boolean mask to `size` logits: extra logits (padding rows) are never allowed."""
    if mask.shape[0] == size:
        return mask
    if mask.shape[0] > size:
        return mask[:size]
    return torch.cat([mask, torch.zeros(size - mask.shape[0], dtype=torch.bool)])


def apply_processors(processors, ids, logits: torch.Tensor) -> torch.Tensor:
    for process in processors:
        logits = process(ids, logits)
    return logits


def token_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probabilities of the distribution a token is drawn from (temperature applied)."""
    scaled = logits.float() if params.is_greedy else logits.float() / params.temperature
    logprobs = torch.log_softmax(scaled, dim=-1)
    if torch.isnan(logprobs).any() or torch.isneginf(logprobs).all():
        raise ConstraintError("no token is allowed at this step (every logit is masked)")
    return logprobs


def top_p_filter(logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest most-likely set with probability mass >= top_p; renormalise."""
    if top_p >= 1.0:
        return logprobs
    sorted_lp, order = torch.sort(logprobs, descending=True)
    mass_before = torch.cumsum(sorted_lp.exp(), dim=-1) - sorted_lp.exp()
    drop = order[mass_before >= top_p]
    return torch.log_softmax(logprobs.index_fill(0, drop, float("-inf")), dim=-1)


def draw_token(logprobs: torch.Tensor, u: float) -> int:
    """Inverse-CDF draw over probabilities in token-id order (float64 for stability)."""
    cdf = torch.cumsum(logprobs.double().exp(), dim=-1)
    target = torch.tensor([u * float(cdf[-1])], dtype=torch.float64)
    index = int(torch.searchsorted(cdf, target, right=True))
    if index >= cdf.shape[0]:  # rounding at the top end: take the last allowed token
        index = int(torch.nonzero(logprobs > float("-inf"))[-1])
    return index


def select_token(logits: torch.Tensor, params: SamplingParams, position: int) -> tuple[int, torch.Tensor]:
    """Choose the next token from processed `logits`; return it and the logprobs it came from."""
    logprobs = token_logprobs(logits, params)
    if params.is_greedy:
        return int(torch.argmax(logprobs)), logprobs
    logprobs = top_p_filter(logprobs, params.top_p)
    return draw_token(logprobs, seeded_uniform(params.seed or 0, position)), logprobs


@dataclasses.dataclass(frozen=True)
class Choice:
    """A chosen token and its logprob (what `select_token` returns, made for a batch at once)."""

    token_id: int
    logprob: float
    logprobs: torch.Tensor  # the row it came from, for top_logprobs


def choose_greedy_rows(logits: torch.Tensor) -> list[Choice | None]:
    """The greedy choice of each row of processed `logits` [B, V] with one batched pass.

    Equal to `select_token` row by row (same log_softmax and first-maximum argmax); None for a
    row with no allowed token or a NaN, which `select_token` then reports.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    best, tokens = logprobs.max(dim=-1)
    is_valid = torch.isfinite(best).tolist()
    rows = zip(is_valid, tokens.tolist(), best.tolist(), logprobs)
    return [Choice(token, logprob, row) if valid else None for valid, token, logprob, row in rows]


def top_logprobs(logprobs: torch.Tensor, k: int) -> tuple[tuple[int, float], ...]:
    """The `k` most likely tokens with their logprobs, most likely first."""
    if k <= 0:
        return ()
    values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]))
    return tuple((int(i), float(v)) for i, v in zip(ids, values))
