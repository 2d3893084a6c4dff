"""The engine's own side of token selection: logit_bias and greedy choice for a whole batch.

Everything that chooses one row's token (SamplingParams, the seeded sampler, the mask) is in
``lmql_backends/sampling.py``, shared with the clients.
"""

from __future__ import annotations

import dataclasses

import torch

from ..sampling import LogitsProcessor


@dataclasses.dataclass(frozen=True, eq=False)
class BiasProcessor:
    """Adds OpenAI-style logit_bias values (`values` at `token_ids`) to the logits."""

    token_ids: torch.Tensor
    values: torch.Tensor

    def __call__(self, ids, logits: torch.Tensor) -> torch.Tensor:
        return logits.index_add(0, self.token_ids, self.values.to(logits.dtype))


def make_bias_processor(bias: dict[int, float]) -> LogitsProcessor:
    """A processor adding OpenAI-style logit_bias values to the logits."""
    token_ids = torch.tensor(list(bias.keys()), dtype=torch.long)
    return BiasProcessor(token_ids, torch.tensor(list(bias.values()), dtype=torch.float32))


def apply_processors(processors, ids, logits: torch.Tensor) -> torch.Tensor:
    for process in processors:
        logits = process(ids, logits)
    return logits


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


