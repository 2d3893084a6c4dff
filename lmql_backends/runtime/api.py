"""Running queries: `run` / `run_sync`, the `@query` decorator, and `score` / `score_sync`.

::

    import lmql_backends as lmql

    result = await lmql.run('"Hello[WHO]" where len(TOKENS(WHO)) < 10')      # modern form
    result = lmql.run_sync('argmax "Hi {name}[X]" from "local:builtin:tiny"', name="Ann")
    results = await lmql.run(query, decoder="sample(n=2, seed=1)", model=lmql.model("m", endpoint="host:8080"))

    @lmql.query
    async def greet(name):
        '''argmax "Hello {name}, [REPLY]" where STOPS_AT(REPLY, ".")'''

    result = await greet("Ann")          # or greet.run_sync("Ann")

The keywords `model` and `decoder` of `run` are reserved; every other keyword is a query input.
A `model`/`decoder` given to the call wins over the query's ``from``/decoder clause.
"""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import functools
import inspect
from typing import Any, Callable

from ..errors import InvalidRequestError, QuerySyntaxError
from ..language.parser import DecoderClause, Query, make_decoder_clause, parse_query, query_globals
from .decoders import DecoderSpec, decode, make_decoder, score_options
from .models import ModelSpec, as_model_spec, make_client
from .result import QueryResult
from .tokens import prompt_ids

DecoderArg = "str | DecoderSpec | None"
ModelArg = "str | ModelSpec | None"


async def run(query: "str | Query", /, *, model: ModelArg = None, decoder: DecoderArg = None,
              **inputs: Any) -> "QueryResult | list[QueryResult]":
    """Run a query with `inputs`; one QueryResult for argmax and n == 1, else a list."""
    parsed = query if isinstance(query, Query) else parse_query(query)
    spec = resolve_decoder(parsed, decoder, inputs)
    client = make_client(resolve_model(parsed, model, inputs), spec.backend, spec.chunk_timeout)
    try:
        return await decode(parsed, client, spec, inputs)
    finally:
        await client.aclose()


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
    """A function whose docstring is a query; its parameters are the query's inputs."""

    def __init__(self, function: Callable, model: ModelArg = None, decoder: DecoderArg = None):
        if not function.__doc__ or not function.__doc__.strip():
            raise QuerySyntaxError(f"@query function {function.__name__!r} needs its query as its docstring")
        self.function, self.model, self.decoder = function, model, decoder
        self.query = parse_query(function.__doc__)
        self.signature = inspect.signature(function)
        functools.update_wrapper(self, function)

    def inputs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidRequestError(f"{self.function.__name__}(): {exc}") from None
        bound.apply_defaults()
        return dict(bound.arguments)

    async def __call__(self, *args: Any, **kwargs: Any):
        return await run(self.query, model=self.model, decoder=self.decoder, **self.inputs(args, kwargs))

    def run_sync(self, *args: Any, **kwargs: Any):
        return run_until_complete(lambda: self(*args, **kwargs))


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


def evaluate_decoder(clause: DecoderClause, inputs: dict[str, Any]) -> DecoderSpec:
    scope = {**query_globals(), **inputs}
    return make_decoder(clause.name, **{name: expr.evaluate(scope) for name, expr in clause.arguments})


def resolve_model(parsed: Query, model: ModelArg, inputs: dict[str, Any]) -> ModelSpec:
    """The call's model, else the query's ``from`` clause, else the embedded model in-process."""
    if model is not None or parsed.model is None:
        return as_model_spec(model)
    return as_model_spec(parsed.model.evaluate({**parsed.globals, **inputs}))


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
