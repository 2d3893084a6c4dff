"""Decoders: ``argmax``, ``sample`` and ``beam`` over the query program, through an LMClient only.

Every model call goes through the `LMClient` interface, so a query gives the same result on
every backend. Argmax and sampling generate a variable in chunks: the mask of the current state
(``mask0``) is sent with ``generate(..., max_tokens=chunksize)``; a returned token after the
first is kept only while the mask recomputed before it equals ``mask0`` (so it is exactly the
token a per-token decode would choose) and the variable has not ended; when the mask is known
to change after every token (``X in options``, ``len(X) < N``, the first INT token) one token
is asked for, and no more than a ``len(TOKENS(X))`` bound leaves; this changes no result, it
only avoids generating tokens that would be discarded. Beam search is LMQL 0.7.3's
token-level ``beam_search`` over whole runs of the program (BeamSearch has the facts).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import secrets
from typing import Any, Sequence

from ..client.base import MAX_TOP_TOKENS, LMClient, check_chunk_timeout, is_allowed
from ..sampling import SamplingParams
from ..errors import BackendError, ConstraintError, ContextLengthError, EngineError, InvalidRequestError
from ..language.parser import DistributionClause, Query
from ..language.program import FilledHole, HoleContext, ProgramTrace, StopProgram
from .chat import with_rendered_prompt
from .constraints import (
    ConstraintSet, Progress, VariableConstraints, VariableRecord, compile_constraints, int_value,
)
from .masks import same_mask
from .result import QueryResult
from .statements import statement_constraints
from .tokens import TokenTable, prompt_ids, token_table

COMMON_ARGUMENTS = ("max_len", "chunksize", "chunk_timeout", "backend")
DECODER_ARGUMENTS = {
    "argmax": COMMON_ARGUMENTS,
    "sample": COMMON_ARGUMENTS + ("n", "temperature", "seed", "top_p"),
    "beam": COMMON_ARGUMENTS + ("n",),
}
DEFAULT_MAX_LEN = 2048


# ---- decoder settings --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    """A decoder and its arguments (validated by `make_decoder`)."""

    name: str = "argmax"
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    max_len: int = DEFAULT_MAX_LEN
    chunksize: int = 16
    chunk_timeout: float = 30.0
    backend: str | None = None


def make_decoder(name: str, **arguments: Any) -> DecoderSpec:
    """A validated decoder: ``make_decoder("sample", n=2, temperature=0.8)``."""
    if name not in DECODER_ARGUMENTS:
        raise InvalidRequestError(f"unknown decoder {name!r}; use one of {', '.join(DECODER_ARGUMENTS)}", "decoder")
    unknown = sorted(set(arguments) - set(DECODER_ARGUMENTS[name]))
    if unknown:
        raise InvalidRequestError(
            f"{name} does not take {', '.join(unknown)}; it takes {', '.join(DECODER_ARGUMENTS[name])}", unknown[0]
        )
    defaults = {"temperature": 1.0} if name == "sample" else {}
    spec = DecoderSpec(name, **{**defaults, **arguments})
    check_decoder(spec)
    return spec


def argmax(**arguments: Any) -> DecoderSpec:
    """The most likely token at every step."""
    return make_decoder("argmax", **arguments)


def sample(**arguments: Any) -> DecoderSpec:
    """`n` seeded samples: ``sample(n=2, temperature=0.8, seed=1, top_p=1.0)``."""
    return make_decoder("sample", **arguments)


def beam(**arguments: Any) -> DecoderSpec:
    """Beam search keeping the `n` best partial queries: ``beam(n=4)``."""
    return make_decoder("beam", **arguments)


def check_decoder(spec: DecoderSpec) -> None:
    check_int("n", spec.n, 1, MAX_TOP_TOKENS if spec.name == "beam" else None)
    check_int("max_len", spec.max_len, 1)
    check_int("chunksize", spec.chunksize, 1)
    if spec.seed is not None:
        check_int("seed", spec.seed, 0)
    if not isinstance(spec.temperature, (int, float)) or not spec.temperature >= 0:
        raise InvalidRequestError(f"temperature must be a number >= 0, got {spec.temperature!r}", "temperature")
    if not isinstance(spec.top_p, (int, float)) or not 0 < spec.top_p <= 1:
        raise InvalidRequestError(f"top_p must be in (0, 1], got {spec.top_p!r}", "top_p")
    check_chunk_timeout(spec.chunk_timeout)


def check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise InvalidRequestError(f"{name} must be an integer {bound}, got {value!r}", name)


# ---- one query on one client -----------------------------------------------------------------------

@dataclasses.dataclass
class QuerySession:
    """Everything the decoders share while running one query."""

    query: Query
    client: LMClient
    table: TokenTable
    constraints: ConstraintSet
    spec: DecoderSpec
    inputs: dict[str, Any]
    limit: int
    context_length: int | None
    scope: dict[str, Any] | None = None  # language: names an @query function's program sees

    @property
    def distribution(self) -> DistributionClause | None:
        return self.query.distribution

    def is_distribution(self, hole: HoleContext) -> bool:
        return self.distribution is not None and hole.variable == self.distribution.variable

    def start_variable(self, hole: HoleContext, records: dict[str, VariableRecord]):
        """The bound constraints and context ids of a variable that starts now."""
        ids = self.context_ids(hole.prompt)
        return self.constraints_of(hole).bind(hole.variable, records, hole.scope, self.table), tuple(ids)

    def constraints_of(self, hole: HoleContext) -> ConstraintSet:
        """The constraints of `hole`'s prompt statement (its own where, the query's, its type)."""
        if hole.statement is None or hole.program is None:  # language: a hole made by hand
            return self.constraints
        return statement_constraints(hole.program, hole.statement)

    def context_ids(self, text: str) -> list[int]:
        ids = prompt_ids(self.client.tokenizer, text, self.client.bos_token_id)
        if self.context_length is not None and len(ids) > self.context_length:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens, more than the model's context length of {self.context_length}",
                "prompt",
            )
        return ids

    def finish_variable(self, hole: HoleContext, progress: Progress, records: dict[str, VariableRecord]) -> FilledHole:
        """Record a finished variable; an INT variable's value (and text) is its digits, as in LMQL."""
        text = progress.text
        value = self.typed_value(hole.variable, text, progress, self.constraints_of(hole).int_variables)
        if isinstance(value, int):
            text = str(value)
        records[hole.variable] = VariableRecord(text, value, progress.num_tokens)
        filled = FilledHole(text, value)
        if progress.finish_reason == "length":
            raise StopProgram(filled)
        return filled

    def typed_value(self, variable: str, text: str, progress: Progress, int_variables: frozenset[str]) -> Any:
        if variable not in int_variables:
            return text
        value = int_value(text)
        if value is not None:
            return value
        if progress.finish_reason == "length":
            return None
        raise ConstraintError(f"INT variable {variable} ended as {text!r}, which is not an integer")

    async def fill_distribution(self, hole: HoleContext, records: dict[str, VariableRecord]):
        """Score the distribution options after the prompt; the value is the most likely one."""
        scope = {**hole.scope, **{name: r.value for name, r in records.items()}}
        options = distribution_options(self.distribution.values.evaluate(scope), hole.variable)
        scores = await score_options(self.client, self.context_ids(hole.prompt), options)
        best = max(range(len(scores)), key=lambda i: scores[i].probability)
        return FilledHole(options[best], options[best]), scores


def distribution_options(values: Any, variable: str) -> list[str]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise InvalidRequestError(f"distribution {variable} in ...: the options must be a list of strings", variable)
    options = [str(v) for v in values]
    if not options:
        raise InvalidRequestError(f"distribution {variable} in ...: the list of options is empty", variable)
    return options


async def open_session(query: Query, client: LMClient, spec: DecoderSpec, inputs: dict[str, Any],
                       scope: dict[str, Any] | None = None) -> QuerySession:
    """Prepare a query on `client`: token table, compiled constraints, length limit."""
    connect = getattr(client, "connect", None)
    if connect is not None:  # HTTP clients learn the context length from the server
        await connect()
    context_length = getattr(client, "context_length", None)
    limit = min(spec.max_len, context_length) if context_length else spec.max_len
    holes = query.prompt.hole_names
    constraints = compile_constraints(query.where, holes, query.prompt.int_variables)
    return QuerySession(query, client, token_table(client.tokenizer), constraints, spec, inputs, limit, context_length,
                        scope)


async def decode(query: Query, client: LMClient, spec: DecoderSpec, inputs: dict[str, Any],
                 scope: dict[str, Any] | None = None):
    """Run `query` with decoder `spec`: one QueryResult when n == 1, else a list."""
    session = await open_session(query, client, spec, inputs, scope)
    if spec.name == "beam":
        results = await run_beam(session)
    else:
        seed = spec.seed if spec.seed is not None else secrets.randbits(31)
        runs = [run_sampled(session, sampling_params(spec, seed + i)) for i in range(spec.n)]
        results = list(await asyncio.gather(*runs))
    results = [with_rendered_prompt(r, client.tokenizer) for r in results]  # role tags: the chat the model saw
    return results[0] if spec.n == 1 else results


def sampling_params(spec: DecoderSpec, seed: int) -> SamplingParams:
    if spec.name == "argmax":
        return SamplingParams()
    return SamplingParams(temperature=float(spec.temperature), top_p=float(spec.top_p), seed=seed)


# ---- argmax and sampling ---------------------------------------------------------------------------

class FrameRecords:
    """language: the finished variables of each (nested) query execution, `HoleContext.frame`.

    A nested query's variables are its own (LMQL's stack frame); `record` takes a value the
    program set itself (a nested query's result, a decorator's value).
    """

    def __init__(self, session: QuerySession):
        self.session = session
        self.frames: dict[tuple[int, ...], dict[str, VariableRecord]] = {}

    def records(self, hole: HoleContext) -> dict[str, VariableRecord]:
        return self.frames.setdefault(hole.frame, {})

    def record(self, hole: HoleContext, filled: FilledHole) -> None:
        ids = self.session.client.tokenizer(filled.text, add_special_tokens=False).input_ids
        self.records(hole)[hole.variable] = VariableRecord(filled.text, filled.value, len(ids))


class GeneratingFiller(FrameRecords):
    """Fills each hole by generating it (argmax or seeded sampling)."""

    def __init__(self, session: QuerySession, sampling: SamplingParams):
        super().__init__(session)
        self.sampling = sampling
        self.distribution: list[OptionScore] | None = None

    async def __call__(self, hole: HoleContext) -> FilledHole:
        if self.session.is_distribution(hole):
            filled, self.distribution = await self.session.fill_distribution(hole, self.records(hole))
            return filled
        constraints, ids = self.session.start_variable(hole, self.records(hole))
        progress = await generate_variable(self.session, constraints, ids, self.sampling, hole.stream)
        return self.session.finish_variable(hole, progress, self.records(hole))


async def run_sampled(session: QuerySession, sampling: SamplingParams) -> QueryResult:
    filler = GeneratingFiller(session, sampling)
    trace = await session.query.prompt.execute(session.inputs, filler, session.scope)
    return make_result(trace, session.distribution, filler.distribution)


async def generate_variable(session: QuerySession, constraints: VariableConstraints, ids: Sequence[int],
                            sampling: SamplingParams, stream=None) -> Progress:
    """Generate one variable to its end, chunk by chunk.

    language: `stream(text)`, if given, is called with the variable's text after each accepted token.
    """
    progress = Progress()
    while not progress.is_finished:
        progress = await generate_chunk(session, constraints, ids, progress, sampling, stream)
    variable_ended = getattr(session.client, "variable_ended", None)  # observers learn why (client/observed.py)
    if variable_ended is not None:
        variable_ended(constraints.variable, progress.finish_reason)
    return progress


async def generate_chunk(session: QuerySession, constraints: VariableConstraints, ids: Sequence[int],
                         progress: Progress, sampling: SamplingParams, stream=None) -> Progress:
    """One `generate` call under the current mask, keeping the tokens that mask is valid for."""
    remaining = session.limit - len(ids) - progress.num_tokens
    if remaining <= 0:
        return progress.end("length")
    budget = session.limit - len(ids)
    step = constraints.step(progress, budget)
    if step.is_forced_end:
        return progress.end("forced")
    context = list(ids) + list(progress.token_ids)
    max_tokens = min(session.spec.chunksize, remaining, step.useful_tokens or remaining)
    choices = await session.client.generate(context, step.mask, max_tokens, sampling)
    if not choices:
        raise BackendError(f"the backend returned no token for {constraints.variable}; expected at least one")
    return accept_tokens(constraints, progress, step.mask, [c.token_id for c in choices], budget, stream)


def accept_tokens(constraints: VariableConstraints, progress: Progress, mask0, token_ids: Sequence[int],
                  budget: int | None = None, stream=None) -> Progress:
    """Apply returned tokens while the mask before each one equals `mask0`; drop the rest.

    `budget` is the most tokens the value may have (see VariableConstraints.step).
    """
    for j, token_id in enumerate(token_ids):
        if j > 0:
            if progress.is_finished:
                break
            step = constraints.step(progress, budget)
            if step.is_forced_end:
                return progress.end("forced")
            if not same_mask(step.mask, mask0):
                break
        check_allowed(mask0, token_id, constraints.variable)
        progress = constraints.advance(progress, token_id)
        if stream is not None:  # language: streaming decorators see each token
            stream(progress.text)
    return progress


def check_allowed(mask, token_id: int, variable: str) -> None:
    if not is_allowed(mask, token_id):
        raise BackendError(f"the backend returned token {token_id} for {variable}, which the mask does not allow")


# ---- beam search -------------------------------------------------------------------------------------

BEAM_LENGTH_ALPHA = 0.7  # LMQL 0.7.3 dc.topk's default scorer, alpha_length_normalized


@dataclasses.dataclass(frozen=True)
class PendingHole:
    """The hole a beam is generating: its constraints, where its value starts, and its progress."""

    hole: HoleContext
    constraints: VariableConstraints
    start: int  # index in Beam.ids of the value's first token
    progress: Progress = Progress()


@dataclasses.dataclass(frozen=True)
class Beam:
    """One LMQL decoder sequence: every token of the run so far and the program state.

    `ids` are the model's context (BOS, prompt, values, prompt text between holes); `logprobs`
    has one entry per id (0 for the initial prompt). `queue` holds prompt tokens after a value
    that are already scored and join the sequence one per step; `result` is set once the
    program has ended.
    """

    ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    holes: tuple[Progress, ...] = ()
    pending: PendingHole | None = None
    queue: tuple[tuple[int, float], ...] = ()
    result: QueryResult | None = None

    def extended(self, token_id: int, logprob: float, **changes) -> "Beam":
        return dataclasses.replace(self, ids=self.ids + (token_id,), logprobs=self.logprobs + (logprob,), **changes)

    @property
    def logprob(self) -> float:
        """The summed log-probability of every token (LMQL's final order)."""
        return math.fsum(self.logprobs)


class _Suspended(Exception):
    """Raised by the replay filler at the first hole a beam has not generated yet."""

    def __init__(self, hole: HoleContext, constraints: VariableConstraints):
        super().__init__("beam suspended at a hole")
        self.hole, self.constraints = hole, constraints


class ReplayFiller(FrameRecords):
    """Fills holes with a beam's finished values, and suspends at the next one."""

    def __init__(self, session: QuerySession, holes: tuple[Progress, ...]):
        super().__init__(session)
        self.holes = holes
        self.distribution: list[OptionScore] | None = None
        self.index = 0
        self.last_filled: FilledHole | None = None

    async def __call__(self, hole: HoleContext) -> FilledHole:
        if self.session.is_distribution(hole):
            filled, self.distribution = await self.session.fill_distribution(hole, self.records(hole))
            return filled
        if self.index < len(self.holes):
            self.index += 1
            progress = self.holes[self.index - 1]
            try:
                self.last_filled = self.session.finish_variable(hole, progress, self.records(hole))
            except StopProgram as stop:
                self.last_filled = stop.filled
                raise
            return self.last_filled
        constraints, _ = self.session.start_variable(hole, self.records(hole))
        raise _Suspended(hole, constraints)


@dataclasses.dataclass(frozen=True)
class Replayed:
    """Where the program is after a beam's finished holes: the next hole, or the result."""

    prompt: str  # the prompt text up to the next hole (or the whole prompt)
    hole: HoleContext | None = None
    constraints: VariableConstraints | None = None
    result: QueryResult | None = None
    last_value: str | None = None  # the text the last finished hole put into the prompt


async def replay(session: QuerySession, holes: tuple[Progress, ...]) -> Replayed:
    """Run the program with `holes` as its finished values, up to its next hole (or to the end)."""
    filler = ReplayFiller(session, holes)
    try:
        trace = await session.query.prompt.execute(session.inputs, filler, session.scope)
    except _Suspended as suspended:
        last = filler.last_filled.text if filler.last_filled else None
        return Replayed(suspended.hole.prompt, suspended.hole, suspended.constraints, last_value=last)
    if filler.index != len(holes):
        raise EngineError("the query's holes changed between replays; beam search needs a deterministic prompt")
    result = make_result(trace, session.distribution, filler.distribution)
    return Replayed(trace.prompt, result=result, last_value=filler.last_filled.text if filler.last_filled else None)


class BeamSearch:
    """LMQL 0.7.3's ``beam(n)`` (its ``beam_search`` decoder) over whole runs of the program.

    The facts, from LMQL 0.7.3's source (``src/lmql/...``):

    - One sequence starts with the prompt up to the first hole (``runtime/dclib/decoders.py:152``).
      Each step, every live sequence is extended by its `n` most likely next tokens under the
      constraint mask (``topk_continuations(h, k=n)``, decoders.py:161), with log-probabilities
      of the masked distribution (``log_softmax(logits + bias)``,
      ``models/lmtp/backends/transformers_model.py:108-115``); a mask allowing one token gives
      that token with log-probability 0 (``models/lmtp/lmtp_dcmodel.py:247-250``).
    - A variable ends with an EOS token (the mask allows only EOS once a stop phrase or a
      ``len(TOKENS)`` bound is reached, ``runtime/interpreter.py:575-588``). Then the program
      runs to its next hole (``interpreter.py:749-883``): the value's text and the prompt text
      after it are tokenized separately (EOS appended when the query ends) and replace the
      value's tokens; tokens equal to the old ones keep their scores, the others get the
      log-probability LMQL's cache holds for that token after that context (from an earlier
      top-n list), else are scored by the model without mask (``runtime/dclib/dclib_rewrite.py:
      104-174``, ``dclib_cache.py:389-403,470-500``, ``lmtp_dcmodel.py:417-479``). The value and the first prompt token join the sequence at
      once, the other prompt tokens one per step (``dclib_rewrite.py:160-170``,
      ``lmtp_dcmodel.py:361-365``). A value that is unchanged with no prompt text after it is
      not rewritten: its EOS stays when the query ends there, else it is dropped
      (``interpreter.py:884-892``).
    - When a mask allows one token and one option of ``in``/``==`` is left (LMQL's mask
      ``tail``, ``ops/token_set.py:289-296``), that token is followed at once by the option's
      other tokens but the last, scored like a rewrite (``interpreter.py:688-702``).
    - A sequence is done when it ends in EOS or has `max_len` tokens (``decoders.py:156,163``,
      ``dclib_array.py:46-61``; `len` counts the prompt, not BOS). The live and the done
      sequences are each cut to the best `n` (``decoders.py:165-166``) by ``dc.topk``'s default
      score, ``sum(logprobs) / len(seq) ** 0.7`` over the whole sequence, the prompt counting
      with log-probability 0 (``dclib_array.py:99-111,169-171``, ``dclib_seq.py:101-104``).
    - The search stops when nothing is live, or `n` sequences are done and the best live score
      is below the worst done one (``decoders.py:169``), or after `max_len` steps (decoders.py:158).
    - The result is the done sequences, at most `n`, by summed log-probability, best first
      (``decoders.py:174``); sequences of different tokens with the same value are kept.

    Differences, on purpose: LMQL 0.7.3 fails with an AssertionError when a sequence reaches
    `max_len` (``interpreter.py:1122``); here its value is returned with ``is_truncated``. LMQL
    also expands tokens the mask forbids (at log-probability about -100) when fewer than `n`
    are allowed; here only allowed tokens are expanded.
    """

    def __init__(self, session: QuerySession):
        self.session = session
        self.client = session.client
        self.n = session.spec.n
        self.eos = session.table.eos_token_id
        self.num_bos = 0 if session.client.bos_token_id is None else 1
        self.seen: dict[tuple[int, ...], dict[int, float]] = {}  # context -> token -> logprob LMQL has

    def remember(self, context: tuple[int, ...], token_id: int, logprob: float) -> None:
        self.seen.setdefault(context, {})[token_id] = logprob  # the latest wins, as in set_cache

    async def scores(self, prefix: tuple[int, ...], token_ids: list[int]) -> list[float]:
        """The log-probabilities of `token_ids` after `prefix` as LMQL's CachedDcModel gives them.

        Tokens already seen after the same context (in a top-n list, with that step's masked
        log-probability) keep that value, up to the first unseen one; the rest are scored by the
        model without mask (``dclib_cache.py:389-403,470-500``, cached from token streams,
        ``dclib_cache.py:520-570``).
        """
        context, scores = prefix, []
        while len(scores) < len(token_ids) and token_ids[len(scores)] in self.seen.get(context, {}):
            scores.append(self.seen[context][token_ids[len(scores)]])
            context = context + (token_ids[len(scores) - 1],)
        rest = token_ids[len(scores):]
        if rest:
            raw = await self.client.score(list(context) + rest, len(context))
            for token_id, logprob in zip(rest, raw):
                self.remember(context, token_id, logprob)
                context = context + (token_id,)
            scores.extend(raw)
        return scores

    def length(self, beam: Beam) -> int:
        """LMQL's ``len(seq)``: the tokens after BOS."""
        return len(beam.ids) - self.num_bos

    def score(self, beam: Beam) -> float:
        length = self.length(beam)
        return beam.logprob / length ** BEAM_LENGTH_ALPHA if length > 0 else 0.0

    def is_done(self, beam: Beam) -> bool:
        if beam.result is not None and not beam.queue and beam.ids[-1] == self.eos:
            return True
        return self.is_at_limit(beam)

    def is_at_limit(self, beam: Beam) -> bool:
        context = self.session.context_length
        return self.length(beam) >= self.session.spec.max_len or (context is not None and len(beam.ids) >= context)

    def best(self, beams: list[Beam]) -> list[Beam]:
        return sorted(beams, key=lambda b: (-self.score(b), b.ids))[:self.n]

    async def run(self) -> list[QueryResult]:
        """The results of the done sequences, best first."""
        return [beam.result for beam in await self.search()]

    async def search(self) -> list[Beam]:
        """The done sequences (with their results), by summed log-probability, best first."""
        first = await replay(self.session, ())
        if first.result is not None:  # a query without holes
            return [Beam((), (), result=first.result)]
        ids = tuple(self.session.context_ids(first.prompt))
        live = [Beam(ids, (0.0,) * len(ids), pending=PendingHole(first.hole, first.constraints, len(ids)))]
        done: list[Beam] = []
        for _ in range(self.session.spec.max_len):
            if not live:
                break
            expansions = await asyncio.gather(*(self.expand(b) for b in live))
            pool = [child for children in expansions for child in children] + done
            live = self.best([b for b in pool if not self.is_done(b)])
            done = self.best([b for b in pool if self.is_done(b)])
            if not live or (len(done) == self.n and max(map(self.score, live)) < min(map(self.score, done))):
                break
        finished = [await self.finish(b) for b in done]
        return sorted(finished, key=lambda b: (-b.logprob, b.ids))

    async def finish(self, beam: Beam) -> Beam:
        """A done beam with its result (a beam stopped by the length limit: truncated)."""
        if beam.result is not None:
            return beam
        progress = beam.pending.progress
        holes = beam.holes + (progress if progress.is_finished else progress.end("length"),)
        return dataclasses.replace(beam, result=(await replay(self.session, holes)).result)

    async def expand(self, beam: Beam) -> list[Beam]:
        """The children of a live beam for one step."""
        if beam.queue:
            (token_id, logprob), rest = beam.queue[0], beam.queue[1:]
            return [beam.extended(token_id, logprob, queue=rest)]
        pending = beam.pending
        if pending.progress.is_finished:  # a stop phrase ended it: the mask now allows only EOS
            return [await self.end_value(self.forced_eos(beam), pending.progress)]
        budget = self.session.spec.max_len - (pending.start - self.num_bos)
        if self.session.context_length is not None:
            budget = min(budget, self.session.context_length - pending.start)
        step = pending.constraints.step(pending.progress, budget)
        if step.is_forced_end:
            return [await self.end_value(self.forced_eos(beam), pending.progress.end("forced"))]
        choices = await self.client.top_tokens(list(beam.ids), step.mask, min(self.n, MAX_TOP_TOKENS))
        tail = self.tail_ids(pending, step.mask)
        children = []
        for choice in choices:
            self.remember(beam.ids, choice.token_id, choice.logprob)
            check_allowed(step.mask, choice.token_id, pending.constraints.variable)
            progress = pending.constraints.advance(pending.progress, choice.token_id)
            child = beam.extended(choice.token_id, choice.logprob)
            if choice.token_id == self.eos:
                children.append(await self.end_value(child, progress))
                continue
            if tail and tail[0] == choice.token_id:
                child, progress = await self.join_tail(child, pending, progress, tail[1:-1])
            children.append(dataclasses.replace(child, pending=dataclasses.replace(pending, progress=progress)))
        return children

    def tail_ids(self, pending: PendingHole, mask) -> list[int] | None:
        """LMQL's tail: one token allowed and one option left, tokenized (``interpreter.py:489-494``)."""
        if mask is None or int(mask.sum()) != 1:
            return None
        rest = pending.constraints.tail(pending.progress)
        try:
            ids = self.tokenize(rest.decode("utf-8")) if rest else []
        except UnicodeDecodeError:
            return None
        return ids if len(ids) >= 3 else None

    async def join_tail(self, beam: Beam, pending: PendingHole, progress: Progress, token_ids: list[int]):
        """The tail's middle tokens join the value at once, scored as LMQL's rewrite does.

        ``interpreter.py:688-702``: after the tail's first token, the sequence is rewritten to
        end with all of the tail's tokens but its last (which the next step gives).
        """
        scores = await self.scores(beam.ids, token_ids)
        for token_id, logprob in zip(token_ids, scores):
            beam = beam.extended(token_id, logprob)
            progress = pending.constraints.advance(progress, token_id)
        return beam, progress

    def forced_eos(self, beam: Beam) -> Beam:
        """`beam` and EOS, the one token its mask allows (log-probability 0, lmtp_dcmodel.py:247-250)."""
        self.remember(beam.ids, self.eos, 0.0)
        return beam.extended(self.eos, 0.0)

    async def end_value(self, beam: Beam, progress: Progress) -> Beam:
        """`beam` (ending in EOS) after its variable ended: the program runs on to its next hole."""
        start = beam.pending.start
        holes = beam.holes + (progress,)
        after = await replay(self.session, holes)
        before = beam.pending.hole.prompt
        appended = after.prompt[len(before):] if after.prompt.startswith(before) else after.prompt
        value_text = after.last_value if after.last_value is not None else progress.text
        program_text = appended[len(value_text):] if appended.startswith(value_text) else appended
        raw_text = progress.data.decode("utf-8", errors="replace")
        state = dict(holes=holes, pending=None, result=after.result)
        if value_text == raw_text and not program_text:
            kept = beam if after.result is not None else dataclasses.replace(beam, ids=beam.ids[:-1],
                                                                             logprobs=beam.logprobs[:-1])
            return self.at_next_hole(dataclasses.replace(kept, **state), after)
        value_ids = self.tokenize(value_text)
        new_ids = value_ids + self.tokenize(program_text) + ([self.eos] if after.result is not None else [])
        old_ids = beam.ids[start:]
        same = 0
        while same < min(len(old_ids), len(new_ids)) and old_ids[same] == new_ids[same]:
            same += 1
        prefix, appended_ids = beam.ids[:start + same], new_ids[same:]
        scores = await self.scores(prefix, appended_ids)
        joined = max(len(value_ids) - same, 0) + 1
        rewritten = dataclasses.replace(
            beam, ids=prefix + tuple(appended_ids[:joined]),
            logprobs=beam.logprobs[:start + same] + tuple(scores[:joined]),
            queue=tuple(zip(appended_ids[joined:], scores[joined:])), **state,
        )
        return self.at_next_hole(rewritten, after)

    def at_next_hole(self, beam: Beam, after: Replayed) -> Beam:
        if after.hole is None:
            return beam
        start = len(beam.ids) + len(beam.queue)
        return dataclasses.replace(beam, pending=PendingHole(after.hole, after.constraints, start))

    def tokenize(self, text: str) -> list[int]:
        return list(self.client.tokenizer(text, add_special_tokens=False).input_ids) if text else []


async def run_beam(session: QuerySession) -> list[QueryResult]:
    """LMQL's beam search (see BeamSearch): at most `n` results, best first."""
    return await BeamSearch(session).run()


# ---- scoring (the distribution clause and `score`) ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class OptionScore:
    """An option, its mean token log-probability, and its softmax-normalised probability."""

    option: str
    mean_logprob: float
    probability: float
    logprob: float


async def score_options(client: LMClient, context_ids: Sequence[int], options: Sequence[str]) -> list[OptionScore]:
    """Score each option after `context_ids` by its mean token log-probability, then softmax."""
    means = await asyncio.gather(*(mean_logprob(client, context_ids, option) for option in options))
    normaliser = log_sum_exp(means)
    return [OptionScore(o, m, math.exp(m - normaliser), m - normaliser) for o, m in zip(options, means)]


async def mean_logprob(client: LMClient, context_ids: Sequence[int], option: str) -> float:
    option_ids = list(client.tokenizer(option, add_special_tokens=False).input_ids)
    if not option_ids:
        raise InvalidRequestError(f"the option {option!r} has no tokens; options must be non-empty strings", "options")
    logprobs = await client.score(list(context_ids) + option_ids, len(context_ids))
    return sum(logprobs) / len(logprobs)


def log_sum_exp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def make_result(trace: ProgramTrace, clause: DistributionClause | None, scores: list[OptionScore] | None) -> QueryResult:
    variables = dict(trace.variables)
    returned = trace.return_value if trace.has_return_value else None  # language: ``return X``
    if clause is None or scores is None:
        return QueryResult(trace.prompt, variables, is_truncated=trace.is_truncated, return_value=returned)
    variables[f"P({clause.variable})"] = [(s.option, s.probability) for s in scores]
    variables[f"log P({clause.variable})"] = [(s.option, s.logprob) for s in scores]
    return QueryResult(trace.prompt, variables, clause.variable, [s.option for s in scores], trace.is_truncated,
                       returned)
