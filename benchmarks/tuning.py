"""Does each piece of the engine's tuning pay? Each one on and off, in one run, in-process.

A piece of tuning stays in the package only where it gains at least 10% on the GPT-2-small-shaped
model (or where correctness or robustness needs it). For each piece, two engines that differ only
in that setting serve the same greedy requests, round by round in turn (medians):

- ``--model-impl``: the engine's own GPT-2 forward (``native``) / transformers' forward;
- ``--matmul``: the per-layer choice between BLAS, oneDNN and oneDNN on packed weights, timed at
  start (``auto``) / BLAS
  alone (``blas``); also the seconds the engine takes to start with each;
- batched prefills: prompts arriving together run in one forward / one forward each.

Rows: tokens/s of 1 stream and of 8 streams at once (64 tokens after a 16-token prompt) with the
piece on / off, so > 1 means the piece pays; for the pieces that act at start, the engine start
seconds they add, in rounds of 8 streams.

    python benchmarks/tuning.py [--quick] [--model tiny|gpt2-small|all]
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import torch
from common import (
    BenchContext, BenchModel, Figure, alternate_medians, engine_stream_timing, make_prompt_ids, standalone_main,
)

from lmql_backends.engine import Engine, EngineConfig
from lmql_backends.loader import load_model

BENCHMARK = "tuning"
PROMPT_TOKENS = 16
STREAM_COUNTS = (1, 8)


@dataclasses.dataclass(frozen=True)
class Piece:
    """One piece of tuning: the engine configuration with it on, and with it off."""

    name: str
    on: EngineConfig
    off: EngineConfig
    #: whether the piece works at start (then its start-up seconds are a row too)
    acts_at_start: bool = False


def make_pieces() -> list[Piece]:
    default_threads = torch.get_num_threads()
    blas = dict(matmul="blas", num_threads=default_threads)
    return [
        Piece("native GPT-2 forward / transformers forward",
              EngineConfig(model_impl="native", **blas), EngineConfig(model_impl="transformers", **blas)),
        Piece("matmul auto / blas", EngineConfig(matmul="auto", num_threads=default_threads), EngineConfig(**blas),
              acts_at_start=True),
        Piece("batched prefills / one by one", EngineConfig(**blas), EngineConfig(batch_prefills=False, **blas)),
    ]


def start_engine(loaded, config: EngineConfig) -> tuple[Engine, float]:
    """A started engine and the seconds it took to be ready (kernel and thread timing included)."""
    start = time.perf_counter()
    engine = Engine(loaded, config).start()
    engine.wait_ready(timeout=600)
    return engine, time.perf_counter() - start


async def tokens_per_second(engine: Engine, prompts: list[list[int]], num_tokens: int) -> float:
    """Aggregate tokens/s of one greedy request per prompt, all at once."""
    start = time.perf_counter()
    timings = await asyncio.gather(*(engine_stream_timing(engine, p, num_tokens) for p in prompts))
    return sum(t.num_tokens for t in timings) / (time.perf_counter() - start)


class TuningBench:
    """The measurements of one model."""

    def __init__(self, context: BenchContext, model: BenchModel):
        self.context, self.model = context, model
        self.loaded = load_model(model.name)
        self.num_tokens = context.settings.pick(64, 16)

    def prompts(self, num_streams: int, rep: int) -> list[list[int]]:
        """Prompts new in every round, so that no prefix cache helps either engine."""
        tokenizer = self.loaded.tokenizer
        return [make_prompt_ids(tokenizer, PROMPT_TOKENS, seed=1000 * rep + i) for i in range(num_streams)]

    async def measure_piece(self, piece: Piece) -> list[Figure]:
        engines, start_seconds = {}, {}
        for side, config in (("on", piece.on), ("off", piece.off)):
            engines[side], start_seconds[side] = start_engine(self.loaded, config)
        try:
            figures = []
            for num_streams in STREAM_COUNTS:
                medians = await alternate_medians(self.context.settings.repetitions, {
                    side: self.rate(engine, num_streams) for side, engine in engines.items()
                })
                figures.append(Figure(
                    BENCHMARK, self.model.label, f"{piece.name}: tokens/s, {num_streams} stream(s)",
                    medians["on"] / medians["off"], f"{medians['on']:.1f} vs {medians['off']:.1f} tokens/s",
                ))
            if piece.acts_at_start:
                figures.append(self.start_figure(piece, start_seconds, medians["off"]))
            return figures
        finally:
            for engine in engines.values():
                engine.stop()

    def start_figure(self, piece: Piece, seconds: dict[str, float], tokens_per_second_off: float) -> Figure:
        """What the piece adds at start, in rounds of the last stream count (the model is loaded once, before)."""
        extra = seconds["on"] - seconds["off"]
        round_seconds = STREAM_COUNTS[-1] * self.num_tokens / tokens_per_second_off
        return Figure(
            BENCHMARK, self.model.label,
            f"{piece.name}: extra engine start seconds / seconds of one {STREAM_COUNTS[-1]}-stream round",
            extra / round_seconds, f"{seconds['on']:.2f} vs {seconds['off']:.2f} s to start; a round {round_seconds:.2f} s",
        )

    def rate(self, engine: Engine, num_streams: int):
        async def measure(rep: int) -> float:
            return await tokens_per_second(engine, self.prompts(num_streams, rep), self.num_tokens)

        return measure


async def run(context: BenchContext) -> list[Figure]:
    figures = []
    for model in context.models:
        bench = TuningBench(context, model)
        for piece in make_pieces():
            figures += await bench.measure_piece(piece)
    return figures


if __name__ == "__main__":
    standalone_main(run, __doc__)
