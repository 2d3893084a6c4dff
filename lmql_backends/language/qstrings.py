"""Query strings: the text of a prompt statement split into text, holes and interpolations.

Inside a query string:

- ``[VAR]`` is a hole the model fills; ``[VAR: int]`` is a hole constrained by ``INT(VAR)``,
  ``[VAR: r"[a-z]+"]`` one constrained by ``REGEX``, and ``[VAR: fn(args)]`` one filled by the
  nested query ``fn`` (an ``@lmql.query`` function); ``[@dec VAR]``, ``[@a @b(1) VAR]`` apply
  decorators to the value;
- ``{expr}`` interpolates a Python value (``{expr!r}`` and ``{expr:spec}`` work as in f-strings);
  a coroutine (an async call) is awaited;
- ``{:system}``, ``{:user}``, ``{:assistant}`` mark a chat role: the prompt gets the marker
  ``<lmql:ROLE/>`` there (as in LMQL), which a chat template renders;
- ``[[``, ``]]``, ``{{`` and ``}}`` stand for literal brackets and braces.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import inspect
import re
from typing import Any, Union

from ..errors import QuerySyntaxError
from .calls import compile_async_expression

OPENERS, CLOSERS = "([{", ")]}"
ARGUMENTS_FUNCTION = "__lmql_arguments__"
ROLE_TAG = re.compile(r":([A-Za-z_][A-Za-z0-9_-]*)")
DECORATOR_START = re.compile(r"\s*@")


def role_marker(role: str) -> str:
    """The text LMQL puts in the prompt for ``{:ROLE}``."""
    return f"<lmql:{role}/>"


@dataclasses.dataclass(frozen=True)
class Text:
    """Literal text."""

    text: str


@dataclasses.dataclass(frozen=True)
class PythonCode:
    """A Python expression of a query string (a decorator or a hole's type), compiled once."""

    source: str
    code: Any = dataclasses.field(compare=False, repr=False)

    async def evaluate(self, scope: dict) -> Any:
        value = eval(self.code, scope)  # noqa: S307 - query code is the user's own Python
        return await value if inspect.iscoroutine(value) else value


@dataclasses.dataclass(frozen=True)
class Hole:
    """``[@decorators name: type]``: a variable the model fills.

    type_name: "int", "regex" (pattern in `pattern`), "query" (a nested query, `type_code`
    evaluates to the query function or a call of it) or None.
    """

    name: str
    type_name: str | None = None
    pattern: str | None = None
    type_code: PythonCode | None = None
    type_arguments: PythonCode | None = None  # ``fn(1, k=2)``: evaluates to ((1,), {"k": 2})
    decorators: tuple[PythonCode, ...] = ()


@dataclasses.dataclass(frozen=True)
class Interpolation:
    """``{source}``: a Python expression whose value is inserted as text."""

    source: str
    code: object = dataclasses.field(compare=False, repr=False)
    conversion: str | None = None
    format_spec: str = ""


Segment = Union[Text, Hole, Interpolation]


@dataclasses.dataclass(frozen=True)
class Template:
    """A parsed query string; `line` and `column` locate it in the query (1-based)."""

    segments: tuple[Segment, ...]
    line: int = 1
    column: int = 1

    @property
    def holes(self) -> tuple[Hole, ...]:
        return tuple(s for s in self.segments if isinstance(s, Hole))


def parse_template(text: str, line: int = 1, column: int = 1) -> Template:
    """Split a query string's value into text, holes and interpolations."""
    parser = _TemplateParser(text, line, column)
    return Template(tuple(parser.parse()), line, column)


class _TemplateParser:
    """A one-pass scanner over a query string's value."""

    def __init__(self, text: str, line: int, column: int):
        self.text, self.line, self.column = text, line, column
        self.pos = 0
        self.segments: list[Segment] = []
        self.pending: list[str] = []

    def parse(self) -> list[Segment]:
        while self.pos < len(self.text):
            self.parse_one()
        self.flush_text()
        return self.segments

    def parse_one(self) -> None:
        pair = self.text[self.pos:self.pos + 2]
        if pair in ("[[", "]]", "{{", "}}"):
            self.pending.append(pair[0])
            self.pos += 2
            return
        char = self.text[self.pos]
        if char in "]}":
            self.fail(f"a single {char!r} in query text; write {char * 2!r} for a literal {char!r}")
        if char == "[":
            return self.add(self.parse_hole())
        if char == "{":
            return self.add(self.parse_interpolation())
        self.pending.append(char)
        self.pos += 1

    def add(self, segment: Segment) -> None:
        if isinstance(segment, Text):  # a role marker joins the text around it
            self.pending.append(segment.text)
            return
        self.flush_text()
        self.segments.append(segment)

    def flush_text(self) -> None:
        if self.pending:
            self.segments.append(Text("".join(self.pending)))
            self.pending = []

    def parse_hole(self) -> Hole:
        end = find_closing(self.text, self.pos + 1, "]")
        if end < 0:
            self.fail("expected ']' to close the hole '['; write '[[' for a literal '['")
        inside = self.text[self.pos + 1:end]
        decorators, rest = self.split_decorators(inside)
        name, colon, type_source = (part.strip() for part in partition_top_level(rest, ":"))
        if not name.isidentifier():
            self.fail(f"expected a variable name in [{inside}]; write '[[' for a literal '['")
        hole = self.make_hole(name, type_source, inside) if colon else Hole(name)
        self.pos = end + 1
        return dataclasses.replace(hole, decorators=decorators)

    def split_decorators(self, inside: str) -> tuple[tuple[PythonCode, ...], str]:
        """``@a @b(1) X`` -> ((a, b(1)), "X")."""
        decorators = []
        while DECORATOR_START.match(inside):
            body = inside[DECORATOR_START.match(inside).end():]
            cut = decorator_end(body)
            if cut <= 0:
                self.fail(f"expected a decorator like @name or @name(args) in [{inside}]")
            decorators.append(self.python(body[:cut], "decorator"))
            inside = body[cut:]
        return tuple(decorators), inside

    def make_hole(self, name: str, type_source: str, inside: str) -> Hole:
        if not type_source:
            self.fail(f"expected a type after ':' in [{inside}], e.g. [{name}: int]")
        if type_source == "int":
            return Hole(name, "int")
        if type_source == "str":
            return Hole(name)
        try:
            node = ast.parse(type_source, "<query hole>", "eval").body
        except SyntaxError as exc:
            self.fail(f"the type in [{inside}] is not a Python expression: {exc.msg}")
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return Hole(name, "regex", pattern=node.value)
        if isinstance(node, ast.Constant):
            self.fail(f"unknown type {type_source!r} in [{inside}]; use int, a regex string or a query function")
        if isinstance(node, ast.Name) and isinstance(getattr(builtins, node.id, None), type):
            self.fail(f"unknown type {type_source!r} in [{inside}]; use int, a regex string or a query function")
        if isinstance(node, (ast.Name, ast.Attribute)):
            return Hole(name, "query", type_code=self.python(type_source, "type"))
        if isinstance(node, ast.Call):
            call = ast.Call(ast.Name(ARGUMENTS_FUNCTION, ast.Load()), node.args, node.keywords)
            return Hole(name, "query", type_code=self.python(ast.unparse(node.func), "type"),
                        type_arguments=self.python(ast.unparse(call), "type"))
        self.fail(f"unknown type {type_source!r} in [{inside}]; use int, a regex string or a query function")

    def python(self, source: str, what: str) -> PythonCode:
        try:
            return PythonCode(source.strip(), compile_async_expression(source.strip()))
        except SyntaxError as exc:
            self.fail(f"the {what} {source.strip()!r} is not a Python expression: {exc.msg}")

    def parse_interpolation(self) -> Interpolation:
        end = find_closing_brace(self.text, self.pos + 1)
        if end < 0:
            self.fail("expected '}' to close the interpolation '{'; write '{{' for a literal '{'")
        body = self.text[self.pos + 1:end]
        self.pos = end + 1
        role = ROLE_TAG.fullmatch(body.strip())
        if role:
            return Text(role_marker(role.group(1)))
        return self.make_interpolation(body)

    def make_interpolation(self, body: str) -> Interpolation:
        source, conversion, format_spec = split_format(body)
        if not source.strip():
            self.fail("empty interpolation '{}'; write '{{}}' for literal braces")
        if conversion not in (None, "r", "s", "a"):
            self.fail(f"unknown conversion '!{conversion}' in {{{body}}}; use !r, !s or !a")
        try:
            code = compile_async_expression(source.strip())
        except SyntaxError as exc:
            self.fail(f"the interpolation {{{body}}} is not a Python expression: {exc.msg}")
        return Interpolation(source.strip(), code, conversion, format_spec)

    def fail(self, message: str):
        raise QuerySyntaxError(f"{message} (at character {self.pos + 1} of the string)", self.line, self.column)


def code_chars(text: str, start: int = 0):
    """(index, char, bracket depth before it) of each char of Python code outside string literals."""
    depth, quote = 0, None
    for i in range(start, len(text)):
        char = text[i]
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        else:
            yield i, char, depth
            depth += (char in OPENERS) - (char in CLOSERS)


def find_closing(text: str, start: int, closer: str) -> int:
    """Index of the `closer` ending a hole or interpolation whose body starts at `start`, or -1."""
    for i, char, depth in code_chars(text, start):
        if char in CLOSERS and depth == 0:
            return i if char == closer else -1
    return -1


def find_closing_brace(text: str, start: int) -> int:
    return find_closing(text, start, "}")


def partition_top_level(text: str, separator: str) -> tuple[str, str, str]:
    """``str.partition`` at the first `separator` outside brackets and strings."""
    for i, char, depth in code_chars(text):
        if depth == 0 and char == separator:
            return text[:i], separator, text[i + 1:]
    return text, "", ""


def decorator_end(body: str) -> int:
    """Length of the decorator expression at the start of `body` (``name.attr(args)``)."""
    match = re.match(r"\s*[A-Za-z_][A-Za-z0-9_]*(\s*\.\s*[A-Za-z_][A-Za-z0-9_]*)*", body)
    if not match:
        return -1
    end = match.end()
    if body[end:end + 1] == "(":
        close = find_closing(body, end + 1, ")")
        return close + 1 if close >= 0 else -1
    return end


def split_format(body: str) -> tuple[str, str | None, str]:
    """Split ``expr!conv:spec`` at its top level into (expr, conv, spec)."""
    for i, char, depth in code_chars(body):
        if depth == 0 and char == "!" and body[i + 1:i + 2] != "=":
            conversion, _, spec = body[i + 1:].partition(":")
            return body[:i], conversion.strip(), spec
        if depth == 0 and char == ":":
            return body[:i], None, body[i + 1:]
    return body, None, ""


async def render_interpolation(part: Interpolation, scope: dict) -> str:
    """The text of an interpolation evaluated in `scope` (awaiting an async call's result)."""
    value = eval(part.code, scope)  # noqa: S307 - query code is the user's own Python
    if inspect.iscoroutine(value):
        value = await value
    if part.conversion == "r":
        value = repr(value)
    elif part.conversion == "a":
        value = ascii(value)
    elif part.conversion == "s":
        value = str(value)
    return format(value, part.format_spec)


def is_query_string(node: ast.AST) -> bool:
    """Whether a statement's value is a plain string, i.e. a prompt statement."""
    return isinstance(node, ast.Constant) and isinstance(node.value, str)
