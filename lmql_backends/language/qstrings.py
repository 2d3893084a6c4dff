"""Query strings: the text of a prompt statement split into text, holes and interpolations.

Inside a query string:

- ``[VAR]`` is a hole the model fills; ``[VAR: int]`` is a hole constrained by ``INT(VAR)``;
- ``{expr}`` interpolates a Python value (``{expr!r}`` and ``{expr:spec}`` work as in f-strings);
- ``[[``, ``]]``, ``{{`` and ``}}`` stand for literal brackets and braces.
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Union

from ..errors import QuerySyntaxError

HOLE_TYPES = ("int",)
OPENERS, CLOSERS = "([{", ")]}"


@dataclasses.dataclass(frozen=True)
class Text:
    """Literal text."""

    text: str


@dataclasses.dataclass(frozen=True)
class Hole:
    """``[name]`` or ``[name: type]``: a variable the model fills."""

    name: str
    type_name: str | None = None


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
        self.flush_text()
        self.segments.append(segment)

    def flush_text(self) -> None:
        if self.pending:
            self.segments.append(Text("".join(self.pending)))
            self.pending = []

    def parse_hole(self) -> Hole:
        end = self.text.find("]", self.pos)
        if end < 0:
            self.fail("expected ']' to close the hole '['; write '[[' for a literal '['")
        inside = self.text[self.pos + 1:end]
        name, _, type_name = (part.strip() for part in inside.partition(":"))
        if not name.isidentifier():
            self.fail(f"expected a variable name in [{inside}]; write '[[' for a literal '['")
        if ":" in inside and type_name not in HOLE_TYPES:
            self.fail(f"unknown type {type_name!r} in [{inside}]; the only hole type is 'int'")
        self.pos = end + 1
        return Hole(name, type_name or None)

    def parse_interpolation(self) -> Interpolation:
        end = find_closing_brace(self.text, self.pos + 1)
        if end < 0:
            self.fail("expected '}' to close the interpolation '{'; write '{{' for a literal '{'")
        body = self.text[self.pos + 1:end]
        self.pos = end + 1
        return self.make_interpolation(body)

    def make_interpolation(self, body: str) -> Interpolation:
        source, conversion, format_spec = split_format(body)
        if not source.strip():
            self.fail("empty interpolation '{}'; write '{{}}' for literal braces")
        if conversion not in (None, "r", "s", "a"):
            self.fail(f"unknown conversion '!{conversion}' in {{{body}}}; use !r, !s or !a")
        try:
            code = compile("(" + source.strip() + "\n)", "<query interpolation>", "eval")
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


def find_closing_brace(text: str, start: int) -> int:
    """Index of the '}' closing an interpolation whose body starts at `start`, or -1."""
    for i, char, depth in code_chars(text, start):
        if char in CLOSERS and depth == 0:
            return i if char == "}" else -1
    return -1


def split_format(body: str) -> tuple[str, str | None, str]:
    """Split ``expr!conv:spec`` at its top level into (expr, conv, spec)."""
    for i, char, depth in code_chars(body):
        if depth == 0 and char == "!" and body[i + 1:i + 2] != "=":
            conversion, _, spec = body[i + 1:].partition(":")
            return body[:i], conversion.strip(), spec
        if depth == 0 and char == ":":
            return body[:i], None, body[i + 1:]
    return body, None, ""


def render_interpolation(part: Interpolation, scope: dict) -> str:
    """The text of an interpolation evaluated in `scope`."""
    value = eval(part.code, scope)  # noqa: S307 - query code is the user's own Python
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
