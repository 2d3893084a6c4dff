"""Token selection on one row of logits: seeded sampling, greedy choice, the hard mask.

Every backend chooses tokens with these functions (the engine server side, the legacy client
on the logits it receives), so they draw the same token. Written with tensor methods only:
this module imports no torch, so the HTTP clients that import it stay light.

Seeded sampling is defined so that every backend draws the same token: the uniform number
used for the token at absolute sequence position ``p`` is ``seeded_uniform(seed, p)``, a pure
function of the seed and the position. A token is drawn by inverse CDF over the probabilities
in token-id order. So chunking, batching and the backend do not change what is drawn.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, Sequence

from .errors import ConstraintError, InvalidRequestError

if TYPE_CHECKING:
    import torch

# (token ids so far, logits [V]) -> new logits [V]
LogitsProcessor = Callable[[Sequence[int], "torch.Tensor"], "torch.Tensor"]

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


def make_mask_processor(allowed: torch.Tensor) -> LogitsProcessor:
    """A processor that sets every logit outside the boolean mask `allowed` to -inf."""
    return MaskProcessor(allowed)


def pad_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Fit a boolean mask to `size` logits: extra logits (padding rows) are never allowed."""
    if mask.shape[0] == size:
        return mask
    if mask.shape[0] > size:
        return mask[:size]
    padded = mask.new_zeros(size)  # the mask's dtype: bool
    padded[: mask.shape[0]] = mask
    return padded


def token_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probabilities of the distribution a token is drawn from (temperature applied)."""
    scaled = logits.float() if params.is_greedy else logits.float() / params.temperature
    logprobs = scaled.log_softmax(dim=-1)
    if logprobs.isnan().any() or logprobs.isneginf().all():
        raise ConstraintError("no token is allowed at this step (every logit is masked)")
    return logprobs


def top_p_filter(logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest most-likely set with probability mass >= top_p; renormalise."""
    if top_p >= 1.0:
        return logprobs
    sorted_lp, order = logprobs.sort(descending=True)
    mass_before = sorted_lp.exp().cumsum(dim=-1) - sorted_lp.exp()
    drop = order[mass_before >= top_p]
    return logprobs.index_fill(0, drop, float("-inf")).log_softmax(dim=-1)


def draw_token(logprobs: torch.Tensor, u: float) -> int:
    """Inverse-CDF draw over probabilities in token-id order (float64 for stability)."""
    cdf = logprobs.double().exp().cumsum(dim=-1)
    index = int((cdf <= u * float(cdf[-1])).sum())  # searchsorted(right=True): cdf never decreases
    if index >= cdf.shape[0]:  # rounding at the top end: take the last allowed token
        index = int((logprobs > float("-inf")).nonzero()[-1])
    return index


def select_token(logits: torch.Tensor, params: SamplingParams, position: int) -> tuple[int, torch.Tensor]:
    """Choose the next token from processed `logits`; return it and the logprobs it came from."""
    logprobs = token_logprobs(logits, params)
    if params.is_greedy:
        return int(logprobs.argmax()), logprobs
    logprobs = top_p_filter(logprobs, params.top_p)
    return draw_token(logprobs, seeded_uniform(params.seed or 0, position)), logprobs


def top_logprobs(logprobs: torch.Tensor, k: int) -> tuple[tuple[int, float], ...]:
    """The `k` most likely tokens with their logprobs, most likely first."""
    if k <= 0:
        return ()
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]))
    return tuple((int(i), float(v)) for i, v in zip(ids, values))
