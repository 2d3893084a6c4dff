"""Single-stream greedy decoding speed of every path, as a ratio to a hand-written transformers loop.

For each model, 128 new tokens after a 16-token prompt, through:

- the hand loop: transformers with a DynamicCache, one token per forward (the reference);
- in-process: ``InProcessClient.generate`` (one request of 128 tokens through the engine);
- in-process on transformers' forward: the same request through an engine with
  ``EngineConfig(model_impl="transformers")`` (``serve-model --model-impl transformers``), to show
  what the engine's own GPT-2 forward contributes (no target);
- ``run_sync`` of an argmax query (``len(TOKENS(X)) <= 128``, the runtime's default chunks);
- the new server: ``OpenAIClient.generate`` (one streamed request) to a serve-model process;
- the legacy server: ``LegacyClient.generate``, one token per request, to a serve-model --legacy process.

Prints tokens/s of each and its ratio to the hand loop. Targets: in-process >= 0.9,
new server >= 0.85, legacy server >= 0.75.

    python benchmarks/single_stream.py [--quick] [--model tiny|gpt2-small|all]
"""

from __future__ import annotations

import time

from common import (
    BenchContext, BenchModel, Figure, Target, alternate_medians, as_async, at_least, engine_stream_timing,
    hand_greedy_loop, make_prompt_ids, num_tokens_before_eos, standalone_main,
)

from lmql_backends.client.base import LMClient
from lmql_backends.client.inprocess import InProcessClient
from lmql_backends.client.legacy_client import LegacyClient
from lmql_backends.client.openai_client import OpenAIClient
from lmql_backends.engine import Engine, EngineConfig, SamplingParams
from lmql_backends.runtime.api import run_sync
from lmql_backends.runtime.tokens import prompt_ids

BENCHMARK = "single stream"
PROMPT_TOKENS = 16
TARGETS = {"in-process": at_least(0.9), "new server": at_least(0.85), "legacy server": at_least(0.75)}
QUERY = 'argmax "{prompt}[X]" where len(TOKENS(X)) <= {num_tokens}'


async def generate_tokens_per_second(client: LMClient, prompt: list[int], num_tokens: int) -> float:
    """One `generate` call of `num_tokens` tokens (stops after EOS)."""
    start = time.perf_counter()
    choices = await client.generate(prompt, None, num_tokens, SamplingParams())
    return len(choices) / (time.perf_counter() - start)


async def engine_tokens_per_second(engine: Engine, prompt: list[int], num_tokens: int, eos: int | None) -> float:
    """One greedy request of `num_tokens` tokens straight through `engine` (stops after EOS, as generate)."""
    start = time.perf_counter()
    timing = await engine_stream_timing(engine, prompt, num_tokens, frozenset() if eos is None else frozenset({eos}))
    return timing.num_tokens / (time.perf_counter() - start)


async def per_token_tokens_per_second(client: LMClient, prompt: list[int], num_tokens: int) -> float:
    """`num_tokens` calls of one token each, the ids growing by the chosen token (the legacy pattern)."""
    ids = list(prompt)
    start = time.perf_counter()
    for _ in range(num_tokens):
        [choice] = await client.generate(ids, None, 1, SamplingParams())
        ids.append(choice.token_id)
    return num_tokens / (time.perf_counter() - start)


def query_tokens_per_second(model: BenchModel, text: str, max_tokens: int, num_generated: int) -> float:
    """An argmax query of at most `max_tokens` tokens in-process, known to generate `num_generated`."""
    query = QUERY.replace("{num_tokens}", str(max_tokens))
    start = time.perf_counter()
    run_sync(query, model="local:" + model.name, prompt=text)
    return num_generated / (time.perf_counter() - start)


class SingleStream:
    """The measurements of one model."""

    def __init__(self, context: BenchContext, model: BenchModel):
        self.context, self.model = context, model
        self.inprocess = InProcessClient(model.name)
        self.tokenizer = self.inprocess.tokenizer
        self.num_tokens = context.settings.pick(128, 32)
        self.hand_tokens: dict[int, list[int]] = {}
        new = context.servers.get(model.name)
        legacy = context.servers.get(model.name, legacy=True)
        self.openai = OpenAIClient(model.name, new.endpoint, self.tokenizer, chunk_timeout=300)
        self.legacy = LegacyClient(model.name, legacy.endpoint, self.tokenizer, chunk_timeout=300)
        self.transformers_engine = Engine(self.inprocess.loaded, EngineConfig(model_impl="transformers")).start()

    def prompt(self, rep: int) -> list[int]:
        return make_prompt_ids(self.tokenizer, PROMPT_TOKENS, seed=rep)

    def hand(self, rep: int) -> float:
        tokens, _, seconds = hand_greedy_loop(self.inprocess.loaded.model, self.prompt(rep), self.num_tokens)
        self.hand_tokens[rep] = tokens
        return len(tokens) / seconds

    def prompt_text(self, rep: int) -> str:
        """The text whose query prompt ids are `prompt(rep)` (BOS, then the text's tokens)."""
        return self.tokenizer.decode(self.prompt(rep)[1:])

    def query(self, rep: int) -> float:
        """Measured after the hand loop of the same repetition: it stops where the hand loop met EOS."""
        num_tokens = num_tokens_before_eos(self.hand_tokens[rep], self.inprocess.eos_token_id)
        return query_tokens_per_second(self.model, self.prompt_text(rep), self.num_tokens, num_tokens)

    def check_prompts(self) -> None:
        """The query's prompt must be the same ids as the other paths' (so it generates the same tokens)."""
        for rep in range(self.context.settings.repetitions):
            if prompt_ids(self.tokenizer, self.prompt_text(rep), self.inprocess.bos_token_id) != self.prompt(rep):
                print(f"warning: the text of prompt {rep} does not tokenize back to its ids; "
                      "the run_sync figure may count tokens wrongly", flush=True)

    def check_no_early_eos(self) -> None:
        """Paths that stop at EOS generate fewer tokens than the hand loop: say so when it happens."""
        for rep, tokens in self.hand_tokens.items():
            if num_tokens_before_eos(tokens, self.inprocess.eos_token_id) < self.num_tokens:
                print(f"note: {self.model.label} writes EOS within {self.num_tokens} tokens of prompt {rep}; "
                      "the paths that stop there count the tokens they generated", flush=True)

    async def warm_up(self) -> None:
        prompt = self.prompt(99)
        for client in (self.inprocess, self.openai):
            await generate_tokens_per_second(client, prompt, 4)
        await engine_tokens_per_second(self.transformers_engine, prompt, 4, None)
        await per_token_tokens_per_second(self.legacy, prompt, 4)
        query_tokens_per_second(self.model, "Warm up", 4, 4)

    async def measure(self) -> dict[str, float]:
        n = self.num_tokens
        await self.warm_up()
        self.check_prompts()
        speeds = await alternate_medians(self.context.settings.repetitions, {
            "hand loop": as_async(self.hand),
            "in-process": lambda rep: generate_tokens_per_second(self.inprocess, self.prompt(rep), n),
            "in-process, transformers forward": lambda rep: engine_tokens_per_second(
                self.transformers_engine, self.prompt(rep), n, self.inprocess.eos_token_id),
            "run_sync query": as_async(self.query),
            "new server": lambda rep: generate_tokens_per_second(self.openai, self.prompt(rep), n),
            "legacy server": lambda rep: per_token_tokens_per_second(self.legacy, self.prompt(rep), n),
        })
        self.check_no_early_eos()
        return speeds

    async def close(self) -> None:
        self.transformers_engine.stop()
        await self.openai.aclose()
        await self.legacy.aclose()


def make_figures(model: BenchModel, speeds: dict[str, float], num_tokens: int) -> list[Figure]:
    hand = speeds["hand loop"]
    figures = []
    for path, speed in speeds.items():
        if path == "hand loop":
            continue
        target: Target | None = TARGETS.get(path)
        detail = f"{speed:.1f} vs {hand:.1f} tokens/s ({num_tokens} tokens)"
        figures.append(Figure(BENCHMARK, model.label, f"{path} / hand loop, tokens/s", speed / hand, detail, target))
    return figures


async def run(context: BenchContext) -> list[Figure]:
    """Single-stream figures of every model of `context`."""
    figures = []
    for model in context.models:
        bench = SingleStream(context, model)
        try:
            speeds = await bench.measure()
        finally:
            await bench.close()
        print(f"{model.label}: " + ", ".join(f"{k} {v:.1f} tokens/s" for k, v in speeds.items()), flush=True)
        figures += make_figures(model, speeds, bench.num_tokens)
    return figures


if __name__ == "__main__":
    standalone_main(run, __doc__)
