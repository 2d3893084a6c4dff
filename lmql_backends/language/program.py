"""The prompt clause compiled to an async Python function, and one execution of it.

Every prompt statement (a string statement, with or without its own ``where``) becomes
``(A, B) = await __lmql_prompt__(i, locals())``, where ``i`` numbers the parsed
:class:`PromptStatement` and ``A, B`` are its holes, so hole values are ordinary Python locals
for the statements that follow; a hole generated again overwrites the local, and the result's
`variables` hold its last value (as LMQL). Query inputs are the function's keyword-only
parameters. Calls are LMQL calls (`calls.CallTransformer`: async tools and nested query
functions are awaited); ``return X`` makes X the query's return value; ``import lmql`` is
dropped (``lmql`` is this package inside a query) and ``from lmql.X import Y`` gives this
package's equivalent of Y, or an error naming what LMQL has and this package does not.

Filling a hole is delegated to a callback (the runtime's decoder), so this module knows nothing
about models: it renders text, asks for hole values, runs nested queries and decorators, and
records the trace. The function is compiled once per set of input names; each execution
binds it to its own globals (the query's names plus, for an ``@lmql.query`` function, the
scope it was defined in).
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import functools
import types
from typing import Any, Awaitable, Callable

from ..errors import InvalidRequestError, QuerySyntaxError
from .calls import WHERE_CALL_FUNCTION, CallTransformer, await_where_calls
from .decorators import DecoratorChain, ProgramState, as_decorator, message
from .expression import DistributionClause, Expression, make_expression, parse_expression
from .qstrings import Hole, Template, Text, is_query_string, parse_template, render_interpolation

PROMPT_FUNCTION = "__lmql_prompt__"
QUERY_FUNCTION = "__lmql_query__"
IMPORT_FUNCTION = "__lmql_import__"
# what `from lmql.MODULE import NAME` gives inside a query (LMQL's names for what a decorator sees)
LMQL_IMPORTS = {
    ("lmql.runtime.program_state", "ProgramState"): ProgramState,
    ("lmql.language.qstrings", "TemplateVariable"): Hole,
    ("lmql.lib.chat", "message"): message,
}


@dataclasses.dataclass(frozen=True)
class PromptStatement:
    """One prompt statement: its query string and its own ``where`` (None without one).

    `compiled` is a cache the runtime fills once (the statement's compiled constraints).
    """

    index: int
    template: Template
    where: Expression | None = None
    compiled: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class HoleContext:
    """What the runtime needs to fill one hole.

    `program` and `statement` say which constraints apply: the program's ``where`` clause and
    the statement's own (None for a hole made by hand, e.g. in tests: the query's constraints).
    """

    variable: str
    type_name: str | None
    prompt: str
    scope: dict[str, Any]
    program: "PromptProgram | None" = None
    statement: PromptStatement | None = None
    hole: Hole | None = None
    frame: tuple[int, ...] = ()  # which (nested) query execution: each has its own finished variables
    stream: Callable[[str], None] | None = None  # streaming decorators: the value so far, after each token


@dataclasses.dataclass(frozen=True)
class FilledHole:
    """A hole's value: `text` goes into the prompt, `value` becomes the Python local."""

    text: str
    value: Any


class StopProgram(Exception):
    """Raised by a hole filler to end the query after this hole (e.g. max_len reached)."""

    def __init__(self, filled: FilledHole):
        super().__init__("the query stopped early")
        self.filled = filled


HoleFiller = Callable[[HoleContext], Awaitable[FilledHole]]
"""Fills a hole. A filler may also have ``record(context, filled)``: the program calls it with
a value the filler did not generate or that a decorator changed (a nested query's result, a
``@pre`` decorator's fixed value), so that later constraints see the variable's final value."""
NO_RETURN = object()


@dataclasses.dataclass
class ProgramTrace:
    """The outcome of one execution: the prompt text, the last value of each hole, the return value."""

    prompt: str = ""
    variables: dict[str, Any] = dataclasses.field(default_factory=dict)
    is_truncated: bool = False
    return_value: Any = NO_RETURN

    @property
    def has_return_value(self) -> bool:
        return self.return_value is not NO_RETURN and self.return_value is not None


@dataclasses.dataclass(frozen=True)
class PromptProgram:
    """The compiled prompt clause, with the query's ``where`` clause (applies to every hole)."""

    module: ast.Module
    statements: tuple[PromptStatement, ...]
    globals: dict[str, Any] = dataclasses.field(repr=False, compare=False)
    where: Expression | None = None
    distribution: DistributionClause | None = None  # an inline ``"..." distribution X in [...]``
    filename: str = "<query>"
    functions: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def templates(self) -> tuple[Template, ...]:
        return tuple(s.template for s in self.statements)

    @property
    def hole_names(self) -> tuple[str, ...]:
        """Every variable name used in a hole, in order of first appearance."""
        names = (hole.name for t in self.templates for hole in t.holes)
        return tuple(dict.fromkeys(names))

    @property
    def int_variables(self) -> frozenset[str]:
        return frozenset(h.name for t in self.templates for h in t.holes if h.type_name == "int")

    def make_function(self, input_names: tuple[str, ...]) -> types.FunctionType:
        """The async function running the prompt with `input_names` as keyword-only inputs."""
        if input_names not in self.functions:
            self.functions[input_names] = self.compile_function(input_names)
        return self.functions[input_names]

    def compile_function(self, input_names: tuple[str, ...]) -> types.FunctionType:
        function = make_function_node(self.module.body, input_names)
        module = ast.fix_missing_locations(ast.Module([function], type_ignores=[]))
        namespace = dict(self.globals)
        exec(compile(module, self.filename, "exec"), namespace)  # noqa: S102 - the user's own query
        return namespace[QUERY_FUNCTION]

    async def execute(self, inputs: dict[str, Any], fill: HoleFiller, scope: dict[str, Any] | None = None,
                      prompt: str = "", frame: tuple[int, ...] = ()) -> ProgramTrace:
        """Run the prompt once with `inputs`; `fill` provides every hole's value.

        `scope` adds names the program sees (an ``@lmql.query`` function's defining scope);
        `prompt` is the text before the program's first statement (a nested query's context);
        `frame` names this execution among nested ones (its holes carry it).
        """
        execution = _Execution(self, fill, {**self.globals, **(scope or {})}, prompt, frame)
        try:
            execution.trace.return_value = await execution.run(inputs)
        except StopProgram as stop:
            execution.trace.is_truncated = True
            execution.trace.prompt += stop.filled.text
        return execution.trace


class _Execution:
    """The state of one run: the prompt text so far and the hole values."""

    def __init__(self, program: PromptProgram, fill: HoleFiller, globals_: dict[str, Any], prompt: str,
                 frame: tuple[int, ...] = ()):
        self.program, self.fill, self.globals, self.frame = program, fill, globals_, frame
        self.trace = ProgramTrace(prompt=prompt)
        self.num_nested = 0

    async def run(self, inputs: dict[str, Any]) -> Any:
        check_input_names(inputs, self.program.hole_names)
        compiled = self.program.make_function(tuple(sorted(inputs)))
        function = types.FunctionType(compiled.__code__, {**self.globals, PROMPT_FUNCTION: self.prompt})
        try:
            return await function(**inputs)
        except NameError as exc:
            name = getattr(exc, "name", None)
            if name is None or name in self.globals:
                raise
            raise InvalidRequestError(
                f"the query uses {name!r}, which it does not define; pass it as an input "
                f"(run(query, {name}=...)) or define it in the query", name,
            ) from exc

    async def prompt(self, index: int, local_names: dict[str, Any]) -> tuple[Any, ...]:
        """Append statement `index` to the prompt, filling its holes; return the hole values."""
        statement = self.program.statements[index]
        scope = {**self.globals, **local_names}
        values = []
        for segment in statement.template.segments:
            if isinstance(segment, Hole):
                values.append(await self.fill_hole(statement, segment, scope))
            elif isinstance(segment, Text):
                self.trace.prompt += segment.text
            else:
                self.trace.prompt += await render_interpolation(segment, scope)
        return tuple(values)

    async def fill_hole(self, statement: PromptStatement, hole: Hole, scope: dict[str, Any]) -> Any:
        chain = await self.decorators(hole, scope)
        context = ProgramState(self.trace.prompt, dict(self.trace.variables))
        fixed = chain.pre(hole, context) if chain is not None else None
        if fixed is not None:
            value, text = fixed
        elif hole.type_name == "query":
            value, text = await self.fill_nested(hole, scope)
        else:
            value, text = await self.generate(statement, hole, scope, chain)
        if chain is not None:
            value, text = chain.post(value, text, context)
        if fixed is not None or hole.type_name == "query" or chain is not None:
            self.record(statement, hole, scope, FilledHole(text, value))
        self.trace.prompt += text
        self.trace.variables[hole.name] = scope[hole.name] = value
        return value

    def context(self, statement: PromptStatement, hole: Hole, scope: dict[str, Any],
                chain: DecoratorChain | None = None) -> HoleContext:
        stream = None
        if chain is not None and chain.has_stream:
            state = ProgramState(self.trace.prompt, dict(self.trace.variables))
            stream = functools.partial(chain.stream, context=state)
        return HoleContext(hole.name, hole.type_name, self.trace.prompt, dict(scope), self.program, statement, hole,
                           self.frame, stream)

    def record(self, statement: PromptStatement, hole: Hole, scope: dict[str, Any], filled: FilledHole) -> None:
        """Tell the filler a value it did not generate as it is (see `HoleFiller`)."""
        record = getattr(self.fill, "record", None)
        if record is not None:
            record(self.context(statement, hole, scope), filled)

    async def generate(self, statement: PromptStatement, hole: Hole, scope: dict[str, Any],
                       chain: DecoratorChain | None = None) -> tuple[Any, str]:
        wheres = [w.node for w in (self.program.where, statement.where) if w is not None]
        known = frozenset(self.trace.variables) - {hole.name}
        names = {**scope, **self.trace.variables}
        calls = await await_where_calls(wheres, names, known, frozenset(self.program.hole_names))
        context = self.context(statement, hole, {**scope, WHERE_CALL_FUNCTION: calls}, chain)
        try:
            filled = await self.fill(context)
        except StopProgram as stop:
            self.trace.variables[hole.name] = stop.filled.value
            raise
        return filled.value, filled.text

    async def decorators(self, hole: Hole, scope: dict[str, Any]) -> DecoratorChain | None:
        if not hole.decorators:
            return None
        return DecoratorChain(tuple([as_decorator(await d.evaluate(scope), d.source) for d in hole.decorators]))

    async def fill_nested(self, hole: Hole, scope: dict[str, Any]) -> tuple[Any, str]:
        """``[X: fn(args)]``: run the query function `fn` in this prompt's context.

        With a return value, its instructions leave the prompt and the value (as text) takes
        their place; without one, the nested prompt stays (LMQL's macro expansion).
        """
        target = await hole.type_code.evaluate(scope)
        args, kwargs = await hole.type_arguments.evaluate(scope) if hole.type_arguments else ((), {})
        nested = getattr(target, "nested_query", None)
        if nested is None:
            raise InvalidRequestError(
                f"the type of [{hole.name}: {hole.type_code.source}] is {target!r}; a hole's type is int, "
                "a regex string or an @lmql.query function", hole.name,
            )
        program, inputs, nested_scope = nested(args, kwargs)
        before = self.trace.prompt
        self.num_nested += 1
        trace = await program.execute(inputs, self.fill, nested_scope, before, self.frame + (self.num_nested,))
        if trace.is_truncated:
            raise StopProgram(FilledHole(trace.prompt[len(before):], trace.prompt[len(before):]))
        if trace.has_return_value:
            return trace.return_value, str(trace.return_value)
        text = trace.prompt[len(before):]
        return text, text


def arguments(*args: Any, **kwargs: Any) -> tuple[tuple, dict]:
    """The arguments of a nested query's call in a hole type, ``[X: fn(1, k=2)]``."""
    return args, kwargs


def import_name(module: str, name: str) -> Any:
    """``from lmql.MODULE import NAME`` inside a query."""
    if (module, name) in LMQL_IMPORTS:
        return LMQL_IMPORTS[module, name]
    raise InvalidRequestError(
        f"'from {module} import {name}': {module} is part of LMQL's library, not of lmql-backends (which runs "
        f"LMQL's language on local models); define {name} in the query or import it from your own module", name,
    )


def check_input_names(inputs: dict[str, Any], hole_names: tuple[str, ...]) -> None:
    clashes = sorted(set(inputs) & set(hole_names))
    if clashes:
        raise InvalidRequestError(
            f"input {clashes[0]!r} has the name of a query variable; rename the input", clashes[0]
        )
    bad = sorted(name for name in inputs if not name.isidentifier() or name.startswith("__lmql"))
    if bad:
        raise InvalidRequestError(f"input name {bad[0]!r} is not a valid Python identifier", bad[0])


def compile_prompt(source: str, line: int, column: int, globals_: dict[str, Any],
                   where: Expression | None = None, filename: str = "<query>",
                   prologue: tuple[str, int] | None = None) -> PromptProgram:
    """Compile the prompt clause `source`, which starts at (`line`, `column`) of the query.

    `prologue` is (source, line) of the Python before the decoder clause (``import re``,
    ``def f(x): ...`` above ``argmax ... from ... where``): it runs first, as plain Python (its
    strings are not prompt statements, its calls are not awaited), as LMQL runs it at module
    level; its names are the query's.
    """
    module = parse_statements(source, line, column)
    rewriter = _PromptRewriter(column)
    module = rewriter.visit(module)
    module = CallTransformer(frozenset({PROMPT_FUNCTION, IMPORT_FUNCTION})).visit(module)
    statements = tuple(rewriter.statements)
    is_one_statement = len(module.body) == 1 and len(statements) == 1
    if prologue is not None:
        module.body[:0] = _ImportRewriter().visit(parse_statements(prologue[0], prologue[1], 0, "prologue")).body
    if where is None and is_one_statement and statements[0].where is not None:
        # a query of one prompt statement: its where is the query's where (same meaning)
        where, statements = statements[0].where, (dataclasses.replace(statements[0], where=None),)
    return PromptProgram(module, statements, {"__builtins__": builtins, **globals_}, where, rewriter.distribution,
                         filename)


def parse_statements(source: str, line: int, column: int, clause: str = "prompt") -> ast.Module:
    try:
        module = ast.parse(source, "<query>", "exec")
    except SyntaxError as exc:
        raise QuerySyntaxError(
            f"the {clause} clause is not valid: {exc.msg}", line + (exc.lineno or 1) - 1, (exc.offset or 1) + column
        ) from None
    if not module.body and clause == "prologue":
        return module
    if not module.body:
        raise QuerySyntaxError("expected a prompt: at least one query string", line, column + 1)
    ast.increment_lineno(module, line - 1)
    return module


def inline_clause(node: ast.expr) -> tuple[str | None, ast.expr | None]:
    """("where", C) for the parser's ``"..." @ (C)``, ("distribution", X in L) for ``"..." @~~(X in L)``."""
    if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult) and is_query_string(node.left)):
        return None, None
    right = node.right
    if (isinstance(right, ast.UnaryOp) and isinstance(right.op, ast.Invert) and isinstance(right.operand, ast.UnaryOp)
            and isinstance(right.operand.op, ast.Invert)):
        return "distribution", right.operand.operand
    return "where", right


class _ImportRewriter(ast.NodeTransformer):
    """``import lmql`` is dropped (``lmql`` is this package), ``from lmql.X import Y`` looked up."""

    def visit_Import(self, node: ast.Import) -> ast.AST | None:
        names = [alias for alias in node.names if not (alias.name == "lmql" and alias.asname is None)]
        return ast.copy_location(ast.Import(names), node) if names else ast.copy_location(ast.Pass(), node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> ast.AST:
        if not (node.module or "").split(".")[0] == "lmql" or node.level:
            return node
        assignments = [
            ast.Assign([ast.Name(alias.asname or alias.name, ast.Store())], ast.Call(
                ast.Name(IMPORT_FUNCTION, ast.Load()), [ast.Constant(node.module), ast.Constant(alias.name)], []))
            for alias in node.names
        ]
        return [ast.copy_location(a, node) for a in assignments]


class _PromptRewriter(_ImportRewriter):
    """Turns each prompt statement into an awaited prompt call; leaves nested functions alone."""

    def __init__(self, column: int):
        self.statements: list[PromptStatement] = []
        self.column = column
        self.distribution = None

    def visit_Expr(self, node: ast.Expr) -> ast.stmt:
        value, where = node.value, None
        keyword, clause = inline_clause(value)
        if keyword is not None:
            marker, value = value.right, value.left
        if isinstance(value, ast.JoinedStr):
            raise QuerySyntaxError(
                "query strings interpolate {...} already; drop the 'f' prefix",
                node.lineno, node.col_offset + self.column + 1,
            )
        if not is_query_string(value):
            return self.generic_visit(node)
        template = parse_template(value.value, node.lineno, node.col_offset + self.column + 1)
        if keyword == "where":
            where = parse_expression(ast.unparse(clause), (clause.lineno, clause.col_offset + self.column), "where")
        elif keyword == "distribution":
            self.distribution = self.make_distribution(clause, marker)
        self.statements.append(PromptStatement(len(self.statements), template, where))
        return ast.copy_location(make_prompt_statement(len(self.statements) - 1, template), node)

    def make_distribution(self, clause: ast.expr, marker: ast.expr):
        """``"..." distribution X in L`` (`marker` is the stand-in, one column after the keyword)."""
        line, column = marker.lineno, marker.col_offset + self.column
        if not (isinstance(clause, ast.Compare) and isinstance(clause.left, ast.Name)
                and len(clause.ops) == 1 and isinstance(clause.ops[0], ast.In)):
            raise QuerySyntaxError("expected 'distribution VAR in [options]'", line, column)
        if self.distribution is not None:
            raise QuerySyntaxError("a query has one distribution", line, column)
        values = make_expression(clause.comparators[0], (clause.lineno, clause.col_offset + self.column))
        return DistributionClause(clause.left.id, values)

    def skip(self, node: ast.AST) -> ast.AST:
        return node  # strings in nested functions and classes are Python strings (docstrings), as in LMQL

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = visit_ClassDef = skip


def make_prompt_statement(index: int, template: Template) -> ast.stmt:
    """``(A, B) = await __lmql_prompt__(index, locals())`` (or a bare await without holes)."""
    call = ast.Await(ast.Call(
        ast.Name(PROMPT_FUNCTION, ast.Load()),
        [ast.Constant(index), ast.Call(ast.Name("locals", ast.Load()), [], [])], [],
    ))
    if not template.holes:
        return ast.Expr(call)
    targets = [ast.Name(hole.name, ast.Store()) for hole in template.holes]
    return ast.Assign([ast.Tuple(targets, ast.Store())], call)


def make_function_node(body: list[ast.stmt], input_names: tuple[str, ...]) -> ast.AsyncFunctionDef:
    arguments_ = ast.arguments(
        posonlyargs=[], args=[], vararg=None,
        kwonlyargs=[ast.arg(name) for name in input_names], kw_defaults=[None] * len(input_names),
        kwarg=None, defaults=[],
    )
    return ast.AsyncFunctionDef(name=QUERY_FUNCTION, args=arguments_, body=body, decorator_list=[], returns=None)
