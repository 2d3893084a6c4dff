"""Constrained decoding on the embedded model: the per-token cost of each kind of constraint.

Each case is a one-variable argmax query (at most 48 generated tokens) run through the
runtime's decoder, in-process and against the new server. Two figures per case:

- mask time: the time the runtime spends computing masks (``VariableConstraints.step``,
  measured inside the real decode), per generated token;
- end-to-end time per generated token (query start to end, divided by the tokens of X),
  as a ratio to the unconstrained query's. INT writes 2 tokens, but after its first digit the
  decoder asks for a 16-token chunk and keeps one token of it (the mask then gains EOS), so
  its row mostly counts discarded tokens; ``len(X)`` and ``X in`` ask the backend for one
  token per call (their mask changes after every token).

There are no targets here; ``benchmarks/masks.py`` times masks on a 50k-token vocabulary.

    python benchmarks/constraints.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from common import TINY_LABEL, BenchContext, Figure, load_tokenizer_of, median, run_standalone

from lmql_backends.client.inprocess import InProcessClient
from lmql_backends.client.openai_client import OpenAIClient
from lmql_backends.engine import SamplingParams
from lmql_backends.language import parse_query
from lmql_backends.runtime.decoders import GeneratingFiller, generate_variable, make_decoder, open_session

BENCHMARK = "constraints"
MAX_NEW_TOKENS = 48
PROMPT = "Mr. Bennet said to his wife that"
OPTIONS = [" Mr. Bingley", " Mr. Darcy", " Netherfield Park", " Longbourn", " Miss Bennet", " the ball",
           " a single man", " his daughters", " Lady Lucas", " Meryton"]
CASES = {
    "unconstrained": '"{p}[X]"',
    "STOPS_AT": '"{p}[X]" where STOPS_AT(X, ".")',
    "len(TOKENS(X)) <": '"{p}[X]" where len(TOKENS(X)) < 40',
    "len(X) <": '"{p}[X]" where len(X) < 120',
    "X in 10 options": '"{p}[X]" where X in OPTIONS',
    "INT": '"{p} he had[X: int]"',
    "REGEX": '"{p}[X]" where REGEX(X, r"( [a-z]+)+")',
    "STOPS_AT and len and not in": '"{p}[X]" where STOPS_AT(X, ".") and len(TOKENS(X)) < 40 and not X in ["a"]',
}


class TimedConstraints:
    """A variable's constraints that record how long each mask (`step`) takes."""

    def __init__(self, inner):
        self.inner = inner
        self.step_seconds: list[float] = []

    def step(self, progress, budget):
        start = time.perf_counter()
        result = self.inner.step(progress, budget)
        self.step_seconds.append(time.perf_counter() - start)
        return result

    def __getattr__(self, name):
        return getattr(self.inner, name)


class TimingFiller(GeneratingFiller):
    """The argmax filler of the runtime, with the mask time and the tokens of each hole recorded."""

    def __init__(self, session, sampling):
        super().__init__(session, sampling)
        self.mask_seconds = 0.0
        self.num_tokens = 0

    async def __call__(self, hole):
        constraints, ids = self.session.start_variable(hole, self.records(hole))
        timed = TimedConstraints(constraints)
        progress = await generate_variable(self.session, timed, ids, self.sampling)
        self.mask_seconds += sum(timed.step_seconds)
        self.num_tokens += progress.num_tokens
        return self.session.finish_variable(hole, progress, self.records(hole))


@dataclasses.dataclass(frozen=True)
class CaseRun:
    """One run of a case: seconds end to end, seconds in masks, tokens generated."""

    seconds: float
    mask_seconds: float
    num_tokens: int

    @property
    def ms_per_token(self) -> float:
        return self.seconds * 1e3 / max(self.num_tokens, 1)

    @property
    def mask_ms_per_token(self) -> float:
        return self.mask_seconds * 1e3 / max(self.num_tokens, 1)


async def run_case(query: str, client, max_len: int) -> CaseRun:
    """The query's argmax decode, as `lmql_backends.run` does it, with its mask time recorded."""
    inputs = {"p": PROMPT, "OPTIONS": OPTIONS}
    start = time.perf_counter()
    session = await open_session(parse_query(query), client, make_decoder("argmax", max_len=max_len), inputs)
    filler = TimingFiller(session, SamplingParams())
    await session.query.prompt.execute(inputs, filler)
    return CaseRun(time.perf_counter() - start, filler.mask_seconds, filler.num_tokens)


async def measure_backend(client, repetitions: int, max_len: int) -> dict[str, CaseRun]:
    """Median run of every case (taken alternately), after one warm-up run of each."""
    for query in CASES.values():
        await run_case(query, client, max_len)
    runs: dict[str, list[CaseRun]] = {name: [] for name in CASES}
    for _ in range(repetitions):
        for name, query in CASES.items():
            runs[name].append(await run_case(query, client, max_len))
    return {name: median_run(r) for name, r in runs.items()}


def median_run(runs: list[CaseRun]) -> CaseRun:
    return CaseRun(median([r.seconds for r in runs]), median([r.mask_seconds for r in runs]), runs[0].num_tokens)


def make_figures(backend: str, runs: dict[str, CaseRun]) -> list[Figure]:
    base = runs["unconstrained"]
    figures = []
    for name, run in runs.items():
        if name == "unconstrained":
            continue
        detail = (f"{run.ms_per_token:.2f} vs {base.ms_per_token:.2f} ms per token ({run.num_tokens} vs "
                  f"{base.num_tokens} tokens); masks {run.mask_ms_per_token:.3f} ms per token")
        figure_name = f"{name}, {backend}: time per token / unconstrained"
        figures.append(Figure(BENCHMARK, "tiny", figure_name, run.ms_per_token / base.ms_per_token, detail))
    return figures


async def run(context: BenchContext) -> list[Figure]:
    """Constraint figures on the embedded model (none when the run does not include it)."""
    models = [m for m in context.models if m.label == TINY_LABEL]
    if not models:
        return []
    model = models[0]
    tokenizer = load_tokenizer_of(model)
    max_len = len(tokenizer(PROMPT).input_ids) + 1 + MAX_NEW_TOKENS
    repetitions = context.settings.pick(5, 2)
    server = context.servers.get(model.name)
    figures = make_figures("in-process", await measure_backend(InProcessClient(model.name), repetitions, max_len))
    async with OpenAIClient(model.name, server.endpoint, tokenizer, chunk_timeout=300) as client:
        figures += make_figures("new server", await measure_backend(client, repetitions, max_len))
    return figures


def main() -> None:
    from common import add_common_arguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    args = parser.parse_args()
    args.model = "tiny"
    run_standalone(run, args)


if __name__ == "__main__":
    main()
