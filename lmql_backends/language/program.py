"""The prompt clause compiled to an async Python function, and one execution of it.

Every bare string statement of the prompt clause becomes ``(A, B) = await __prompt__(i, locals())``
where ``i`` numbers the parsed :class:`~.qstrings.Template` and ``A, B`` are its holes, so the
values of holes are ordinary Python locals for the statements that follow. Query inputs are the
function's keyword-only parameters.

Filling a hole is delegated to a callback (the runtime's decoder), so this module knows nothing
about models: it renders text, asks for hole values and records the trace.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
from typing import Any, Awaitable, Callable

from ..errors import InvalidRequestError, QuerySyntaxError
from .qstrings import Hole, Interpolation, Template, Text, is_query_string, parse_template, render_interpolation

PROMPT_FUNCTION = "__lmql_prompt__"
QUERY_FUNCTION = "__lmql_query__"


@dataclasses.dataclass(frozen=True)
class HoleContext:
    """What the runtime needs to fill one hole."""

    variable: str
    type_name: str | None
    prompt: str
    scope: dict[str, Any]


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


@dataclasses.dataclass
class ProgramTrace:
    """The outcome of one execution: the prompt text and the last value of each hole."""

    prompt: str = ""
    variables: dict[str, Any] = dataclasses.field(default_factory=dict)
    is_truncated: bool = False


@dataclasses.dataclass(frozen=True)
class PromptProgram:
    """The compiled prompt clause."""

    module: ast.Module
    templates: tuple[Template, ...]
    globals: dict[str, Any] = dataclasses.field(repr=False, compare=False)
    functions: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def hole_names(self) -> tuple[str, ...]:
        """Every variable name used in a hole, in order of first appearance."""
        names = (hole.name for t in self.templates for hole in t.holes)
        return tuple(dict.fromkeys(names))

    @property
    def int_variables(self) -> frozenset[str]:
        return frozenset(h.name for t in self.templates for h in t.holes if h.type_name == "int")

    def make_function(self, input_names: tuple[str, ...]):
        """The async function running the prompt with `input_names` as keyword-only inputs."""
        if input_names not in self.functions:
            self.functions[input_names] = self.compile_function(input_names)
        return self.functions[input_names]

    def compile_function(self, input_names: tuple[str, ...]):
        function = make_function_node(self.module.body, input_names)
        module = ast.fix_missing_locations(ast.Module([function], type_ignores=[]))
        namespace = dict(self.globals)
        exec(compile(module, "<query>", "exec"), namespace)  # noqa: S102 - the user's own query
        return namespace[QUERY_FUNCTION]

    async def execute(self, inputs: dict[str, Any], fill: HoleFiller) -> ProgramTrace:
        """Run the prompt once with `inputs`; `fill` provides every hole's value."""
        check_input_names(inputs, self.hole_names)
        function = self.make_function(tuple(sorted(inputs)))
        execution = _Execution(self.templates, fill, self.globals)
        try:
            await function(execution.prompt, **inputs)
        except StopProgram as stop:
            execution.trace.is_truncated = True
            execution.trace.prompt += stop.filled.text
        return execution.trace


class _Execution:
    """The state of one run: the prompt text so far and the hole values."""

    def __init__(self, templates: tuple[Template, ...], fill: HoleFiller, globals_: dict[str, Any]):
        self.templates, self.fill, self.globals = templates, fill, globals_
        self.trace = ProgramTrace()

    async def prompt(self, index: int, local_names: dict[str, Any]) -> tuple[Any, ...]:
        """Append template `index` to the prompt, filling its holes; return the hole values."""
        scope = {**self.globals, **local_names}
        values = []
        for segment in self.templates[index].segments:
            if isinstance(segment, Hole):
                values.append(await self.fill_hole(segment, scope))
            else:
                self.trace.prompt += render_segment(segment, scope)
        return tuple(values)

    async def fill_hole(self, hole: Hole, scope: dict[str, Any]) -> Any:
        context = HoleContext(hole.name, hole.type_name, self.trace.prompt, dict(scope))
        try:
            filled = await self.fill(context)
        except StopProgram as stop:
            self.trace.variables[hole.name] = stop.filled.value
            raise
        self.trace.prompt += filled.text
        self.trace.variables[hole.name] = scope[hole.name] = filled.value
        return filled.value


def render_segment(segment: Text | Interpolation, scope: dict[str, Any]) -> str:
    if isinstance(segment, Text):
        return segment.text
    return render_interpolation(segment, scope)


def check_input_names(inputs: dict[str, Any], hole_names: tuple[str, ...]) -> None:
    clashes = sorted(set(inputs) & set(hole_names))
    if clashes:
        raise InvalidRequestError(
            f"input {clashes[0]!r} has the name of a query variable; rename the input", clashes[0]
        )
    bad = sorted(name for name in inputs if not name.isidentifier() or name.startswith("__lmql"))
    if bad:
        raise InvalidRequestError(f"input name {bad[0]!r} is not a valid Python identifier", bad[0])


def compile_prompt(source: str, line: int, column: int, globals_: dict[str, Any]) -> PromptProgram:
    """Compile the prompt clause `source`, which starts at (`line`, `column`) of the query."""
    module = parse_statements(source, line, column)
    rewriter = _PromptRewriter(column)
    module = rewriter.visit(module)
    return PromptProgram(module, tuple(rewriter.templates), {"__builtins__": builtins, **globals_})


def parse_statements(source: str, line: int, column: int) -> ast.Module:
    try:
        module = ast.parse(source, "<query>", "exec")
    except SyntaxError as exc:
        raise QuerySyntaxError(
            f"the prompt clause is not valid: {exc.msg}", line + (exc.lineno or 1) - 1, (exc.offset or 1) + column
        ) from None
    if not module.body:
        raise QuerySyntaxError("expected a prompt: at least one query string", line, column + 1)
    ast.increment_lineno(module, line - 1)
    return module


class _PromptRewriter(ast.NodeTransformer):
    """Turns each bare string statement into an awaited prompt call."""

    def __init__(self, column: int):
        self.templates: list[Template] = []
        self.column = column

    def visit_Expr(self, node: ast.Expr) -> ast.stmt:
        if isinstance(node.value, ast.JoinedStr):
            raise QuerySyntaxError(
                "query strings interpolate {...} already; drop the 'f' prefix",
                node.lineno, node.col_offset + self.column + 1,
            )
        if not is_query_string(node.value):
            return self.generic_visit(node)
        template = parse_template(node.value.value, node.lineno, node.col_offset + self.column + 1)
        self.templates.append(template)
        return ast.copy_location(make_prompt_statement(len(self.templates) - 1, template), node)

    def visit_FunctionDef(self, node):
        return self.reject_nested(node)

    visit_AsyncFunctionDef = visit_Lambda = visit_ClassDef = visit_FunctionDef

    def reject_nested(self, node) -> ast.AST:
        if any(isinstance(n, ast.Expr) and is_query_string(n.value) for n in ast.walk(node)):
            raise QuerySyntaxError(
                "query strings inside nested functions or classes are not supported",
                node.lineno, node.col_offset + 1,
            )
        return node


def make_prompt_statement(index: int, template: Template) -> ast.stmt:
    """``(A, B) = await __prompt__(index, locals())`` (or a bare await without holes)."""
    call = ast.Await(ast.Call(
        ast.Name(PROMPT_FUNCTION, ast.Load()),
        [ast.Constant(index), ast.Call(ast.Name("locals", ast.Load()), [], [])], [],
    ))
    if not template.holes:
        return ast.Expr(call)
    targets = [ast.Name(hole.name, ast.Store()) for hole in template.holes]
    return ast.Assign([ast.Tuple(targets, ast.Store())], call)


def make_function_node(body: list[ast.stmt], input_names: tuple[str, ...]) -> ast.AsyncFunctionDef:
    arguments = ast.arguments(
        posonlyargs=[], args=[ast.arg(PROMPT_FUNCTION)], vararg=None,
        kwonlyargs=[ast.arg(name) for name in input_names], kw_defaults=[None] * len(input_names),
        kwarg=None, defaults=[],
    )
    return ast.AsyncFunctionDef(name=QUERY_FUNCTION, args=arguments, body=body, decorator_list=[], returns=None)
