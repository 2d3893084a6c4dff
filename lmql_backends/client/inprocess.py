"""The in-process backend: the model runs in this process, through the shared engine."""

from __future__ import annotations

import atexit
import threading

import torch

from ..engine import Engine, EngineConfig, PromptOutput, Request, SamplingParams, TokenOutput
from ..engine.engine import check_request
from ..sampling import make_mask_processor
from ..loader import LoadedModel, LoadOptions, load_model
from .base import LMClient, TokenChoice, check_top_k, restrict_to_tokenizer, top_choices

_engines: dict[int, Engine] = {}
_engines_lock = threading.Lock()


def shared_engine(loaded: LoadedModel, config: EngineConfig = EngineConfig()) -> Engine:
    """The one engine of this process for `loaded` (created on first use)."""
    with _engines_lock:
        if id(loaded) not in _engines:
            if not _engines:
                atexit.register(stop_shared_engines)
            _engines[id(loaded)] = Engine(loaded, config).start()
        return _engines[id(loaded)]


def stop_shared_engines() -> None:
    """Stop the engine threads before the interpreter exits (never exit inside a forward pass)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.stop()
        _engines.clear()


class InProcessClient(LMClient):
    """Runs queries on a model loaded in this process (``local:MODEL``)."""

    def __init__(self, name: str, options: LoadOptions | None = None):
        self.name = name
        self.loaded = load_model(name, options or LoadOptions())
        self.tokenizer = self.loaded.tokenizer
        self.engine = shared_engine(self.loaded)
        self.context_length = self.loaded.context_length

    def _stream(self, request: Request):
        """The engine's outputs of `request`, checked here (the engine trusts what it is handed)."""
        check_request(request, self.loaded.vocab_size, self.context_length)
        return self.engine.stream(request)

    async def generate(self, ids, mask, max_tokens, sampling: SamplingParams) -> list[TokenChoice]:
        mask = restrict_to_tokenizer(mask, self.num_tokens, self.loaded.vocab_size)
        processors = (make_mask_processor(mask),) if mask is not None else ()
        stop = frozenset({self.eos_token_id}) if self.eos_token_id is not None else frozenset()
        request = Request(list(ids), max_tokens, sampling, processors, stop)
        return [
            TokenChoice(out.token_id, out.logprob)
            async for out in self._stream(request) if isinstance(out, TokenOutput)
        ]

    async def top_tokens(self, ids, mask, k: int) -> list[TokenChoice]:
        check_top_k(k)
        return top_choices(await self.next_token_logits(ids), mask, k, self.num_tokens)

    async def next_token_logits(self, ids) -> torch.Tensor:
        """The raw next-token logits after `ids` (what the legacy `forward` returns)."""
        async for out in self._stream(Request(list(ids), return_logits=True)):
            if isinstance(out, PromptOutput):
                return out.logits
        raise AssertionError("the engine ended a request without its prompt output")

    async def score(self, ids, num_context: int) -> list[float]:
        if num_context >= len(ids):
            return []
        async for out in self._stream(Request(list(ids), score_from=num_context)):
            if isinstance(out, PromptOutput):
                return list(out.prompt_logprobs)
        raise AssertionError("the engine ended a request without its prompt output")
