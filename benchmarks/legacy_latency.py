"""Per-token latency of the legacy backend against in-process, on the embedded model.

Starts the legacy server in this process (loopback, free port), then runs the same greedy
64-token decode, one token per call, through `LegacyClient` (HTTP: forward + long-poll
/results) and through `InProcessClient` (the engine directly), several times each, and prints
the median milliseconds per token of each and their ratio. Target: legacy < 5 ms per token.

    PYTHONPATH=. python benchmarks/legacy_latency.py [--tokens 64] [--repeats 5] [--threads N]

On a small shared machine, torch's intra-op (OpenMP) threads spin while idle and compete with
the server and client threads of this one process; ``--threads 1`` or the environment variable
``OMP_WAIT_POLICY=PASSIVE`` show the protocol's own cost without that contention.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch

from lmql_backends.client.base import LMClient
from lmql_backends.client.inprocess import InProcessClient
from lmql_backends.client.legacy_client import LegacyClient
from lmql_backends.engine import SamplingParams
from lmql_backends.server.app import serve

PROMPT = "It is a truth universally acknowledged, that"


async def ms_per_token(client: LMClient, prompt: list[int], num_tokens: int) -> float:
    """Greedy decode of `num_tokens` tokens, one call per token (EOS does not stop it)."""
    ids = list(prompt)
    start = time.perf_counter()
    for _ in range(num_tokens):
        [choice] = await client.generate(ids, None, 1, SamplingParams())
        ids.append(choice.token_id)
    return (time.perf_counter() - start) * 1000 / num_tokens


async def median_ms_per_token(client: LMClient, prompts: list[list[int]], num_tokens: int) -> float:
    await ms_per_token(client, prompts[0], 4)  # warm up connections and the model
    return statistics.median([await ms_per_token(client, p, num_tokens) for p in prompts])


async def run(model: str, num_tokens: int, num_repeats: int) -> None:
    inprocess = InProcessClient(model)
    handle = serve(model, port=0, legacy=True, background=True)
    try:
        words = PROMPT.split()
        prompts = [encode(inprocess, " ".join(words[: 3 + i % len(words)])) for i in range(num_repeats)]
        async with LegacyClient(model, handle.endpoint, inprocess.tokenizer) as legacy:
            legacy_ms = await median_ms_per_token(legacy, prompts, num_tokens)
        inprocess_ms = await median_ms_per_token(inprocess, prompts, num_tokens)
    finally:
        handle.stop()
    print(f"model {model}, greedy {num_tokens}-token decode, median of {num_repeats} runs")
    print(f"legacy (HTTP, loopback): {legacy_ms:.2f} ms/token")
    print(f"in-process:              {inprocess_ms:.2f} ms/token")
    print(f"ratio legacy/in-process: {legacy_ms / inprocess_ms:.2f}x   (target: legacy < 5 ms/token)")


def encode(client: LMClient, text: str) -> list[int]:
    return [client.bos_token_id, *client.tokenizer(text)["input_ids"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}")
    asyncio.run(run(args.model, args.tokens, args.repeats))


if __name__ == "__main__":
    main()
