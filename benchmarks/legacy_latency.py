"""Per-token latency of the legacy backend on the embedded model (issue target: < 5 ms per token).

Starts ``serve-model builtin:tiny --legacy`` in its own process (loopback, free port), once with
the lookahead (the default) and once with ``--no-lookahead``, and runs the same greedy decode,
one token per call, through `LegacyClient` (HTTP: a ``forward`` of the whole sequence + a
long-polled ``/results``), alternating with `InProcessClient` (the engine in this process).
Prints the median milliseconds per token of each and their ratios. The last two rows are the
lookahead's worst case: a client that always takes the second-best token, so every lookahead
would be wasted (the server stops starting them for such a client after three wrong guesses).

    python benchmarks/legacy_latency.py [--tokens 64] [--repeats 5] [--model builtin:tiny]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from common import ServerProcess, describe_load, make_prompt_ids, set_threads

from lmql_backends.client.base import LMClient
from lmql_backends.client.inprocess import InProcessClient
from lmql_backends.client.legacy_client import LegacyClient
from lmql_backends.engine import SamplingParams

TARGET_MS = 5.0


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


async def measure(args, clients: dict[str, tuple[LMClient, int]], prompts: list[list[int]]) -> dict[str, float]:
    """Median ms/token of each client, the repetitions taken in turn so load hits all alike."""
    for client, rank in clients.values():
        await ms_per_token(client, prompts[0], 4, rank)  # warm up connections and the model
    times: dict[str, list[float]] = {name: [] for name in clients}
    for prompt in prompts:
        for name, (client, rank) in clients.items():
            times[name].append(await ms_per_token(client, prompt, args.tokens, rank))
    return {name: statistics.median(values) for name, values in times.items()}


async def run(args) -> dict[str, float]:
    inprocess = InProcessClient(args.model)
    prompts = [make_prompt_ids(inprocess.tokenizer, 16, seed=rep) for rep in range(args.repeats)]
    with ServerProcess(args.model, legacy=True) as server, \
            ServerProcess(args.model, legacy=True, extra_args=("--no-lookahead",)) as plain_server:
        async with LegacyClient(args.model, server.endpoint, inprocess.tokenizer) as legacy, \
                LegacyClient(args.model, plain_server.endpoint, inprocess.tokenizer) as plain:
            return await measure(args, {
                "legacy (lookahead)": (legacy, 0),
                "legacy (--no-lookahead)": (plain, 0),
                "in-process": (inprocess, 0),
                "legacy, 2nd-best token (lookahead)": (legacy, 1),
                "legacy, 2nd-best token (--no-lookahead)": (plain, 1),
            }, prompts)


def report(args, medians: dict[str, float]) -> None:
    base = medians["in-process"]
    print(f"model {args.model}, {args.tokens} tokens one call each after a 16-token prompt, "
          f"median of {args.repeats} runs")
    for name, value in medians.items():
        verdict = "" if name == "in-process" else f"   {'met' if value < TARGET_MS else 'MISSED'} (< {TARGET_MS:g} ms)"
        print(f"{name:50s} {value:6.2f} ms/token   {value / base:4.2f}x in-process{verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    set_threads()
    print(describe_load("at start"), flush=True)
    medians = asyncio.run(run(args))
    print(describe_load("at end"))
    report(args, medians)


if __name__ == "__main__":
    main()
