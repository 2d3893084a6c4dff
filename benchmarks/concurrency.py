"""Concurrency: 1, 2, 4, 8 and 16 greedy streams at once against the new server.

Each stream is a raw streamed ``/v1/completions`` request (token-id prompt of 16 tokens,
different per stream, ``ignore_eos``), timed per token as it arrives. For each number of
streams: aggregate tokens/s (all tokens / wall time) and the p50 / p95 per-token latency (the
gaps between consecutive tokens of a stream, over all streams). Figure: aggregate tokens/s
with N streams / with one stream. Target: 8 streams >= 3x one stream (continuous batching).

The same rounds also run through the engine in-process (no HTTP; rows marked ``in-process
engine``, no target): the batching of the engine alone, apart from the server's per-token HTTP
work (a `serve-model` of the new API runs its engine in a process of its own, so that HTTP work
and the engine do not share one GIL; the in-process engine shares this process's GIL with the
streams' consumers).
Rows marked ``model decode step`` (no target) time the runner's batched decode step alone
(N sequences with pasts as long as the streams' midpoint, on the engine's thread count):
tokens/s of one step of N sequences / of one sequence. That is the most continuous batching
can give on this model and machine, before any engine or server work.

    python benchmarks/concurrency.py [--quick] [--model tiny|gpt2-small|all]
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from lmql_backends.client.inprocess import InProcessClient

from common import (
    BenchContext, BenchModel, Figure, StreamTiming, at_least, decode_step_seconds, engine_stream_timing,
    engine_thread_count, load_tokenizer_of, make_http_session, make_prompt_ids, median, percentile, standalone_main,
    stream_completion,
)

BENCHMARK = "concurrency"
STREAM_COUNTS = (1, 2, 4, 8, 16)
PROMPT_TOKENS = 16
TARGETS = {8: at_least(3.0)}


@dataclasses.dataclass(frozen=True)
class RoundResult:
    """N streams run at once: their token timings and the wall time of the whole round."""

    timings: tuple[StreamTiming, ...]
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return sum(t.num_tokens for t in self.timings) / self.seconds

    def gaps(self) -> list[float]:
        return [gap for t in self.timings for gap in t.gaps()]


async def run_round(streams: list) -> RoundResult:
    """Run the timed `streams` (coroutines giving a StreamTiming) at once."""
    start = time.perf_counter()
    timings = await asyncio.gather(*streams)
    return RoundResult(tuple(timings), time.perf_counter() - start)


@dataclasses.dataclass(frozen=True)
class StreamsSummary:
    """Medians over repetitions for one number of streams."""

    num_streams: int
    tokens_per_second: float
    p50_ms: float
    p95_ms: float


async def measure_model(context: BenchContext, model: BenchModel, session) -> dict[str, list[StreamsSummary]]:
    """Summaries per number of streams, through the server ("server") and in-process ("engine")."""
    server = context.servers.get(model.name)
    engine = InProcessClient(model.name).engine
    tokenizer = load_tokenizer_of(model)
    num_tokens = context.settings.pick(64, 16)

    def prompts(num_streams: int, rep: int) -> list[list[int]]:
        return [make_prompt_ids(tokenizer, PROMPT_TOKENS, seed=5000 + 100 * rep + 17 * num_streams + i)
                for i in range(num_streams)]

    streams = {
        "server": lambda p, num: stream_completion(session, server.base_url, model.name, p, num),
        "engine": lambda p, num: engine_stream_timing(engine, p, num),  # no stop token, like ignore_eos
    }
    for stream in streams.values():
        await run_round([stream(p, 4) for p in prompts(2, 99)])  # warm up
    rounds: dict[str, dict[int, list[RoundResult]]] = {way: {n: [] for n in STREAM_COUNTS} for way in streams}
    for rep in range(context.settings.repetitions):
        for n in STREAM_COUNTS:
            for way, stream in streams.items():
                rounds[way][n].append(await run_round([stream(p, num_tokens) for p in prompts(n, rep)]))
    summaries = {way: [summarize(n, by_count[n]) for n in STREAM_COUNTS] for way, by_count in rounds.items()}
    summaries["model"] = measure_model_steps(engine, PROMPT_TOKENS + num_tokens // 2, context.settings.repetitions)
    return summaries


def measure_model_steps(engine, past_len: int, repetitions: int) -> list[StreamsSummary]:
    """Tokens/s of the runner's decode step for each number of sequences (no engine, no server)."""
    runner = engine.runner
    with engine_thread_count(engine):
        _, past = runner.prefill(list(range(1, past_len + 1)), None, 0, all_logits=False)
        times = [[decode_step_seconds(runner, past, n) for n in STREAM_COUNTS] for _ in range(2 * repetitions)]
    steps = [median(column) for column in zip(*times)]  # counts interleaved: noise hits all alike
    return [StreamsSummary(n, n / seconds, seconds * 1e3, seconds * 1e3) for n, seconds in zip(STREAM_COUNTS, steps)]


def summarize(num_streams: int, rounds: list[RoundResult]) -> StreamsSummary:
    gaps = [gap for r in rounds for gap in r.gaps()]
    return StreamsSummary(
        num_streams, median([r.tokens_per_second for r in rounds]), percentile(gaps, 50) * 1e3, percentile(gaps, 95) * 1e3,
    )


def make_figures(model: BenchModel, summaries: list[StreamsSummary], way: str) -> list[Figure]:
    """Ratios to one stream: the server's rows carry the target, the others none."""
    one = summaries[0]
    figures = []
    for s in summaries[1:]:
        if way == "model":
            name = f"model decode step: tokens/s, {s.num_streams} sequences / 1"
            detail = f"{s.tokens_per_second:.1f} vs {one.tokens_per_second:.1f} tokens/s; a step takes {s.p50_ms:.2f} ms (1: {one.p50_ms:.2f})"
            figures.append(Figure(BENCHMARK, model.label, name, s.tokens_per_second / one.tokens_per_second, detail))
            continue
        detail = (f"{s.tokens_per_second:.1f} vs {one.tokens_per_second:.1f} tokens/s; per-token p50 "
                  f"{s.p50_ms:.1f} ms, p95 {s.p95_ms:.1f} ms (1 stream: {one.p50_ms:.1f} / {one.p95_ms:.1f})")
        prefix = "" if way == "server" else "in-process engine: "
        name = f"{prefix}aggregate tokens/s, {s.num_streams} streams / 1 stream"
        ratio = s.tokens_per_second / one.tokens_per_second
        target = TARGETS.get(s.num_streams) if way == "server" else None
        figures.append(Figure(BENCHMARK, model.label, name, ratio, detail, target))
    return figures


async def run(context: BenchContext) -> list[Figure]:
    """Concurrency figures of every model of `context`."""
    figures = []
    async with make_http_session() as session:
        for model in context.models:
            by_way = await measure_model(context, model, session)
            for way, summaries in by_way.items():
                for s in summaries:
                    print(f"{model.label} ({way}): {s.num_streams:2d} streams {s.tokens_per_second:7.1f} tokens/s, "
                          f"per-token p50 {s.p50_ms:.1f} ms p95 {s.p95_ms:.1f} ms", flush=True)
                figures += make_figures(model, summaries, way)
    return figures


if __name__ == "__main__":
    standalone_main(run, __doc__)
