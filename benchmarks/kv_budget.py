"""The cost of bounding KV memory (``--kv-cache-bytes``): ratios measured in one run, in-process.

For each model, two engines over the same loaded model, one without a bound and one with a bound
large enough never to hold a request back (so both do the same work and only the budget's
bookkeeping differs: its checks after every step, its measures for /metrics), run in turn:

- one greedy stream of 64 tokens after a 16-token prompt: tokens/s bounded / unbounded;
- eight concurrent greedy streams (the same shapes): aggregate tokens/s bounded / unbounded.

Target: >= 0.95 for both (the bound costs at most 5% while it does not bind).

    python benchmarks/kv_budget.py [--quick] [--model tiny|gpt2-small|all]
"""

from __future__ import annotations


from common import (
    BenchContext, BenchModel, Figure, alternate_medians, as_async, at_least, concurrent_tokens_per_second, standalone_main,
)

from lmql_backends.engine import Engine, EngineConfig, Request, TokenOutput
from lmql_backends.loader import load_model

BENCHMARK = "kv budget"
PROMPT_TOKENS = 16
TARGET = at_least(0.95)
NEVER_BINDING_BYTES = 2**40


def tokens_per_second(engine: Engine, num_streams: int, num_tokens: int, seed: int) -> float:
    """Aggregate greedy tokens/s of `num_streams` concurrent streams with fresh prompts."""

    def stream(i: int) -> int:
        prompt = [1 + (seed * 131 + i * 17 + t) % 1500 for t in range(PROMPT_TOKENS)]
        request = Request(prompt, num_tokens, stop_token_ids=frozenset())
        return sum(isinstance(out, TokenOutput) for out in engine.stream_sync(request, timeout=300))

    return concurrent_tokens_per_second(stream, num_streams)


class KVBudgetBench:
    """The measurements of one model."""

    def __init__(self, context: BenchContext, model: BenchModel):
        self.context, self.model = context, model
        loaded = load_model(model.name)
        self.engines = {
            "unbounded": Engine(loaded, EngineConfig()).start(),
            "bounded": Engine(loaded, EngineConfig(kv_cache_bytes=NEVER_BINDING_BYTES)).start(),
        }
        self.num_tokens = context.settings.pick(64, 16)

    def measure_of(self, which: str, num_streams: int):
        engine = self.engines[which]
        return as_async(lambda rep: tokens_per_second(engine, num_streams, self.num_tokens, rep))

    async def measure(self) -> dict[str, float]:
        for engine in self.engines.values():
            engine.wait_ready()
            tokens_per_second(engine, 8, 4, seed=999)  # warm up every path
        measures = {f"{which} {n}": self.measure_of(which, n) for n in (1, 8) for which in self.engines}
        try:
            return await alternate_medians(self.context.settings.repetitions, measures)
        finally:
            for engine in self.engines.values():
                engine.stop()

    def figures(self, values: dict[str, float]) -> list[Figure]:
        figures = []
        for n in (1, 8):
            bounded, unbounded = values[f"bounded {n}"], values[f"unbounded {n}"]
            figures.append(Figure(
                BENCHMARK, self.model.label, f"{n} greedy stream(s), tokens/s with a bound / without",
                bounded / unbounded, f"{bounded:.0f} vs {unbounded:.0f} tokens/s", TARGET))
        return figures


async def run(context: BenchContext) -> list[Figure]:
    """KV-budget figures of every model of `context`."""
    figures = []
    for model in context.models:
        bench = KVBudgetBench(context, model)
        figures += bench.figures(await bench.measure())
    return figures


if __name__ == "__main__":
    standalone_main(run, __doc__)
