"""Conformance: run the same queries in-process, through the new backend and the legacy backend,
and report every difference.

``lmql-backends conformance [--model M] [--endpoint HOST:PORT] [--legacy-endpoint HOST:PORT] [FILES...]``
runs each query file (or the built-in table `BUILTIN_CASES` when none is given) on the three
backends and compares the results with the in-process run:

- the prompt, every variable value and ``is_truncated`` of every result must be identical
  (a difference names the variable, the first differing token position and both values);
- ``P(VAR)`` / ``log P(VAR)`` of a distribution clause: same options, values within `TOLERANCE`;
- every token log-probability the backends report for the same call (same context ids, same mask,
  same token) must be within `TOLERANCE`; they are recorded by wrapping each backend's
  `LMClient` in a `RecordingClient`;
- a query that fails on one backend must fail on every backend (the exception types may differ:
  the legacy protocol reports every refusal as an HTTP 400, a `BackendResponseError`).

Determinism: argmax and beam are deterministic; ``sample`` is made deterministic by its seed
(sample ``i`` uses ``seed + i``, and the token at absolute position ``p`` is drawn with
``sampling.seeded_uniform(seed, p)`` on every backend). A ``sample`` decoder without a
seed gets ``seed=DEFAULT_SEED`` here so that the backends can be compared.

The query's ``from`` clause and its decoder's ``backend=`` argument are overridden: every case runs
on the model given to the command, once per backend.

Foreign servers (``--foreign``, or detected: the ``/v1/models`` entry is not ``owned_by``
lmql-backends, e.g. vLLM): such a server draws sampled tokens with its own random generator, so
the values of a ``sample`` query differ; those differences are reported as expected, and do not
fail the run. Token log-probabilities are compared as on any server (see docs/vllm.md).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import hashlib
import pathlib
import sys
import time
from typing import Any, Iterator, Sequence, TextIO

import requests

from .client.base import LMClient, TokenChoice
from .sampling import SamplingParams
from .errors import InvalidRequestError
from .language.parser import file_inputs  # language: a query file's ``# inputs: {...}`` line
from .runtime.models import LOCAL_PREFIX, ModelSpec, inprocess, make_client, model as make_model_spec

TOLERANCE = 1e-4
DEFAULT_SEED = 0
REFERENCE = "in-process"
BACKEND_NAMES = (REFERENCE, "new", "legacy")
MAX_SHOWN_CHARS = 40

# ---- the built-in table of queries (the conformance test suite runs exactly these) -------------

LONG_PASSAGE = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be on his "
    "first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, "
    "that he is considered as the rightful property of some one or other of their daughters. My dear Mr. "
    "Bennet, said his lady to him one day, have you heard that Netherfield Park is let at last? Mr. Bennet "
    "replied that he had not. But it is, returned she; for Mrs. Long has just been here, and she told me all "
    "about it. Mr. Bennet made no answer. Do not you want to know who has taken it? cried his wife "
    "impatiently. You want to tell me, and I have no objection to hearing it. This was invitation enough. "
    "Why, my dear, you must know, Mrs. Long says that Netherfield is taken by a young man of large fortune "
    "from the north of England; that he came down on Monday in a chaise and four to see the place, and was "
    "so much delighted with it that he agreed with Mr. Morris immediately; that he is to take possession "
    "before Michaelmas, and some of his servants are to be in the house by the end of next week. What is "
    "his name? Bingley. Is he married or single? Oh, single, my dear, to be sure! A single man of large "
    "fortune; four or five thousand a year. What a fine thing for our girls! How so? how can it affect "
    "them? My dear Mr. Bennet, replied his wife, how can you be so tiresome! You must know that I am "
    "thinking of his marrying one of them. Is that his design in settling here? Design! nonsense, how can "
    "you talk so! But it is very likely that he may fall in love with one of them, and therefore you must "
    "visit him as soon as he comes. I see no occasion for that. You and the girls may go, or you may send "
    "them by themselves, which perhaps will be still better; for as you are as handsome as any of them, "
    "Mr. Bingley might like you the best of the party. My dear, you flatter me. I certainly have had my "
    "share of beauty, but I do not pretend to be any thing extraordinary now. When a woman has five "
    "grown up daughters, she ought to give over thinking of her own beauty. In such cases, a woman has "
    "not often much beauty to think of."
)

CONTROL_FLOW_QUERY = '''argmax
    "Names:"
    names = []
    for i in range(3):
        "[NAME]"
        names.append(NAME)
    if len(names[0]) > 3:
        "\\nThe first was long:[X]"
    else:
        "\\nThe first was short:[X]"
where
    STOPS_AT(NAME, ",") and len(TOKENS(NAME)) < 4 and NAME != "" and len(TOKENS(X)) < 3
'''


@dataclasses.dataclass(frozen=True)
class ConformanceCase:
    """A named query (with its decoder clause) and its inputs."""

    name: str
    query: str
    inputs: tuple[tuple[str, Any], ...] = ()


BUILTIN_CASES: tuple[ConformanceCase, ...] = (
    ConformanceCase("stops-at", 'argmax "Hello[WHO]" where STOPS_AT(WHO, ",") and len(TOKENS(WHO)) < 8'),
    ConformanceCase("stops-before", 'argmax "It was[X]" where STOPS_BEFORE(X, " the") and len(TOKENS(X)) < 8'),
    ConformanceCase("tokens-equal", 'argmax(chunksize=3) "She said:[X]" where len(TOKENS(X)) == 5'),
    ConformanceCase("chars-less", 'argmax "Mr.[NAME]" where len(NAME) < 7 and len(TOKENS(NAME)) < 6'),
    ConformanceCase("in-options", 'argmax "The best of[X]" where X in [" them", " all", " the world"]'),
    ConformanceCase("equals", 'argmax "Dear[X], I write[Y]" where X == " Mr. Darcy" and len(TOKENS(Y)) < 4'),
    ConformanceCase("int-typed", 'argmax "Her age was[N: int] years" where len(TOKENS(N)) < 3'),
    ConformanceCase("int-function", 'argmax "There were[N] of them" where INT(N) and len(TOKENS(N)) < 3'),
    ConformanceCase("regex", 'argmax "Mr.[NAME]" where REGEX(NAME, r" [A-Z][a-z]+") and len(TOKENS(NAME)) < 5'),
    ConformanceCase(
        "and-or-not", 'argmax "I am[X]" where (X in [" very", " not"] or X == " sure") and not X == " not"'
    ),
    ConformanceCase(
        "several-variables",
        'argmax "A[X], B[Y] and C[Z]" where len(TOKENS(X)) < 3 and len(X) < 8 and len(TOKENS(Y)) < 3 '
        'and STOPS_AT(Z, ".") and len(TOKENS(Z)) < 4',
    ),
    ConformanceCase("control-flow", CONTROL_FLOW_QUERY),
    ConformanceCase(
        "non-ascii",
        'argmax "Un café très naïve 🙂:[X] et[Y]" where X == " déjà vu 🎉" and len(TOKENS(Y)) < 4',
    ),
    ConformanceCase("long-prompt", f'argmax "{LONG_PASSAGE}[X]" where len(TOKENS(X)) < 4'),
    ConformanceCase(
        "sample-n2", 'sample(n=2, seed=11, temperature=1.3) "Hello[X]" where len(TOKENS(X)) < 6'
    ),
    ConformanceCase(
        "sample-top-p", 'sample(seed=3, top_p=0.8) "Once[X]" where STOPS_AT(X, ".") and len(TOKENS(X)) < 6'
    ),
    ConformanceCase("beam-n2", 'beam(n=2) "Hello[X]" where len(TOKENS(X)) < 3'),
    ConformanceCase("beam-n3", 'beam(n=3) "It was[X] and[Y]" where len(TOKENS(X)) < 3 and len(TOKENS(Y)) < 2'),
    ConformanceCase("multibyte-len", 'argmax "Café ☕ 東京:[X]" where len(X) < 6 and len(TOKENS(X)) < 8'),
    ConformanceCase("int-ends", 'argmax "A number:[N]" where INT(N) and len(TOKENS(N)) < 8'),
    ConformanceCase("regex-complete", 'argmax "Hello[X]" where REGEX(X, r"(lo){1,3}")'),
    ConformanceCase("beam-n2-stops-at", 'beam(n=2) "Hello[X]" where STOPS_AT(X, ".") and len(TOKENS(X)) < 10'),
    ConformanceCase("beam-n3-stops-at", 'beam(n=3) "It is a truth[X]" where STOPS_AT(X, ",") and len(TOKENS(X)) < 12'),
    ConformanceCase("beam-n2-in", 'beam(n=2) "Q: Name a colour:[C]" where C in [" red", " green", " blue", " yellow"]'),
    ConformanceCase("beam-n3-text-after", 'beam(n=3) "Hello[X]!" where len(TOKENS(X)) < 4'),
    ConformanceCase("beam-n2-max-len", 'beam(n=2, max_len=10) "Hello[X]"'),
    ConformanceCase("beam-multibyte", 'beam(n=2) "東京[X]" where len(X) < 4 and len(TOKENS(X)) < 4'),
    ConformanceCase("distribution", 'argmax "It was[X]" distribution X in [" a", " the", " very"]'),
    ConformanceCase(
        "distribution-after-variable",
        'argmax "Hello[Y]. She was[X]" where len(TOKENS(Y)) < 3 distribution X in [" happy", " sad", " tired"]',
    ),
)


# ---- backends ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BackendTarget:
    """One backend a case runs on: its name, the model spec, and the decoder's ``backend`` argument."""

    name: str
    model: ModelSpec
    decoder_backend: str | None = None


def make_targets(model: str, new_endpoint: str, legacy_endpoint: str, **load_kwargs) -> tuple[BackendTarget, ...]:
    """The three backends for `model`: in-process, the new API at `new_endpoint`, the legacy API."""
    name = served_name(model)
    return (
        BackendTarget(REFERENCE, inprocess(name, **load_kwargs)),
        BackendTarget("new", make_model_spec(name, endpoint=new_endpoint)),
        BackendTarget("legacy", make_model_spec(name, endpoint=legacy_endpoint), "legacy"),
    )


def served_name(model: str) -> str:
    """The model string without a ``local:`` prefix (the name the servers serve)."""
    return model[len(LOCAL_PREFIX):] if model.startswith(LOCAL_PREFIX) else model


# ---- recording every log-probability a backend reports --------------------------------------------

@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A reported log-probability and the absolute position of its token in the sequence."""

    position: int
    logprob: float


#: (call, digest of the context ids and the mask, token id): the same key on every backend
LogprobKey = tuple[str, bytes, int]


def digest_ids(ids: Sequence[int], mask=None) -> bytes:
    """A short digest of token ids and an optional boolean mask."""
    digest = hashlib.blake2b(array.array("q", ids).tobytes(), digest_size=16)
    if mask is not None:
        digest.update(mask.numpy().tobytes())
    return digest.digest()


def sampling_call_name(sampling: SamplingParams) -> str:
    return f"generate(temperature={sampling.temperature}, top_p={sampling.top_p})"


class RecordingClient(LMClient):
    """Wraps an `LMClient` and records every token log-probability it returns."""

    def __init__(self, inner: LMClient):
        self.inner = inner
        self.name, self.tokenizer = inner.name, inner.tokenizer
        self.logprobs: dict[LogprobKey, TokenLogprob] = {}

    @property
    def context_length(self) -> int | None:
        return getattr(self.inner, "context_length", None)

    async def connect(self) -> None:
        """Let the wrapped HTTP client read the server's context length."""
        connect = getattr(self.inner, "connect", None)
        if connect is not None:
            await connect()

    async def generate(self, ids, mask, max_tokens: int, sampling: SamplingParams) -> list[TokenChoice]:
        choices = await self.inner.generate(ids, mask, max_tokens, sampling)
        context = list(ids)
        for choice in choices:
            self.record(sampling_call_name(sampling), context, mask, choice.token_id, choice.logprob)
            context.append(choice.token_id)
        return choices

    async def top_tokens(self, ids, mask, k: int) -> list[TokenChoice]:
        choices = await self.inner.top_tokens(ids, mask, k)
        for choice in choices:
            self.record("top_tokens", ids, mask, choice.token_id, choice.logprob)
        return choices

    async def score(self, ids, num_context: int) -> list[float]:
        logprobs = await self.inner.score(ids, num_context)
        for position, logprob in zip(range(num_context, len(ids)), logprobs):
            self.record("score", ids[:position], None, ids[position], logprob)
        return logprobs

    def record(self, call: str, context: Sequence[int], mask, token_id: int, logprob: float) -> None:
        self.logprobs[(call, digest_ids(context, mask), token_id)] = TokenLogprob(len(context), float(logprob))

    async def aclose(self) -> None:
        await self.inner.aclose()


# ---- running one case on one backend -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ResultView:
    """The comparable part of a `QueryResult`."""

    prompt: str
    variables: dict[str, Any]
    is_truncated: bool


@dataclasses.dataclass
class Outcome:
    """What one backend gave for one case: results or an error, and the log-probabilities it reported."""

    backend: str
    results: list[ResultView] = dataclasses.field(default_factory=list)
    error: str | None = None
    error_type: str | None = None
    logprobs: dict[LogprobKey, TokenLogprob] = dataclasses.field(default_factory=dict, repr=False)
    seconds: float = 0.0

    @property
    def is_error(self) -> bool:
        return self.error_type is not None


def decoder_for(parsed, target: BackendTarget, inputs: dict[str, Any]):
    """The query's decoder on `target`: its backend argument replaced, a sample decoder seeded."""
    from .runtime.api import resolve_decoder

    spec = dataclasses.replace(resolve_decoder(parsed, None, inputs), backend=target.decoder_backend)
    if spec.name == "sample" and spec.seed is None:
        spec = dataclasses.replace(spec, seed=DEFAULT_SEED)
    return spec


async def run_on_target(case: ConformanceCase, target: BackendTarget) -> Outcome:
    """Run `case` on one backend; errors become part of the outcome."""
    from .language.parser import parse_query
    from .runtime.decoders import decode

    start, outcome, client = time.perf_counter(), Outcome(target.name), None
    try:
        parsed, inputs = parse_query(case.query), dict(case.inputs)
        spec = decoder_for(parsed, target, inputs)
        client = RecordingClient(make_client(target.model, spec.backend, spec.chunk_timeout))
        outcome.results = as_views(await decode(parsed, client, spec, inputs))
    except Exception as exc:  # noqa: BLE001 - a failing query is an outcome to compare, not a crash
        outcome.error_type, outcome.error = type(exc).__name__, str(exc)
    finally:
        if client is not None:
            outcome.logprobs = client.logprobs
            await client.aclose()
    outcome.seconds = time.perf_counter() - start
    return outcome


def as_views(results) -> list[ResultView]:
    results = results if isinstance(results, list) else [results]
    return [ResultView(r.prompt, dict(r.variables), r.is_truncated) for r in results]


# ---- comparing outcomes ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Difference:
    """One disagreement between a backend and the in-process reference.

    `variable` is a variable name, ``prompt``, ``is_truncated``, ``P(VAR)``, ``token logprob``,
    ``error`` or ``number of results``; `position` is the first differing token of the value
    (the option index for ``P(VAR)``, the absolute sequence position for a token logprob).
    """

    backend: str
    result: int | None
    variable: str
    position: int | None
    expected: str
    actual: str


def compare_outcomes(reference: Outcome, other: Outcome, tokenizer) -> list[Difference]:
    """Every difference of `other` from `reference`."""
    if reference.is_error or other.is_error:
        return compare_errors(reference, other)
    if len(reference.results) != len(other.results):
        return [Difference(other.backend, None, "number of results", None,
                           str(len(reference.results)), str(len(other.results)))]
    differences = []
    for index, (expected, actual) in enumerate(zip(reference.results, other.results)):
        differences += compare_result(other.backend, index, expected, actual, tokenizer)
    return differences + compare_logprobs(other.backend, reference.logprobs, other.logprobs)


def compare_errors(reference: Outcome, other: Outcome) -> list[Difference]:
    """A difference when only one of the two failed."""
    if reference.is_error and other.is_error:
        return []
    return [Difference(other.backend, None, "error", None, describe_outcome_error(reference),
                       describe_outcome_error(other))]


def describe_outcome_error(outcome: Outcome) -> str:
    """The error's type (its message is in the Errors section), or the number of results."""
    return outcome.error_type if outcome.is_error else f"{len(outcome.results)} result(s)"


def compare_result(backend: str, index: int, expected: ResultView, actual: ResultView, tokenizer) -> list[Difference]:
    differences = compare_value(backend, index, "prompt", expected.prompt, actual.prompt, tokenizer)
    if expected.is_truncated != actual.is_truncated:
        differences.append(Difference(backend, index, "is_truncated", None,
                                      str(expected.is_truncated), str(actual.is_truncated)))
    for name in dict.fromkeys([*expected.variables, *actual.variables]):
        differences += compare_value(
            backend, index, name, expected.variables.get(name), actual.variables.get(name), tokenizer)
    return differences


def compare_value(backend: str, index: int, name: str, expected: Any, actual: Any, tokenizer) -> list[Difference]:
    """A difference when two values of a variable differ (probability lists within TOLERANCE)."""
    if is_probability_list(expected) and is_probability_list(actual):
        position = first_differing_option(expected, actual)
    elif expected == actual:
        return []
    else:
        position = first_differing_token(tokenizer, shown_text(expected), shown_text(actual))
    if position is None:
        return []
    return [Difference(backend, index, name, position, shorten(expected, position, tokenizer),
                       shorten(actual, position, tokenizer))]


def is_probability_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, tuple) and len(item) == 2 for item in value)


def first_differing_option(expected: list, actual: list) -> int | None:
    """The index of the first option whose name differs or whose value is off by more than TOLERANCE."""
    for i, ((option_a, value_a), (option_b, value_b)) in enumerate(zip(expected, actual)):
        if option_a != option_b or abs(value_a - value_b) > TOLERANCE:
            return i
    return None if len(expected) == len(actual) else min(len(expected), len(actual))


def shown_text(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def first_differing_token(tokenizer, expected: str, actual: str) -> int:
    """The index of the first token where the tokenizations of two different texts differ."""
    ids_a, ids_b = encode(tokenizer, expected), encode(tokenizer, actual)
    for i, (a, b) in enumerate(zip(ids_a, ids_b)):
        if a != b:
            return i
    return min(len(ids_a), len(ids_b))


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def shorten(value: Any, position: int, tokenizer) -> str:
    """The value, or from a little before the differing token when it is long."""
    if is_probability_list(value):
        return repr(value[position]) if position < len(value) else "(none)"
    text = shown_text(value)
    if len(text) <= MAX_SHOWN_CHARS:
        return repr(text)
    start = len(tokenizer.decode(encode(tokenizer, text)[:max(position - 2, 0)]))
    shown = text[start:start + MAX_SHOWN_CHARS]
    return ("…" if start else "") + repr(shown) + ("…" if start + MAX_SHOWN_CHARS < len(text) else "")


def compare_logprobs(backend: str, expected: dict, actual: dict) -> list[Difference]:
    """The first token log-probability reported by both backends for the same call that differs."""
    shared = [key for key in expected if key in actual]
    off = [key for key in shared if abs(expected[key].logprob - actual[key].logprob) > TOLERANCE]
    if not off:
        return []
    first = min(off, key=lambda key: expected[key].position)
    a, b = expected[first], actual[first]
    return [Difference(backend, None, f"token logprob ({first[0].split('(')[0]})", a.position,
                       f"{a.logprob:.6f}", f"{b.logprob:.6f}")]


def num_shared_logprobs(expected: dict, actual: dict) -> int:
    """How many recorded log-probabilities two backends have in common (were compared)."""
    return sum(1 for key in expected if key in actual)


# ---- one case on every backend, and the whole run ------------------------------------------------------

@dataclasses.dataclass
class CaseReport:
    """A case, what every backend gave, and the differences from the in-process reference
    (`expected`: those a foreign server is expected to show, see `is_expected_on_foreign`)."""

    case: ConformanceCase
    outcomes: dict[str, Outcome]
    differences: list[Difference]
    num_logprobs_compared: dict[str, int]
    expected: list[Difference] = dataclasses.field(default_factory=list)

    @property
    def agrees(self) -> bool:
        return not self.differences

    @property
    def failed_everywhere(self) -> bool:
        """Every backend raised an error (nothing to compare)."""
        return self.agrees and all(o.is_error for o in self.outcomes.values())


@dataclasses.dataclass
class ConformanceReport:
    """All cases of a run."""

    cases: list[CaseReport]
    backends: tuple[str, ...] = BACKEND_NAMES

    @property
    def num_differences(self) -> int:
        return sum(len(c.differences) for c in self.cases)

    @property
    def num_expected(self) -> int:
        return sum(len(c.expected) for c in self.cases)

    @property
    def num_foreign_logprob_differences(self) -> int:
        """Token-logprob differences in the cases where a foreign server showed expected ones too."""
        return sum(1 for c in self.cases if c.expected for d in c.differences if d.variable == "token logprob")

    @property
    def num_failed(self) -> int:
        return sum(1 for c in self.cases if c.failed_everywhere)

    @property
    def exit_code(self) -> int:
        """0: every query ran and all backends agree; 1: a difference; 2: a query failed everywhere."""
        if self.num_differences:
            return 1
        return 2 if self.num_failed else 0


async def run_case(case: ConformanceCase, targets: Sequence[BackendTarget], tokenizer,
                   progress: "ProgressPrinter | None" = None, foreign: frozenset[str] = frozenset()) -> CaseReport:
    """Run `case` on every target (the first is the reference) and compare; differences of the
    backends named in `foreign` that such a server is expected to show are kept apart."""
    outcomes: dict[str, Outcome] = {}
    for target in targets:
        outcomes[target.name] = await run_on_target(case, target)
        if progress is not None:
            progress.backend_done(outcomes[target.name])
    reference = outcomes[targets[0].name]
    differences, compared = [], {}
    for target in targets[1:]:
        differences += compare_outcomes(reference, outcomes[target.name], tokenizer)
        compared[target.name] = num_shared_logprobs(reference.logprobs, outcomes[target.name].logprobs)
    expected = [d for d in differences if d.backend in foreign and is_expected_on_foreign(case, d)]
    return CaseReport(case, outcomes, [d for d in differences if d not in expected], compared, expected)


# ---- foreign servers (--foreign) ----------------------------------------------------------------------

#: the ``owned_by`` of the models this project's servers serve; any other server is foreign
OWN_SERVER = "lmql-backends"
EXPECTED_ON_FOREIGN = (
    "seeded sampling: a foreign server draws sampled tokens with its own random generator, "
    "not seeded_uniform, so the values of a sample query differ"
)
RAW_LOGPROBS_HINT = (
    "token logprobs differ from a foreign server: vLLM reports the unmasked distribution unless started "
    "with --logprobs-mode processed_logprobs"
)


def is_expected_on_foreign(case: ConformanceCase, difference: Difference) -> bool:
    """Whether a foreign server is expected to show `difference`: a value (not a token logprob)
    of a query that samples."""
    from .language.parser import parse_query
    from .runtime.api import resolve_decoder

    if difference.variable == "token logprob":
        return False
    try:
        return resolve_decoder(parse_query(case.query), None, dict(case.inputs)).name == "sample"
    except Exception:  # noqa: BLE001 - a query that does not parse fails on every backend alike
        return False


def is_foreign_server(endpoint: str, timeout: float = 10.0) -> bool:
    """Whether the new-API server at `endpoint` is not lmql-backends (its /v1/models ``owned_by``)."""
    url = endpoint if "://" in endpoint else f"http://{endpoint}"
    try:
        models = requests.get(f"{url.rstrip('/')}/v1/models", timeout=timeout).json().get("data") or []
    except (requests.RequestException, ValueError, AttributeError):
        return False  # the run itself then reports what is wrong with the server
    return any(isinstance(m, dict) and m.get("owned_by", OWN_SERVER) != OWN_SERVER for m in models)


async def run_conformance(cases: Sequence[ConformanceCase], targets: Sequence[BackendTarget], tokenizer,
                          progress: "ProgressPrinter | None" = None,
                          foreign: frozenset[str] = frozenset()) -> ConformanceReport:
    """Run every case on every target, one after the other (`foreign`: see run_case)."""
    reports = []
    for number, case in enumerate(cases, 1):
        if progress is not None:
            progress.case_started(number, len(cases), case)
        reports.append(await run_case(case, targets, tokenizer, progress, foreign))
        if progress is not None:
            progress.case_done(reports[-1])
    return ConformanceReport(reports, tuple(t.name for t in targets))


# ---- progress and the printed table --------------------------------------------------------------------

class ProgressPrinter:
    """One progress line per query: ``[ 3/20] name ... in-process ok 0.2s  new ok 0.3s  => agree``."""

    def __init__(self, stream: TextIO, name_width: int = 28):
        self.stream, self.name_width = stream, name_width

    def case_started(self, number: int, total: int, case: ConformanceCase) -> None:
        width = len(str(total))
        self.write(f"[{number:>{width}}/{total}] {case.name:<{self.name_width}}")

    def backend_done(self, outcome: Outcome) -> None:
        status = "error" if outcome.is_error else "ok"
        self.write(f" {outcome.backend} {status} {outcome.seconds:.1f}s ")

    def case_done(self, report: CaseReport) -> None:
        self.write(f" => {case_status(report)}\n")

    def write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def case_status(report: CaseReport) -> str:
    if report.differences:
        return f"DIFFER ({len(report.differences)})"
    if report.failed_everywhere:
        return "FAILED everywhere"
    return f"differ as expected ({len(report.expected)})" if report.expected else "agree"


def backend_cell(report: CaseReport, backend: str) -> str:
    outcome = report.outcomes[backend]
    if backend == REFERENCE:
        return "error" if outcome.is_error else f"{len(outcome.results)} result(s)"
    num = sum(1 for d in report.differences if d.backend == backend)
    if num:
        return f"DIFFER ({num})"
    num_expected = sum(1 for d in report.expected if d.backend == backend)
    if num_expected:
        return f"expected ({num_expected})"
    return "same error" if outcome.is_error else f"agree ({report.num_logprobs_compared.get(backend, 0)} lp)"


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_agreements(report: ConformanceReport) -> str:
    """The table of queries × backends."""
    rows = [["query", *report.backends]]
    rows += [[c.case.name, *(backend_cell(c, b) for b in report.backends)] for c in report.cases]
    return format_table(rows)


def format_differences(report: ConformanceReport, is_expected: bool = False) -> str:
    """The table of differences (or of the expected ones): query, backend, result, variable, first
    differing token, both values."""
    rows = [["query", "backend", "result", "variable", "token", REFERENCE, "backend value"]]
    for case in report.cases:
        for d in (case.expected if is_expected else case.differences):
            rows.append([case.case.name, d.backend, "" if d.result is None else str(d.result), d.variable,
                         "" if d.position is None else str(d.position), d.expected, d.actual])
    return format_table(rows)


def format_errors(report: ConformanceReport) -> str:
    """One line per failed run; one line per query when every backend failed the same way."""
    lines = []
    for case in report.cases:
        failed = [o for o in case.outcomes.values() if o.is_error]
        messages = {(o.error_type, o.error) for o in failed}
        if len(failed) == len(case.outcomes) and len(messages) == 1:
            lines.append(f"{case.case.name} [every backend]: {failed[0].error_type}: {failed[0].error}")
            continue
        lines += [f"{case.case.name} [{o.backend}]: {o.error_type}: {o.error}" for o in failed]
    return "\n".join(lines)


def format_report(report: ConformanceReport) -> str:
    """Everything the command prints after the progress lines."""
    parts = [format_agreements(report)]
    if report.num_differences:
        parts += ["", "Differences (token: first differing token of the value, or option index, or "
                      "absolute position for token logprobs):", format_differences(report)]
        if report.num_foreign_logprob_differences:
            parts += [f"Hint: {RAW_LOGPROBS_HINT}"]
    if report.num_expected:
        parts += ["", f"Expected differences on a foreign server ({EXPECTED_ON_FOREIGN}):",
                  format_differences(report, is_expected=True)]
    errors = format_errors(report)
    if errors:
        parts += ["", "Errors:", errors]
    parts += ["", summary_line(report)]
    return "\n".join(parts)


def summary_line(report: ConformanceReport) -> str:
    total = len(report.cases)
    if report.num_differences:
        num_cases = sum(1 for c in report.cases if c.differences)
        return f"{report.num_differences} difference(s) in {num_cases} of {total} queries"
    if report.num_failed:
        return f"no differences, but {report.num_failed} of {total} queries failed on every backend"
    num_expected = sum(1 for c in report.cases if c.expected)
    if num_expected:
        return (f"{total - num_expected} of {total} queries agree on {', '.join(report.backends)}; "
                f"{num_expected} differ as expected on a foreign server (seeded sampling)")
    return f"all {total} queries agree on {', '.join(report.backends)}"


# ---- query files and the command --------------------------------------------------------------------

def load_cases(paths: Sequence[str]) -> list[ConformanceCase]:
    """One case per query file; a directory stands for every ``.lmql`` file under it."""
    cases = []
    for path in map(pathlib.Path, paths):
        if path.is_dir():
            cases += [read_case(p) for p in sorted(path.rglob("*.lmql"))]
        elif path.is_file():
            cases.append(read_case(path))
        else:
            raise InvalidRequestError(f"query file {str(path)!r} does not exist; pass .lmql files or folders", "files")
    if not cases:
        raise InvalidRequestError(f"no .lmql files found in {', '.join(paths)}", "files")
    return cases


def read_case(path: pathlib.Path) -> ConformanceCase:
    text = path.read_text(encoding="utf-8")
    return ConformanceCase(str(path), text, tuple(file_inputs(text, str(path)).items()))


@dataclasses.dataclass(frozen=True)
class ConformanceOptions:
    """The arguments of ``lmql-backends conformance``."""

    model: str = "builtin:tiny"
    endpoint: str | None = None
    legacy_endpoint: str | None = None
    files: tuple[str, ...] = ()
    #: whether the new-API endpoint is a foreign server (vLLM); None: ask its /v1/models
    foreign: bool | None = None


@contextlib.contextmanager
def running_servers(options: ConformanceOptions, log: TextIO) -> Iterator[tuple[str, str]]:
    """The new and legacy endpoints: the given ones, or servers started here on free loopback ports."""
    from .server.app import serve

    model = served_name(options.model)
    with contextlib.ExitStack() as stack:
        endpoints = []
        for given, legacy in ((options.endpoint, False), (options.legacy_endpoint, True)):
            if given is None:
                with contextlib.redirect_stdout(log):  # the load summary is progress, not the report
                    handle = serve(model, host="127.0.0.1", port=0, legacy=legacy, background=True)
                stack.callback(handle.stop)
                given = handle.endpoint
                log.write(f"started the {'legacy' if legacy else 'new'} backend on {given}\n")
            endpoints.append(given)
        yield endpoints[0], endpoints[1]


def run_command(options: ConformanceOptions, out: TextIO | None = None, log: TextIO | None = None) -> int:
    """``lmql-backends conformance``: run, print the tables (to `out`, progress to `log`), return the exit status."""
    from .runtime.models import shared_tokenizer

    out, log = out or sys.stdout, log or sys.stderr

    cases = load_cases(options.files) if options.files else list(BUILTIN_CASES)
    tokenizer = shared_tokenizer(served_name(options.model))
    with running_servers(options, log) as (new_endpoint, legacy_endpoint):
        log.write(f"new backend: {new_endpoint}  legacy backend: {legacy_endpoint}  model: {options.model}\n")
        targets = make_targets(options.model, new_endpoint, legacy_endpoint)
        foreign = options.foreign if options.foreign is not None else (
            options.endpoint is not None and is_foreign_server(new_endpoint))
        if foreign:
            log.write(f"the new backend {new_endpoint} is a foreign server: differences of sample queries are "
                      f"expected (it draws with its own random generator)\n")
        report = asyncio.run(run_conformance(
            cases, targets, tokenizer, ProgressPrinter(log), frozenset({"new"}) if foreign else frozenset()))
    out.write(format_report(report) + "\n")
    return report.exit_code
