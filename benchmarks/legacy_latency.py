"""Per-token latency of the legacy backend on the embedded model (issue target: < 5 ms per token).

Uses ``serve-model builtin:tiny --legacy`` processes (loopback, free ports), one with the
lookahead (the default) and one with ``--no-lookahead``, and runs the same greedy decode, one
token per call, through `LegacyClient` (a ``forward`` of the whole sequence per token: the first
over HTTP, the rest over the server's WebSocket channel ``/queue/socket``, the logits coming back
as binary float32), alternating with `InProcessClient` (the engine in this
process). Prints the median milliseconds per token of each, against the 5 ms target. The
last rows are the lookahead's worst case: a client that always takes the second-best token,
so every lookahead would be wasted (the server stops starting them for such a client after
three wrong guesses), with and without the lookahead.

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


async def ms_per_token(client: LMClient, prompt: list[int], num_tokens: int, rank: int = 0) -> float:
    """Decode `num_tokens` tokens, one call per token, taking the `rank`-th best token each time."""
    ids = list(prompt)
    start = time.perf_counter()
    for _ in range(num_tokens):
        if rank == 0:
            [choice] = await client.generate(ids, None, 1, SamplingParams())
        else:
            choice = (await client.top_tokens(ids, None, rank + 1))[rank]
        ids.append(choice.token_id)
    return (time.perf_counter() - start) * 1000 / num_tokens


async def measure(paths: dict[str, tuple[LMClient, int]], prompts: list[list[int]], num_tokens: int) -> dict[str, float]:
    """Median ms/token of each path, the repetitions taken in turn so load hits all alike."""
    for client, rank in paths.values():
        await ms_per_token(client, prompts[0], 4, rank)  # warm up connections and the model
    times: dict[str, list[float]] = {name: [] for name in paths}
    for prompt in prompts[1:]:
        for name, (client, rank) in paths.items():
            times[name].append(await ms_per_token(client, prompt, num_tokens, rank))
    return {name: statistics.median(values) for name, values in times.items()}


async def run(context: BenchContext) -> list[Figure]:
    """The legacy latency figures (embedded model only: the target is set on it)."""
    inprocess = InProcessClient(TINY_MODEL_NAME)
    tokenizer = inprocess.tokenizer
    server = context.servers.get(TINY_MODEL_NAME, legacy=True)
    plain_server = context.servers.get(TINY_MODEL_NAME, legacy=True, extra_args=("--no-lookahead",))
    prompts = [make_prompt_ids(tokenizer, PROMPT_TOKENS, seed=rep) for rep in range(context.settings.repetitions + 1)]
    num_tokens = context.settings.pick(64, 32)
    async with LegacyClient(TINY_MODEL_NAME, server.endpoint, tokenizer) as legacy, \
            LegacyClient(TINY_MODEL_NAME, plain_server.endpoint, tokenizer) as plain:
        medians = await measure({
            "legacy": (legacy, 0), "legacy --no-lookahead": (plain, 0), "in-process": (inprocess, 0),
            "2nd-best legacy": (legacy, 1), "2nd-best legacy --no-lookahead": (plain, 1),
        }, prompts, num_tokens)
    print(", ".join(f"{name} {ms:.2f} ms/token" for name, ms in medians.items()), flush=True)
    return make_figures(medians, num_tokens)


def make_figures(ms: dict[str, float], num_tokens: int) -> list[Figure]:
    detail = f"{num_tokens} greedy tokens, one call each; in-process {ms['in-process']:.2f} ms/token"

    def figure(name: str, key: str, target=None) -> Figure:
        value = ms[key]
        return Figure(BENCHMARK, "tiny", name, value / TARGET_MS, f"{value:.2f} ms/token; {detail}", target)

    worst = ms["2nd-best legacy"] / ms["2nd-best legacy --no-lookahead"]
    return [
        figure("legacy client + server: ms per token / 5 ms", "legacy", at_most(1.0)),
        figure("same, serve-model --no-lookahead: ms per token / 5 ms", "legacy --no-lookahead"),
        Figure(BENCHMARK, "tiny", "client always takes the 2nd-best token: lookahead / --no-lookahead, ms per token",
               worst, f"{ms['2nd-best legacy']:.2f} vs {ms['2nd-best legacy --no-lookahead']:.2f} ms/token"),
    ]


if __name__ == "__main__":
    standalone_main(run, __doc__)
