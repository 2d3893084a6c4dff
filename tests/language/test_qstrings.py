"""Query strings: holes, interpolations, escapes and their errors."""

import asyncio

import pytest

from lmql_backends.errors import QuerySyntaxError
from lmql_backends.language.qstrings import Hole, Interpolation, Text, parse_template, render_interpolation


def kinds(template):
    return [type(s).__name__ for s in template.segments]


def test_text_and_hole():
    template = parse_template("Hello [WHO]!")
    assert template.segments == (Text("Hello "), Hole("WHO"), Text("!"))
    assert template.holes == (Hole("WHO"),)


def test_typed_hole_is_int():
    template = parse_template("n=[N: int] and [M :int]")
    assert template.holes == (Hole("N", "int"), Hole("M", "int"))


@pytest.mark.parametrize("text, expected", [
    ("a [[b]] c", "a [b] c"),
    ("{{x}}", "{x}"),
    ("[[[[", "[["),
    ("]]}}", "]}"),
])
def test_escapes_become_literal_text(text, expected):
    template = parse_template(text)
    assert template.segments == (Text(expected),)


def test_interpolation_with_conversion_and_format():
    template = parse_template("{x!r:>6}|{y + 1}|{d['k']}|{f'{y}'}")
    parts = [s for s in template.segments if isinstance(s, Interpolation)]
    assert [p.source for p in parts] == ["x", "y + 1", "d['k']", "f'{y}'"]
    scope = {"x": "a", "y": 2, "d": {"k": "v"}}
    assert [asyncio.run(render_interpolation(p, scope)) for p in parts] == ["   'a'", "3", "v", "2"]


def test_interpolation_with_nested_braces_and_comparison():
    template = parse_template("{ {'a': 1}['a'] }{x != 1}")
    scope = {"x": 2}
    assert [asyncio.run(render_interpolation(p, scope)) for p in template.segments] == ["1", "True"]


@pytest.mark.parametrize("text, fragment", [
    ("Hello [WHO", "expected ']'"),
    ("[1 + 2]", "expected a variable name"),
    ("[X: float]", "unknown type 'float'"),
    ("a ] b", "write ']]'"),
    ("a } b", "write '}}'"),
    ("{x", "expected '}'"),
    ("{}", "empty interpolation"),
    ("{1 +}", "not a Python expression"),
    ("{x!z}", "unknown conversion"),
])
def test_errors_name_the_problem(text, fragment):
    with pytest.raises(QuerySyntaxError, match=fragment.replace("[", r"\[").replace("+", r"\+")) as info:
        parse_template(text, line=3, column=5)
    assert (info.value.line, info.value.column) == (3, 5)
