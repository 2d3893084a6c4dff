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

Copying against sharing, in the same run: every long-prompt measure (and the memory) is also taken
with the runner's `prefix_sharing` off (each branch's rows copy the prompt's KV, as before shared
prefixes), alternating with the sharing runs; the figure is copying / sharing.

Models: ``tiny`` and ``gpt2-small`` (common.py; native GPT-2 forward) and ``llama``, a Llama-shaped
random model built here (8 layers, 512 wide, 8 query heads reading 2 key/value heads, rotary
positions; the embedded tokenizer), which runs through transformers' forward and the shared-prefix
attention function registered with its attention interface (engine/transformers_attention.py).

    python benchmarks/shared_prefix.py [--quick] [--model tiny|gpt2-small|llama|all]
"""

from __future__ import annotations

import time

import argparse
from pathlib import Path

import torch
from common import (
    TINY_MODEL_DIR, BenchContext, BenchModel, Figure, alternate_medians, as_async, at_most, make_models,
    make_prompt_ids, run_standalone,
)

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
LLAMA_LABEL = "llama-small-random"
MODEL_CHOICES = ("tiny", "gpt2-small", "llama", "all")
#: how the figures show their numbers: unit -> (factor from seconds or bytes, label)
UNITS = {"ms": (1e3, "ms per generated token"), "s": (1.0, "s per query"), "MiB": (2.0**-20, "MiB")}


def build_llama_dir(path: Path) -> str:
    """Save a Llama-shaped random model (grouped-query attention) with the embedded tokenizer.

    As for the GPT-2-small-shaped model, EOS's output row is zero (its logit 0), so that decoding
    rarely stops early.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=8, hidden_size=512, num_attention_heads=8, num_key_value_heads=2, intermediate_size=1376,
        max_position_embeddings=2048, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = 0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def models_of(which: str, workdir: Path) -> list[BenchModel]:
    """common.make_models' models, and the Llama-shaped one for ``llama`` and ``all``."""
    models = make_models(which, workdir) if which != "llama" else []
    if which in ("llama", "all"):
        path = workdir / LLAMA_LABEL
        path.mkdir(parents=True, exist_ok=True)
        models.append(BenchModel(LLAMA_LABEL, build_llama_dir(path)))
    return models


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

    def sample_measure(self, which: str, n: int, sharing: bool = True):
        def measure(rep: int) -> float:
            self.engine.runner.prefix_sharing = sharing
            seconds, tokens = self.run_query(self.prompts[which], sample(n=n, seed=1000 * (rep + 1)))
            return seconds / max(tokens, 1)
        return as_async(measure)

    def beam_measure(self, which: str, sharing: bool = True):
        def measure(rep: int) -> float:
            self.engine.runner.prefix_sharing = sharing
            return self.run_query(self.prompts[which], beam(n=BEAM_N))[0]
        return as_async(measure)

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
            measures[f"sample {n} long copying"] = self.sample_measure("long", n, sharing=False)
            measures[f"sample {n} short"] = self.sample_measure("short", n)
        measures["beam long"] = self.beam_measure("long")
        measures["beam long copying"] = self.beam_measure("long", sharing=False)
        measures["beam short"] = self.beam_measure("short")
        try:
            values = await alternate_medians(self.context.settings.repetitions, measures)
            values["memory many"], values["memory one"] = self.memory()
            self.engine.runner.prefix_sharing = False
            values["memory many copying"], _ = self.memory()
        finally:
            self.engine.runner.prefix_sharing = True
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
        prompts = f"{LONG_PROMPT_TOKENS}-token / 1-token prompt"
        long_prompt = f"{LONG_PROMPT_TOKENS}-token prompt, copying / sharing"
        rows = [(f"sample(n={n}), {prompts}, s per token", f"sample {n} long", f"sample {n} short", "ms",
                 SAMPLE_TARGETS[n]) for n in self.sample_sizes]
        rows += [(f"beam(n={BEAM_N}), {prompts}, s", "beam long", "beam short", "s", BEAM_TARGET),
                 (f"KV bytes, {MEMORY_BRANCHES} branches / 1 branch", "memory many", "memory one", "MiB",
                  MEMORY_TARGET)]
        rows += [(f"sample(n={n}), {long_prompt}, s per token", f"sample {n} long copying", f"sample {n} long", "ms",
                  None) for n in self.sample_sizes]
        rows += [(f"beam(n={BEAM_N}), {long_prompt}, s", "beam long copying", "beam long", "s", None),
                 (f"KV bytes, {MEMORY_BRANCHES} branches, copying / sharing", "memory many copying", "memory many",
                  "MiB", None)]
        return [self.figure(values, *row) for row in rows]

    def figure(self, values: dict[str, float], name: str, numerator: str, denominator: str, unit: str,
               target) -> Figure:
        """The figure `values[numerator] / values[denominator]`, both shown in `unit` (see UNITS)."""
        factor, label = UNITS[unit]
        top, bottom = values[numerator], values[denominator]
        detail = f"{top * factor:.2f} vs {bottom * factor:.2f} {label}"
        return Figure(BENCHMARK, self.model.label, name, top / bottom, detail, target)


async def run(context: BenchContext) -> list[Figure]:
    """Shared-prefix figures of every model of `context`."""
    figures = []
    for model in context.models:
        bench = SharedPrefix(context, model)
        values = await bench.measure()
        figures += bench.figures(values)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--model", choices=MODEL_CHOICES, default="all", help="models (default all)")
    run_standalone(run, parser.parse_args(), models_of)


if __name__ == "__main__":
    main()
