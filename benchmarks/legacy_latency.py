"""Per-token latency of the legacy backend on the embedded model (issue target: < 5 ms per token).

Uses a ``serve-model builtin:tiny --legacy`` process (loopback, a free port) and runs the same
greedy decode, one token per call, through `LegacyClient` (a ``forward`` of the whole sequence per
token, ``POST /queue`` and a long-polled ``/results``, the logits coming back as JSON), alternating with `InProcessClient` (the engine in this
process). Prints the median milliseconds per token of each, against the 5 ms target.

    python benchmarks/legacy_latency.py [--quick]
"""

from __future__ import annotations

import statistics
import time

from common import BenchContext, Figure, at_most, make_prompt_ids, standalone_main

from lmql_backends.client.base import LMClient
from lmql_backends.client.inprocess import InProcessClient
from lmql_backends.client.legacy_client import LegacyClient
from lmql_backends.engine import SamplingParams
from lmql_backends.models import TINY_MODEL_NAME

BENCHMARK = "legacy latency"
TARGET_MS = 5.0
PROMPT_TOKENS = 16


async def ms_per_token(client: LMClient, prompt: list[int], num_tokens: int) -> float:
    """Decode `num_tokens` greedy tokens, one call per token."""
    ids = list(prompt)
    start = time.perf_counter()
    for _ in range(num_tokens):
        [choice] = await client.generate(ids, None, 1, SamplingParams())
        ids.append(choice.token_id)
    return (time.perf_counter() - start) * 1000 / num_tokens


async def measure(paths: dict[str, LMClient], prompts: list[list[int]], num_tokens: int) -> dict[str, float]:
    """Median ms/token of each path, the repetitions taken in turn so load hits all alike."""
    for client in paths.values():
        await ms_per_token(client, prompts[0], 4)  # warm up connections and the model
    times: dict[str, list[float]] = {name: [] for name in paths}
    for prompt in prompts[1:]:
        for name, client in paths.items():
            times[name].append(await ms_per_token(client, prompt, num_tokens))
    return {name: statistics.median(values) for name, values in times.items()}


async def run(context: BenchContext) -> list[Figure]:
    """The legacy latency figures (embedded model only: the target is set on it)."""
    inprocess = InProcessClient(TINY_MODEL_NAME)
    tokenizer = inprocess.tokenizer
    server = context.servers.get(TINY_MODEL_NAME, legacy=True)
    prompts = [make_prompt_ids(tokenizer, PROMPT_TOKENS, seed=rep) for rep in range(context.settings.repetitions + 1)]
    num_tokens = context.settings.pick(64, 32)
    async with LegacyClient(TINY_MODEL_NAME, server.endpoint, tokenizer) as legacy:
        medians = await measure({"legacy": legacy, "in-process": inprocess}, prompts, num_tokens)
    print(", ".join(f"{name} {ms:.2f} ms/token" for name, ms in medians.items()), flush=True)
    return make_figures(medians, num_tokens)


def make_figures(ms: dict[str, float], num_tokens: int) -> list[Figure]:
    detail = f"{num_tokens} greedy tokens, one call each; in-process {ms['in-process']:.2f} ms/token"
    value = ms["legacy"]
    return [Figure(BENCHMARK, "tiny", "legacy client + server: ms per token / 5 ms", value / TARGET_MS,
                   f"{value:.2f} ms/token; {detail}", at_most(1.0))]


if __name__ == "__main__":
    standalone_main(run, __doc__)
