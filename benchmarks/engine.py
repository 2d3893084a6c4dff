"""Engine speed figures on a GPT-2-small-shaped model with random weights (CPU, 2 threads).

Prints three ratios, each measured in this one run (medians of several repetitions):

1. legacy pattern: per-token time with a ~1024-token prompt / with a 16-token prompt, when
   every token is a separate ``Request(ids, return_logits=True)`` carrying the whole sequence
   (the ids grow by the argmax). Target <= 1.5: the prefix cache makes a token cost O(1) forwards.
2. continuous batching: aggregate tokens/s of 8 concurrent greedy streams / one stream.
   Target >= 3.
3. engine overhead: single-stream greedy tokens/s through the engine / a hand-written
   transformers KV-cache greedy loop (DynamicCache, one token per forward). Target >= 0.9.

Usage::

    PYTHONPATH=. python benchmarks/engine.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import statistics
import time

import torch

from common import concurrent_tokens_per_second

from lmql_backends.engine import Engine, EngineConfig, PromptOutput, Request, TokenOutput
from lmql_backends.loader import LoadedModel

VOCAB_SIZE = 50257
CONTEXT_LENGTH = 1024
SHORT_PROMPT = 16
NUM_STREAMS = 8


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """How much work each measurement does."""

    legacy_tokens: int
    stream_tokens: int
    repetitions: int


FULL = BenchConfig(legacy_tokens=24, stream_tokens=48, repetitions=3)
QUICK = BenchConfig(legacy_tokens=8, stream_tokens=16, repetitions=2)


def make_loaded_model() -> LoadedModel:
    """A GPT-2-small-shaped model (12 layers, 12 heads, 768 wide) with random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=VOCAB_SIZE, n_positions=CONTEXT_LENGTH)
    model = GPT2LMHeadModel(config).eval()
    return LoadedModel(
        name="gpt2-small-random", model=model, tokenizer=None, bos_token_id=VOCAB_SIZE - 1,
        eos_token_id=VOCAB_SIZE - 1, vocab_size=VOCAB_SIZE, context_length=CONTEXT_LENGTH,
        device="cpu", dtype="float32",
    )


def make_prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB_SIZE - 1) for _ in range(length)]


def next_token_logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    for out in engine.stream_sync(Request(list(ids), return_logits=True), timeout=300):
        if isinstance(out, PromptOutput):
            return out.logits
    raise RuntimeError("the engine sent no prompt output")


def legacy_seconds_per_token(engine: Engine, prompt_length: int, num_tokens: int, seed: int) -> float:
    """Median time of one legacy `forward` request once its prefix is cached."""
    ids = make_prompt(prompt_length, seed)
    ids.append(int(torch.argmax(next_token_logits(engine, ids))))  # computes (and caches) the prompt
    times = []
    for _ in range(num_tokens):
        start = time.perf_counter()
        ids.append(int(torch.argmax(next_token_logits(engine, ids))))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_stream(engine: Engine, prompt: list[int], max_tokens: int) -> int:
    request = Request(prompt, max_tokens=max_tokens)
    return sum(isinstance(out, TokenOutput) for out in engine.stream_sync(request, timeout=300))


def streams_tokens_per_second(engine: Engine, num_streams: int, max_tokens: int, seed: int) -> float:
    """Aggregate greedy tokens/s of `num_streams` concurrent requests (fresh prompts)."""
    return concurrent_tokens_per_second(
        lambda i: run_stream(engine, make_prompt(SHORT_PROMPT, seed * 100 + i), max_tokens), num_streams)


@torch.inference_mode()
def reference_tokens_per_second(model, prompt: list[int], max_tokens: int) -> float:
    """A plain transformers greedy loop with a DynamicCache, one token per forward."""
    from transformers import DynamicCache

    from lmql_backends.engine.runner import cache_keyword

    start = time.perf_counter()
    cache, keyword = DynamicCache(), cache_keyword(model)
    out = model(input_ids=torch.tensor([prompt]), use_cache=True, **{keyword: cache}, logits_to_keep=1)
    for _ in range(max_tokens - 1):
        token = torch.argmax(out.logits[:, -1], dim=-1, keepdim=True)
        out = model(input_ids=token, use_cache=True, **{keyword: cache}, logits_to_keep=1)
    torch.argmax(out.logits[:, -1], dim=-1)
    return max_tokens / (time.perf_counter() - start)


def paired_medians(repetitions: int, measure_a, measure_b) -> tuple[float, float]:
    """Medians of two measurements taken alternately, so that load from other processes hits both."""
    a, b = [], []
    for rep in range(repetitions):
        a.append(measure_a(rep))
        b.append(measure_b(rep))
    return statistics.median(a), statistics.median(b)


def report(name: str, value: float, target: str) -> None:
    print(f"{name:<58} {value:8.3f}   (target {target})", flush=True)


def bench_legacy(engine: Engine, bench: BenchConfig) -> None:
    long_prompt = CONTEXT_LENGTH - bench.legacy_tokens - 1
    short, long = paired_medians(
        bench.repetitions,
        lambda r: legacy_seconds_per_token(engine, SHORT_PROMPT, bench.legacy_tokens, 10 + r),
        lambda r: legacy_seconds_per_token(engine, long_prompt, bench.legacy_tokens, 20 + r),
    )
    print(f"legacy per-token: {short * 1e3:.1f} ms at {SHORT_PROMPT} tokens, {long * 1e3:.1f} ms at {long_prompt} tokens")
    report(f"legacy per-token time, {long_prompt} / {SHORT_PROMPT} prompt tokens", long / short, "<= 1.5")


def bench_batching(engine: Engine, bench: BenchConfig) -> None:
    many, one = paired_medians(
        bench.repetitions,
        lambda r: streams_tokens_per_second(engine, NUM_STREAMS, bench.stream_tokens, 30 + r),
        lambda r: streams_tokens_per_second(engine, 1, bench.stream_tokens, 40 + r),
    )
    print(f"greedy streams: {many:.1f} tokens/s with {NUM_STREAMS} streams, {one:.1f} tokens/s with one")
    report(f"aggregate tokens/s, {NUM_STREAMS} streams / 1 stream", many / one, ">= 3")


def bench_overhead(engine: Engine, loaded: LoadedModel, bench: BenchConfig) -> None:
    ours, reference = paired_medians(
        bench.repetitions,
        lambda r: streams_tokens_per_second(engine, 1, bench.stream_tokens, 50 + r),
        lambda r: reference_tokens_per_second(loaded.model, make_prompt(SHORT_PROMPT, 60 + r), bench.stream_tokens),
    )
    print(f"single stream: engine {ours:.1f} tokens/s, transformers DynamicCache loop {reference:.1f} tokens/s")
    report("single-stream tokens/s, engine / transformers loop", ours / reference, ">= 0.9")


def print_load(when: str) -> None:
    """Other processes on the machine distort every figure; say how busy it was."""
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    warning = "  (busy machine: figures are unreliable)" if load > cores else ""
    print(f"load average {when}: {load:.2f} on {cores} cores{warning}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repetitions (~1 min)")
    parser.add_argument("--only", choices=("legacy", "batching", "overhead"), help="run one measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench = QUICK if args.quick else FULL
    loaded = make_loaded_model()
    engine = Engine(loaded, EngineConfig()).start()
    started = time.perf_counter()
    print_load("at start")
    try:
        streams_tokens_per_second(engine, 1, 4, seed=0)  # warm up
        if args.only in (None, "legacy"):
            bench_legacy(engine, bench)
        if args.only in (None, "batching"):
            bench_batching(engine, bench)
        if args.only in (None, "overhead"):
            bench_overhead(engine, loaded, bench)
    finally:
        engine.stop()
    print_load("at end")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
