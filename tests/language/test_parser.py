"""Parsing queries: clause splitting, both syntaxes, the prompt program, and syntax errors."""

import asyncio

import pytest

from lmql_backends.errors import InvalidRequestError, QuerySyntaxError
from lmql_backends.language import FilledHole, StopProgram, parse_query

HEADLINE = 'argmax "Hello[WHO]" from "gpt2" where STOPS_AT(WHO, "\\n") and len(TOKENS(WHO)) < 10'

MULTILINE = '''
    sample(n=2, temperature=0.8, seed=1)
        "Q: {question}\\n"
        for i in range(2):
            "- [THING]\\n"
            last = THING
        "A: [ANSWER: int]"
    from
        lmql.model("builtin:tiny", endpoint="127.0.0.1:1")
    where
        STOPS_AT(THING, "\\n") and len(TOKENS(ANSWER)) < 4
    distribution
        LABEL in ["yes", "no"]
'''


def run_program(query, inputs, values):
    """Execute the prompt clause with holes filled from `values` (a list, in order)."""
    seen = []

    async def fill(hole):
        seen.append((hole.variable, hole.prompt))
        value = values[len(seen) - 1]
        return FilledHole(str(value), value)

    trace = asyncio.run(parse_query(query).prompt.execute(inputs, fill))
    return trace, seen


def test_one_line_standard_form():
    query = parse_query(HEADLINE)
    assert query.decoder.name == "argmax" and query.decoder.arguments == ()
    assert query.model.evaluate({}) == "gpt2"
    assert query.where.source == 'STOPS_AT(WHO, "\\n") and len(TOKENS(WHO)) < 10'
    assert query.prompt.hole_names == ("WHO",)
    assert query.distribution is None


def test_multi_line_standard_form():
    query = parse_query(MULTILINE)
    assert query.decoder.name == "sample"
    assert {name: e.evaluate({}) for name, e in query.decoder.arguments} == {"n": 2, "temperature": 0.8, "seed": 1}
    spec = query.model.evaluate(dict(query.globals))
    assert (spec.name, spec.endpoint) == ("builtin:tiny", "127.0.0.1:1")
    assert query.where.source == 'STOPS_AT(THING, "\\n") and len(TOKENS(ANSWER)) < 4'
    assert query.distribution.variable == "LABEL"
    assert query.distribution.values.evaluate({}) == ["yes", "no"]
    assert query.prompt.hole_names == ("THING", "ANSWER")
    assert query.prompt.int_variables == {"ANSWER"}


def test_modern_form_has_no_decoder_or_model():
    query = parse_query('"Hello[WHO]" where len(TOKENS(WHO)) < 10')
    assert query.decoder is None and query.model is None
    assert query.where.source == "len(TOKENS(WHO)) < 10"


def test_modern_form_over_several_lines():
    query = parse_query('"Q: {q}\\n"\n"A:[A]"\nwhere STOPS_AT(A, ".")\nfrom "local:builtin:tiny"')
    assert query.model.evaluate({}) == "local:builtin:tiny"
    trace, seen = run_program(query.source, {"q": "why"}, [" yes."])
    assert seen == [("A", "Q: why\nA:")]
    assert trace.prompt == "Q: why\nA: yes."


def test_program_runs_statements_with_hole_values_as_locals():
    trace, seen = run_program(MULTILINE, {"question": "what?"}, [" a", " b", 7])
    assert [v for v, _ in seen] == ["THING", "THING", "ANSWER"]
    assert seen[1][1] == "Q: what?\n-  a\n- "
    assert trace.prompt == "Q: what?\n-  a\n-  b\nA: 7"
    assert trace.variables == {"THING": " b", "ANSWER": 7}


def test_interpolation_sees_earlier_holes_of_the_same_string_and_inputs():
    trace, _ = run_program('"[A] and {A.upper()} {x * 2}"', {"x": 21}, ["hi"])
    assert trace.prompt == "hi and HI 42"


def test_python_if_and_function_calls():
    query = 'argmax\n    items = sorted(xs)\n    if items[0] > 1:\n        "big [X]"\n    else:\n        "small {len(items)} [X]"\n'
    trace, _ = run_program(query, {"xs": [3, 1, 2]}, ["!"])
    assert trace.prompt == "small 3 !"


def test_lmql_in_a_query_is_this_package():
    import lmql_backends

    query = parse_query('"x[X]" from lmql.inprocess("builtin:tiny")')
    assert query.globals["lmql"] is lmql_backends
    assert query.model.evaluate(dict(query.globals)).name == "local:builtin:tiny"


def test_python_from_import_inside_prompt_is_not_a_clause():
    query = parse_query('argmax\n    from math import sqrt\n    "r={sqrt(4)}[X]"\nfrom "m"')
    assert query.model.evaluate({}) == "m"
    trace, _ = run_program(query.source, {}, ["."])
    assert trace.prompt == "r=2.0."


def test_stop_program_truncates_the_trace():
    async def fill(hole):
        raise StopProgram(FilledHole("partial", "partial"))

    trace = asyncio.run(parse_query('"a[X] b[Y]"').prompt.execute({}, fill))
    assert trace.is_truncated and trace.prompt == "apartial" and trace.variables == {"X": "partial"}


def test_inputs_may_not_shadow_variables():
    with pytest.raises(InvalidRequestError, match="'X'"):
        run_program('"[X]"', {"X": 1}, ["a"])


@pytest.mark.parametrize("query, fragment, line, column", [
    ('argmax "Hello[WHO" from "x"', "expected ']'", 1, 8),
    ('foo "Hello"', "unknown decoder 'foo'", 1, 1),
    ('"a" where', "expected an expression after 'where'", 1, 10),
    ('"a" where x ==', "'where' clause is not valid", 1, 15),
    ('argmax "a" from "m" from "n"', "duplicate 'from' clause", 1, 21),
    ('argmax(2) "a"', "by keyword", 1, 1),
    ('"a\nb"', "unterminated string", 1, 1),
    ('argmax\n    "a"\n    x = (\n', "unexpected end of query", 4, 1),
    ('argmax\n    "a"\n    x = = 1\n', "prompt clause is not valid", 3, 9),
    ('"x[X]" distribution X in [1] where True', "before the 'distribution' clause", 1, 30),
    ('"x" distribution X', "expected 'distribution VAR in [options]'", 1, 5),
    ('where X', "expected a prompt", 1, 1),
    ('argmax from "m"', "expected a prompt", 1, 8),
    ('argmax\n    f"{x}[X]"', "drop the 'f' prefix", 2, 5),
])
def test_syntax_errors_have_line_and_column(query, fragment, line, column):
    with pytest.raises(QuerySyntaxError) as info:
        parse_query(query)
    assert fragment in str(info.value)
    assert (info.value.line, info.value.column) == (line, column)


def test_distribution_clause_needs_var_in_options():
    with pytest.raises(QuerySyntaxError, match="distribution VAR in"):
        parse_query('"x[X]" distribution X == 1')


def test_indented_where_after_one_line_from_is_a_clause():
    query = parse_query('argmax "Hello[WHO]" from "local:builtin:tiny"\n    where len(TOKENS(WHO)) < 3')
    assert query.where.source == "len(TOKENS(WHO)) < 3"
    assert query.model.source == '"local:builtin:tiny"'


PROLOGUE = '''
import re
argmax_count = 2
def argmax_of(items):
    return max(items)
class Holder:
    sample = 1
Holder.sample
sample(n=2, seed=3)
    "{argmax_of([1, argmax_count])} [X]"
from
    "local:builtin:tiny"
where
    len(TOKENS(X)) < 3
'''


def test_prologue_before_the_decoder_clause_is_python_run_first():
    """LMQL's prologue: the first decoder name starting a top-level line starts the decoder
    clause (not ``argmax_count = 2``, ``Holder.sample`` or a name inside a def or class)."""
    query = parse_query(PROLOGUE)
    assert query.decoder.name == "sample" and [n for n, _ in query.decoder.arguments] == ["n", "seed"]
    assert query.model.source == '"local:builtin:tiny"' and query.where.source == "len(TOKENS(X)) < 3"
    trace, seen = run_program(PROLOGUE, {}, ["x"])
    assert trace.prompt == "2 x" and seen == [("X", "2 ")]


def test_prologue_strings_are_python_not_prompt_statements():
    trace, _ = run_program('"""a docstring"""\nargmax\n    "Hi[X]"', {}, ["!"])
    assert trace.prompt == "Hi!"


def test_prologue_syntax_errors_name_the_prologue():
    with pytest.raises(QuerySyntaxError, match=r"the prologue clause is not valid.*line 1"):
        parse_query('def f(x) x\nargmax "x[X]"')
