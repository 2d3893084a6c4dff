"""Prompt-length scaling: per-token time with a 16-, 256- and ~1024-token prompt.

Three paths per model:

- legacy pattern through the engine (in-process): every token is a separate
  ``Request(ids, return_logits=True)`` carrying the whole sequence, the ids growing by the argmax;
- the same pattern through the legacy server (``LegacyClient.generate``, one token per request);
- decoding through the new server: one streamed request; per-token time is the median gap
  between tokens (prefill excluded).

A fourth row (no target) times the runner's one-sequence decode step alone after each past:
the model's own cost of a longer past (attention reads every stored key and value), which
no serving layer can remove.

The longest prompt fills the context: 1024 minus the tokens generated. Figure: per-token time
at that length / at 16 tokens. Target <= 1.5 (the prefix cache makes a legacy token cost one
forward of one token, whatever the length).

    python benchmarks/scaling.py [--quick] [--model tiny|gpt2-small|all]
"""

from __future__ import annotations

import time

import torch
from common import (
    BenchContext, BenchModel, Figure, alternate_medians, as_async, at_most, decode_step_seconds,
    engine_thread_count, make_http_session, make_prompt_ids, median, measure_each_model, standalone_main,
    stream_completion,
)

from lmql_backends.client.inprocess import InProcessClient
from lmql_backends.client.legacy_client import LegacyClient

BENCHMARK = "prompt scaling"
SHORT, MIDDLE = 16, 256
TARGET = at_most(1.5)
MODEL_STEP = "model decode step (runner alone)"


class Scaling:
    """Per-token times of one model at each prompt length, on each path."""

    def __init__(self, context: BenchContext, model: BenchModel, session):
        self.context, self.model, self.session = context, model, session
        self.inprocess = InProcessClient(model.name)
        self.tokenizer = self.inprocess.tokenizer
        self.num_tokens = context.settings.pick(24, 8)
        self.long = self.inprocess.context_length - self.num_tokens - 2
        self.new = context.servers.get(model.name)
        legacy = context.servers.get(model.name, legacy=True)
        self.legacy = LegacyClient(model.name, legacy.endpoint, self.tokenizer, chunk_timeout=300)

    @property
    def lengths(self) -> tuple[int, ...]:
        return SHORT, MIDDLE, self.long

    def prompt(self, length: int, rep: int) -> list[int]:
        return make_prompt_ids(self.tokenizer, length, seed=1000 + 37 * rep + length)

    async def legacy_pattern(self, next_logits, length: int, rep: int) -> float:
        """Median seconds of one per-token call once the prompt is cached (the first call computes it)."""
        ids = self.prompt(length, rep)
        ids.append(int(torch.argmax(await next_logits(ids))))
        times = []
        for _ in range(self.num_tokens):
            start = time.perf_counter()
            ids.append(int(torch.argmax(await next_logits(ids))))
            times.append(time.perf_counter() - start)
        return median(times)

    async def new_server_decode(self, length: int, rep: int) -> float:
        timing = await stream_completion(
            self.session, self.new.base_url, self.model.name, self.prompt(length, rep), self.num_tokens + 1
        )
        return median(timing.gaps())

    def model_step(self, length: int, rep: int) -> float:
        """Median seconds of the runner's one-sequence decode step after a `length`-token past."""
        engine = self.inprocess.engine
        runner = engine.runner
        with engine_thread_count(engine):  # started by the warm-up: its count is chosen
            _, past = runner.prefill(self.prompt(length, rep), None, 0, all_logits=False)
            return decode_step_seconds(runner, past, 1, num_steps=self.num_tokens)

    def measures(self) -> dict:
        measures = {}
        for length in self.lengths:
            measures[("engine (legacy pattern)", length)] = (
                lambda rep, n=length: self.legacy_pattern(self.inprocess.next_token_logits, n, rep))
            measures[("legacy server", length)] = (
                lambda rep, n=length: self.legacy_pattern(self.legacy.next_token_logits, n, rep))
            measures[("new server (decode)", length)] = lambda rep, n=length: self.new_server_decode(n, rep)
            measures[(MODEL_STEP, length)] = as_async(lambda rep, n=length: self.model_step(n, rep))
        return measures

    async def measure(self) -> dict:
        for length in (SHORT, MIDDLE):  # warm up every path
            await self.legacy_pattern(self.inprocess.next_token_logits, length, 99)
            await self.legacy_pattern(self.legacy.next_token_logits, length, 99)
            await self.new_server_decode(length, 99)
        return await alternate_medians(self.context.settings.repetitions, self.measures())

    def figures(self, seconds: dict) -> list[Figure]:
        figures = []
        for path in dict.fromkeys(p for p, _ in seconds):
            short, middle, long = (seconds[(path, n)] for n in self.lengths)
            detail = (f"{short * 1e3:.2f} / {middle * 1e3:.2f} / {long * 1e3:.2f} ms per token "
                      f"at {SHORT} / {MIDDLE} / {self.long} prompt tokens")
            name = f"{path}: per-token time, {self.long} / {SHORT} prompt tokens"
            target = None if path == MODEL_STEP else TARGET
            figures.append(Figure(BENCHMARK, self.model.label, name, long / short, detail, target))
        return figures


async def run(context: BenchContext) -> list[Figure]:
    """Prompt-scaling figures of every model of `context`."""
    async with make_http_session() as session:
        return await measure_each_model(context, Scaling, session)


if __name__ == "__main__":
    standalone_main(run, __doc__)
