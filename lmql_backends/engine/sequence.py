"""What flows through the engine: a request in, prompt and token outputs back, and the
per-request state (`Sequence`) the scheduler and runner work on."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable

import torch

from ..sampling import LogitsProcessor, SamplingParams

_request_ids = itertools.count()

# Per layer: (keys, values), each [1, heads, length, head_dim].
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclasses.dataclass
class Request:
    """One unit of work for the engine.

    prompt_ids: the token ids to run (the whole sequence; a cached prefix is not recomputed).
    max_tokens: how many tokens to generate after the prompt (0: only look at the prompt).
    return_logits: send the raw next-token logits after the prompt (the legacy `forward`).
    score_from: send the raw log-probability of every prompt token from this index on (echo).

    The engine trusts what it is handed: the protocol modules and the in-process client check
    requests once, at their boundary (`engine.check_request` states the rules).
    """

    prompt_ids: list[int]
    max_tokens: int = 0
    sampling: SamplingParams = SamplingParams()
    processors: tuple[LogitsProcessor, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    return_logits: bool = False
    score_from: int | None = None
    request_id: str = dataclasses.field(default_factory=lambda: f"req-{next(_request_ids)}")


@dataclasses.dataclass
class PromptOutput:
    """The first output of every request: what was computed for the prompt."""

    num_prompt_tokens: int
    num_cached_tokens: int
    logits: torch.Tensor | None = None
    prompt_logprobs: list[float] | None = None
    prompt_top_logprobs: list[tuple[tuple[int, float], ...]] | None = None
    finish_reason: str | None = None


@dataclasses.dataclass
class TokenOutput:
    """One generated token; the last one of a request carries its finish_reason."""

    token_id: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: str | None = None


@dataclasses.dataclass
class ErrorOutput:
    """The request failed; `error` is raised to the consumer."""

    error: Exception
    finish_reason: str = "error"


Output = PromptOutput | TokenOutput | ErrorOutput


@dataclasses.dataclass(eq=False)
class Sequence:
    """Engine-side state of one request."""

    request: Request
    emit: Callable[[Any], None]
    ids: list[int] = dataclasses.field(default_factory=list)
    kv: KVCache | None = None
    num_computed: int = 0
    num_cached: int = 0
    num_generated: int = 0
    is_finished: bool = False
    is_aborted: bool = False

    def __post_init__(self):
        self.ids = list(self.request.prompt_ids)

    @property
    def num_new(self) -> int:
        return len(self.ids) - self.num_computed

    def new_ids(self) -> list[int]:
        return self.ids[self.num_computed:]
