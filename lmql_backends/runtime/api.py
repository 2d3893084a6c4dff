"""Running queries: `run` / `run_sync`, the `@query` decorator, and `score` / `score_sync`.

::

    import lmql_backends as lmql

    result = await lmql.run('"Hello[WHO]" where len(TOKENS(WHO)) < 10')      # modern form
    result = lmql.run_sync('argmax "Hi {name}[X]" from "local:builtin:tiny"', name="Ann")
    results = await lmql.run(query, decoder="sample(n=2, seed=1)", model=lmql.model("m", endpoint="host:8080"))

    @lmql.query
    async def greet(name):
        '''lmql
        "Hello {name}, [REPLY]" where STOPS_AT(REPLY, ".")
        return REPLY.strip()
        '''

    reply = await greet("Ann")           # or greet.run_sync("Ann")

    summarize = lmql.F("Summarize: {text}[SUMMARY]", "len(TOKENS(SUMMARY)) < 20")
    summary = summarize("...")           # the one variable's value (a dict with several)

The keywords `model` and `decoder` of `run` are reserved; every other keyword is a query input.
A `model`/`decoder` given to the call wins over the query's ``from``/decoder clause. A query
function (or ``lmql.F``) called inside a running query, with no model of its own (none given to
`@query`/`F` or the call, no ``from`` clause), runs on the caller's model and backend. A program
with ``return X`` gives X instead of its QueryResult, as in LMQL (`execute` always gives the
QueryResult, whose `return_value` holds X). An ``@query`` function is an async function; one
declared with plain ``def`` returns its result directly when no event loop is running (LMQL's
sync query functions). Inside a query, query functions are called (and awaited) like any
function, or used as a hole's type, ``[ANSWER: chain_of_thought(shots=2)]`` (a nested query).
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import concurrent.futures
import contextvars
import dataclasses
import functools
import inspect
import sys
import textwrap
from typing import Any, Callable

from ..errors import InvalidRequestError, QuerySyntaxError
from ..language.parser import DecoderClause, Query, make_decoder_clause, parse_query, query_globals
from ..language.program import PromptProgram
from ..language.qstrings import Interpolation
from .decoders import DecoderSpec, decode, make_decoder, score_options
from .models import ModelSpec, as_model_spec, make_client
from .result import QueryResult
from .tokens import prompt_ids

DecoderArg = "str | DecoderSpec | None"
ModelArg = "str | ModelSpec | None"


async def run(query: "str | Query", /, *, model: ModelArg = None, decoder: DecoderArg = None,
              **inputs: Any) -> Any:
    """Run a query with `inputs`; one QueryResult for argmax and n == 1, else a list.

    A program that returns a value (``return X``) gives X in place of each QueryResult.
    """
    return returned_values(await execute(query, model=model, decoder=decoder, **inputs))


async def execute(query: "str | Query", /, *, model: ModelArg = None, decoder: DecoderArg = None,
                  scope: dict[str, Any] | None = None, **inputs: Any) -> "QueryResult | list[QueryResult]":
    """`run`, always giving QueryResults (a return value is in their `return_value`).

    `scope` adds names the query sees (an ``@query`` function's defining scope).
    """
    parsed = query if isinstance(query, Query) else parse_query(query)
    spec = resolve_decoder(parsed, decoder, inputs)
    model_spec = resolve_model(parsed, model, inputs)
    caller = CALLER.get()
    if caller is not None and model is None and parsed.model is None:
        # a query function called inside a query: the caller's model, on the caller's backend
        model_spec = caller.model
        if spec.backend is None:
            spec = dataclasses.replace(spec, backend=caller.decoder.backend, chunk_timeout=caller.decoder.chunk_timeout)
    client = make_client(model_spec, spec.backend, spec.chunk_timeout)
    token = CALLER.set(Caller(model_spec, spec))
    try:
        return await decode(parsed, client, spec, inputs, scope)
    finally:
        CALLER.reset(token)
        await client.aclose()


@dataclasses.dataclass(frozen=True)
class Caller:
    """The model and decoder of the running query: what a query function called inside it runs on."""

    model: ModelSpec
    decoder: DecoderSpec


# set while a query runs (contextvars follow awaits and the tasks a query starts)
CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("lmql_backends_caller", default=None)


def returned_values(results: "QueryResult | list[QueryResult]") -> Any:
    """Each result's return value in its place, for the results of programs that return one."""
    if isinstance(results, list):
        return [returned_values(r) for r in results]
    return results.return_value if results.return_value is not None else results


def run_sync(query: "str | Query", /, *, model: ModelArg = None, decoder: DecoderArg = None,
             **inputs: Any) -> "QueryResult | list[QueryResult]":
    """`run` for code without an event loop (works inside one too, on a worker thread)."""
    return run_until_complete(lambda: run(query, model=model, decoder=decoder, **inputs))


async def score(prompt: str, options: list[str], *, model: ModelArg = None, backend: str | None = None,
                chunk_timeout: float = 30.0) -> list[tuple[str, float]]:
    """``(option, p)`` for each option after `prompt`: mean token log-probability, then softmax."""
    if isinstance(options, (str, bytes)) or not options:
        raise InvalidRequestError(f"options must be a non-empty list of strings, got {options!r}", "options")
    client = make_client(as_model_spec(model), backend, chunk_timeout)
    try:
        ids = prompt_ids(client.tokenizer, prompt, client.bos_token_id)
        return [(s.option, s.probability) for s in await score_options(client, ids, [str(o) for o in options])]
    finally:
        await client.aclose()


def score_sync(prompt: str, options: list[str], **kwargs: Any) -> list[tuple[str, float]]:
    """`score` for code without an event loop."""
    return run_until_complete(lambda: score(prompt, options, **kwargs))


class QueryFunction:
    """A function whose docstring is a query; its parameters are the query's inputs.

    The query also sees the names of the scope the function is defined in (its module's
    globals and, for a function defined inside a query or another function, that frame's
    locals at the definition), as LMQL's query functions do.
    """

    def __init__(self, function: Callable, model: ModelArg = None, decoder: DecoderArg = None):
        if not function.__doc__ or not function.__doc__.strip():
            raise QuerySyntaxError(f"@query function {function.__name__!r} needs its query as its docstring")
        self.function, self.model, self.decoder = function, model, decoder
        self.query = parse_query(raw_docstring(function) or function.__doc__)
        self.signature = inspect.signature(function)
        self.scope = defining_scope(function)
        self.is_async = inspect.iscoroutinefunction(function)
        functools.update_wrapper(self, function)

    def inputs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidRequestError(f"{self.function.__name__}(): {exc}") from None
        bound.apply_defaults()
        return dict(bound.arguments)

    def __call__(self, *args: Any, **kwargs: Any):
        """An awaitable of the result; for a plain ``def`` outside an event loop, the result."""
        if not self.is_async and not is_loop_running():
            return self.run_sync(*args, **kwargs)
        return self.call(*args, **kwargs)

    async def call(self, *args: Any, **kwargs: Any):
        results = await execute(self.query, model=self.model, decoder=self.decoder, scope=self.scope,
                                **self.inputs(args, kwargs))
        return returned_values(results)

    def run_sync(self, *args: Any, **kwargs: Any):
        return run_until_complete(lambda: self.call(*args, **kwargs))

    def nested_query(self, args: tuple, kwargs: dict) -> tuple[PromptProgram, dict[str, Any], dict[str, Any]]:
        """What a hole ``[X: fn(args)]`` runs: the program, its inputs and its scope."""
        return self.query.prompt, self.inputs(args, kwargs), self.scope


def raw_docstring(function: Callable) -> str | None:
    """The docstring as written in the source, escapes unprocessed (``"\\n"`` stays a backslash
    and an n, so a query string in it means what it means in a query), or None without source."""
    try:
        source = textwrap.dedent(inspect.getsource(function))
        node = ast.parse(source).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return None
    if not (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)):
        return None
    literal = ast.get_source_segment(source, node.body[0].value) or ""
    literal = literal.lstrip("rRuU")
    quote = literal[:3] if literal[:3] in ('"""', "'''") else literal[:1]
    if not quote or not literal.endswith(quote) or len(literal) < 2 * len(quote):
        return None
    return literal[len(quote):-len(quote)]


def defining_scope(function: Callable) -> dict[str, Any]:
    """The names visible where `function` is decorated: its globals and the decorating frame's locals."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame = frame.f_back
    local_names = dict(frame.f_locals) if frame is not None and frame.f_locals is not frame.f_globals else {}
    return {**function.__globals__, **local_names}


class F:
    """``lmql.F("Summarize: {text}[SUMMARY]", "len(TOKENS(SUMMARY)) < 20")``: a one-statement query function.

    Its inputs are the names its ``{...}`` interpolations read, in order (by position or keyword);
    calling it gives the value of its one variable (a dict when it has several). Like a plain
    ``def`` query function it returns the value directly outside an event loop, an awaitable in one.
    """

    def __init__(self, template: str, constraints: str | None = None, *, model: ModelArg = None,
                 decoder: DecoderArg = None):
        if not isinstance(template, str):
            raise InvalidRequestError(f"lmql.F takes a query string, got {template!r}", "template")
        source = repr(template) + (f" where {constraints}" if constraints else "")
        self.query, self.model, self.decoder = parse_query(source), model, decoder
        self.input_names = interpolation_names(self.query.prompt)

    def __call__(self, *args: Any, **kwargs: Any):
        if not is_loop_running():
            return run_until_complete(lambda: self.call(*args, **kwargs))
        return self.call(*args, **kwargs)

    async def call(self, *args: Any, **kwargs: Any):
        if len(args) > len(self.input_names):
            raise InvalidRequestError(f"lmql.F takes {len(self.input_names)} inputs ({', '.join(self.input_names)}), "
                                      f"got {len(args)}")
        inputs = {**dict(zip(self.input_names, args)), **kwargs}
        result = await execute(self.query, model=self.model, decoder=self.decoder, **inputs)
        values = {k: v for k, v in result.variables.items()}
        return next(iter(values.values())) if len(values) == 1 else values


def interpolation_names(program: PromptProgram) -> tuple[str, ...]:
    """The free names read by the ``{...}`` interpolations of `program`, in order."""
    holes = set(program.hole_names)
    names = []
    for template in program.templates:
        for segment in template.segments:
            if isinstance(segment, Interpolation):
                tree = ast.parse(segment.source, mode="eval")
                names += [n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)]
    return tuple(dict.fromkeys(n for n in names if n not in holes and n not in dir(builtins) and n != "lmql"))


def query(function: Callable | None = None, *, model: ModelArg = None, decoder: DecoderArg = None):
    """Decorator: ``@query`` or ``@query(model=..., decoder=...)`` on a function with a query docstring.

    Calling the decorated function returns an awaitable of the result; ``.run_sync(...)`` runs it.
    """
    if function is None:
        return lambda f: QueryFunction(f, model, decoder)
    return QueryFunction(function, model, decoder)


# ---- resolving the decoder and the model ----------------------------------------------------------

def resolve_decoder(parsed: Query, decoder: DecoderArg, inputs: dict[str, Any]) -> DecoderSpec:
    """The call's decoder, else the query's decoder clause, else argmax."""
    if isinstance(decoder, DecoderSpec):
        return decoder
    if isinstance(decoder, str):
        return evaluate_decoder(parse_decoder_text(decoder), inputs)
    if decoder is not None:
        raise InvalidRequestError(f"decoder must be a string like 'sample(n=2)' or a DecoderSpec, got {decoder!r}", "decoder")
    if parsed.decoder is not None:
        return evaluate_decoder(parsed.decoder, inputs)
    return make_decoder("argmax")


def parse_decoder_text(text: str) -> DecoderClause:
    try:
        node = ast.parse(text.strip(), "<decoder>", "eval").body
    except SyntaxError as exc:
        raise QuerySyntaxError(f"decoder {text!r} does not parse: {exc.msg}", 1, exc.offset or 1) from None
    return make_decoder_clause(node, text, (1, 0))


# LMQL 0.7's other decoders (src/lmql/runtime/dclib/decoders.py) and why none is ``beam`` renamed
LMQL_ONLY_DECODERS = {
    "beam_var": "beam search pooled by the variable being decoded, length-normalised scores "
                "and dynamic beam allocation (Post and Vilar)",
    "var": "variable-level beam search: b candidate values per variable, sampled by default",
    "best_k": "best-first search with a token budget, a time-decayed length-normalised score "
              "and a heap of partial sequences",
    "beam_sample": "beam search whose n continuations per beam are sampled, not the top n",
}


def evaluate_decoder(clause: DecoderClause, inputs: dict[str, Any]) -> DecoderSpec:
    if clause.name in LMQL_ONLY_DECODERS:
        raise InvalidRequestError(
            f"decoder {clause.name!r} is an LMQL decoder ({LMQL_ONLY_DECODERS[clause.name]}), "
            "which lmql-backends does not implement; use argmax, sample(n=..., temperature=...) or beam(n=...)",
            "decoder",
        )
    scope = {**query_globals(), **inputs}
    return make_decoder(clause.name, **{name: expr.evaluate(scope) for name, expr in clause.arguments})


OPENAI_MODELS = ("chatgpt", "gpt-4", "gpt-3.5-turbo", "text-davinci-003", "text-davinci-002", "text-ada-001",
                 "text-curie-001", "text-babbage-001", "davinci", "curie", "babbage", "ada")
OPENAI_PREFIXES = ("openai/", "azure/", "gpt-3.5", "gpt-4")


def resolve_model(parsed: Query, model: ModelArg, inputs: dict[str, Any]) -> ModelSpec:
    """The call's model, else the query's ``from`` clause, else the embedded model in-process."""
    if model is not None or parsed.model is None:
        return check_servable(as_model_spec(model))
    return check_servable(as_model_spec(parsed.model.evaluate({**parsed.globals, **inputs})))


def check_servable(spec: ModelSpec) -> ModelSpec:
    """An OpenAI model is valid LMQL but not something this package can run: say so and what to do."""
    name = spec.name
    if name in OPENAI_MODELS or name.startswith(OPENAI_PREFIXES):
        raise InvalidRequestError(
            f"model {name!r} is an OpenAI model, which lmql-backends does not run (it serves local Hugging Face "
            "models); name a local model instead: from \"local:NAME\" in the query, or run(query, "
            "model=lmql.model(\"NAME\", endpoint=\"HOST:PORT\")) for a model served by lmql-backends", "model",
        )
    return spec


def run_until_complete(make_coroutine: Callable[[], Any]):
    """Run a coroutine to completion from sync code, even when a loop is already running here."""
    if not is_loop_running():
        return asyncio.run(make_coroutine())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make_coroutine())).result()


def is_loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
