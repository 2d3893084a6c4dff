"""Branches that share a prompt: the cost of a long shared prompt, as ratios measured in one run.

For each model, in-process (``local:MODEL``, the process's shared engine), with a warm prefix cache:

- seeded ``sample(n=8)`` and ``sample(n=16)`` of a query whose prompt is ~860 tokens, against the
  same query with a 1-token prompt (BOS only), 31 new tokens per branch: seconds per generated
  token of the long prompt / of the short one. The two sides run in turn, medians compared; every
  repetition uses new seeds (new branches), the prompt itself is cached by a warm-up run;
- ``beam(n=4)`` after the same two prompts (31 tokens at most): seconds of the query / seconds;
- KV memory: the runner's KV of 16 sequences forked from the cached 860-token prompt after 31
  decode steps / that of one sequence (bytes of the distinct storage they hold, see
  `runner.kv_bytes`).

Targets (issue "Branches that share a prompt cost only their new tokens"): sample n=8 <= 1.6,
n=16 <= 2.0, beam n=4 <= 1.6, memory of 16 branches <= 1.3.

    python benchmarks/shared_prefix.py [--quick] [--model tiny|gpt2-small|all]
"""

from __future__ import annotations

import time

from common import BenchContext, BenchModel, Figure, alternate_medians, as_async, at_most, make_prompt_ids, standalone_main

from lmql_backends.client.inprocess import InProcessClient
from lmql_backends.engine.runner import kv_bytes
from lmql_backends.runtime.api import run_sync
from lmql_backends.runtime.decoders import beam, sample
from lmql_backends.runtime.tokens import prompt_ids

BENCHMARK = "shared prefix"
LONG_PROMPT_TOKENS = 860
NEW_TOKENS = 31
QUERY = '"{prompt}[X]" where len(TOKENS(X)) <= ' + str(NEW_TOKENS)
SAMPLE_TARGETS = {8: at_most(1.6), 16: at_most(2.0)}
BEAM_N, BEAM_TARGET = 4, at_most(1.6)
MEMORY_BRANCHES, MEMORY_TARGET = 16, at_most(1.3)


class SharedPrefix:
    """The measurements of one model."""

    def __init__(self, context: BenchContext, model: BenchModel):
        self.context, self.model = context, model
        self.client = InProcessClient(model.name)
        self.engine = self.client.engine
        tokenizer = self.client.tokenizer
        text = tokenizer.decode(make_prompt_ids(tokenizer, LONG_PROMPT_TOKENS, seed=0)[1:])
        self.prompts = {"long": text, "short": ""}
        self.long_ids = prompt_ids(tokenizer, text, self.client.bos_token_id)  # what the query runs
        self.sample_sizes = context.settings.pick((8, 16), (8, 16))

    def run_query(self, prompt: str, decoder) -> tuple[float, int]:
        """Seconds of one in-process query and the tokens the engine generated for it."""
        before = self.engine.stats().num_generated_tokens
        start = time.perf_counter()
        run_sync(QUERY, model="local:" + self.model.name, decoder=decoder, prompt=prompt)
        return time.perf_counter() - start, self.engine.stats().num_generated_tokens - before

    def sample_measure(self, which: str, n: int):
        def measure(rep: int) -> float:
            seconds, tokens = self.run_query(self.prompts[which], sample(n=n, seed=1000 * (rep + 1)))
            return seconds / max(tokens, 1)
        return as_async(measure)

    def beam_measure(self, which: str):
        return as_async(lambda rep: self.run_query(self.prompts[which], beam(n=BEAM_N))[0])

    def warm_up(self) -> None:
        """Put the long prompt in the prefix cache (and run every path once)."""
        for which in self.prompts:
            self.run_query(self.prompts[which], sample(n=max(self.sample_sizes), seed=1))
            self.run_query(self.prompts[which], beam(n=BEAM_N))

    async def measure(self) -> dict[str, float]:
        self.warm_up()
        measures = {}
        for n in self.sample_sizes:
            measures[f"sample {n} long"] = self.sample_measure("long", n)
            measures[f"sample {n} short"] = self.sample_measure("short", n)
        measures["beam long"] = self.beam_measure("long")
        measures["beam short"] = self.beam_measure("short")
        values = await alternate_medians(self.context.settings.repetitions, measures)
        values["memory many"], values["memory one"] = self.memory()
        return values

    def memory(self) -> tuple[int, int]:
        """KV bytes of MEMORY_BRANCHES sequences forked from the cached prompt, and of one."""
        return self.branch_kv_bytes(MEMORY_BRANCHES), self.branch_kv_bytes(1)

    def branch_kv_bytes(self, num_branches: int) -> int:
        """What the engine does for `num_branches` branches of the cached prompt, on its runner:
        look the prompt up, prefill its last token after the cached part, decode NEW_TOKENS steps."""
        runner, cache, ids = self.engine.runner, self.engine.cache, self.long_ids
        hit = cache.lookup(ids, len(ids) - 1)
        kvs = [runner.prefill(ids[hit.num_tokens:], hit.kv, hit.num_tokens, all_logits=False)[1]
               for _ in range(num_branches)]
        lengths = [len(ids)] * num_branches
        for step in range(NEW_TOKENS):
            _, kvs = runner.decode([step + 1 + b for b in range(num_branches)], kvs, lengths)
            lengths = [n + 1 for n in lengths]
        return kv_bytes(kvs)

    def figures(self, values: dict[str, float]) -> list[Figure]:
        label, figures = self.model.label, []
        for n in self.sample_sizes:
            long, short = values[f"sample {n} long"], values[f"sample {n} short"]
            figures.append(Figure(
                BENCHMARK, label, f"sample(n={n}), {LONG_PROMPT_TOKENS}-token / 1-token prompt, s per token",
                long / short, f"{long * 1e3:.2f} vs {short * 1e3:.2f} ms per generated token", SAMPLE_TARGETS[n]))
        long, short = values["beam long"], values["beam short"]
        figures.append(Figure(BENCHMARK, label, f"beam(n={BEAM_N}), {LONG_PROMPT_TOKENS}-token / 1-token prompt, s",
                              long / short, f"{long:.2f} vs {short:.2f} s per query", BEAM_TARGET))
        many, one = values["memory many"], values["memory one"]
        figures.append(Figure(BENCHMARK, label, f"KV bytes, {MEMORY_BRANCHES} branches / 1 branch",
                              many / one, f"{many / 2**20:.1f} vs {one / 2**20:.1f} MiB", MEMORY_TARGET))
        return figures


async def run(context: BenchContext) -> list[Figure]:
    """Shared-prefix figures of every model of `context`."""
    figures = []
    for model in context.models:
        bench = SharedPrefix(context, model)
        values = await bench.measure()
        figures += bench.figures(values)
    return figures


if __name__ == "__main__":
    standalone_main(run, __doc__)
