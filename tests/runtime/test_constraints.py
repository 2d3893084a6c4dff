"""The where clause as masks: each constraint's step rules, on a hand-made token table."""

import pytest

from lmql_backends.errors import ConstraintError, InvalidRequestError, QuerySyntaxError
from lmql_backends.language import parse_query
from lmql_backends.runtime.constraints import Progress, VariableRecord, compile_constraints
from lmql_backends.runtime.tokens import TokenTable

VOCAB = [b"<eos>", b"a", b"b", b"ab", b" ", b"1", b"12", b" 3", b"\n", b"x\ny", b"\xc3", b"\xa9", b"caf", b"."]
EOS = 0
ID = {data: i for i, data in enumerate(VOCAB)}


@pytest.fixture(scope="module")
def table():
    return TokenTable(tuple(VOCAB), eos_token_id=EOS, special_ids=frozenset({EOS}))


def constraints_for(query, variable, table, records=None, scope=None):
    parsed = parse_query(query)
    compiled = compile_constraints(parsed.where, parsed.prompt.hole_names, parsed.prompt.int_variables)
    return compiled.bind(variable, records or {}, scope or {}, table)


def walk(constraints, *tokens):
    progress = Progress()
    for token in tokens:
        progress = constraints.advance(progress, ID[token] if isinstance(token, bytes) else token)
    return progress


def allowed(constraints, progress):
    """The tokens of the next step's mask (all of VOCAB when the mask is None)."""
    step = constraints.step(progress)
    assert not step.is_forced_end
    return sorted(VOCAB) if step.mask is None else sorted(VOCAB[i] for i in range(len(VOCAB)) if step.mask[i])


def test_unconstrained_allows_everything_but_specials_and_eos_is_the_end(table):
    c = constraints_for('"[X]"', "X", table)
    # a lone continuation byte cannot start a value (the UTF-8 rule, masks.apply_utf8_rule)
    assert allowed(c, Progress()) == sorted(set(VOCAB) - {b"\xa9"})
    assert walk(c, b"a", EOS).finish_reason == "eos" and walk(c, b"a", EOS).text == "a"


def test_an_unfinished_character_must_be_finished_before_the_end(table):
    c = constraints_for('"[X]" where len(X) < 3', "X", table)
    assert allowed(c, walk(c, b"\xc3")) == [b"\xa9"]  # no EOS, nothing but the continuation
    assert walk(c, b"\xc3", b"\xa9").text == "é"
    last = constraints_for('"[X]" where len(TOKENS(X)) < 2', "X", table)
    assert b"\xc3" not in allowed(last, Progress())  # no token would be left to finish it


def test_stops_at_keeps_the_phrase_and_cuts_the_rest_of_the_token(table):
    c = constraints_for('"[X]" where STOPS_AT(X, "\\n")', "X", table)
    progress = walk(c, b"a", b"x\ny")
    assert progress.finish_reason == "stop" and progress.text == "ax\n"


def test_stops_before_drops_the_phrase(table):
    c = constraints_for('"[X]" where STOPS_BEFORE(X, "\\n")', "X", table)
    assert walk(c, b"a", b"x\ny").text == "ax"


def test_stop_phrase_across_tokens_and_earliest_of_several(table):
    c = constraints_for('"[X]" where STOPS_AT(X, "ab") and STOPS_BEFORE(X, "b")', "X", table)
    progress = walk(c, b"a", b"b")  # both complete with this token: the earlier occurrence wins
    assert progress.finish_reason == "stop" and progress.text == "ab"
    c = constraints_for('"[X]" where STOPS_AT(X, "\\n") and STOPS_AT(X, ".")', "X", table)
    assert walk(c, b"a", b".", b"x\ny").text == "a."


def test_token_count_less_than(table):
    c = constraints_for('"[X]" where len(TOKENS(X)) < 3', "X", table)
    # one token left: none that leaves a character unfinished, no lone continuation byte
    assert allowed(c, walk(c, b"a")) == sorted(set(VOCAB) - {b"\xc3", b"\xa9"})
    assert c.step(walk(c, b"a", b"b")).is_forced_end  # 2 tokens: only the end is left


def test_token_count_exactly(table):
    c = constraints_for('"[X]" where len(TOKENS(X)) == 2', "X", table)
    assert b"<eos>" not in allowed(c, walk(c, b"a"))
    assert c.step(walk(c, b"a", b"b")).is_forced_end


def test_token_count_at_least(table):
    c = constraints_for('"[X]" where len(TOKENS(X)) >= 2', "X", table)
    assert b"<eos>" not in allowed(c, walk(c, b"a"))
    assert b"<eos>" in allowed(c, walk(c, b"a", b"b"))


def test_bound_on_the_left_is_flipped(table):
    c = constraints_for('"[X]" where 3 > len(TOKENS(X))', "X", table)
    assert c.step(walk(c, b"a", b"b")).is_forced_end


def test_character_length(table):
    c = constraints_for('"[X]" where len(X) <= 3', "X", table)
    assert allowed(c, walk(c, b"ab")) == sorted([b"<eos>", b"a", b"b", b" ", b"1", b"\n", b"\xc3", b"."])


def test_options_keep_a_prefix_and_eos_only_on_an_option(table):
    c = constraints_for('"[X]" where X in ["ab", "abab", "b"]', "X", table)
    assert allowed(c, Progress()) == [b"a", b"ab", b"b"]
    assert allowed(c, walk(c, b"a")) == [b"b"]
    assert allowed(c, walk(c, b"ab")) == [b"<eos>", b"a", b"ab"]
    assert c.step(walk(c, b"ab", b"ab")).is_forced_end


def test_equals_forces_the_literal(table):
    c = constraints_for('"[X]" where X == "caf" + "é"', "X", table)
    assert allowed(c, Progress()) == [b"caf"]
    assert allowed(c, walk(c, b"caf")) == [b"\xc3"]
    assert allowed(c, walk(c, b"caf", b"\xc3")) == [b"\xa9"]
    progress = walk(c, b"caf", b"\xc3", b"\xa9")
    assert c.step(progress).is_forced_end and progress.text == "café"


def test_int_allows_a_leading_space_then_digits(table):
    c = constraints_for('"[N: int]"', "N", table)
    assert allowed(c, Progress()) == [b" ", b" 3", b"1", b"12"]
    assert allowed(c, walk(c, b" ")) == [b"1", b"12"]
    assert b"." in allowed(c, walk(c, b" 3"))  # as INT(N): any token may end the number


def test_regex(table):
    c = constraints_for('"[X]" where REGEX(X, r"(ab)+\\.")', "X", table)
    assert allowed(c, Progress()) == [b"a", b"ab"]
    assert allowed(c, walk(c, b"ab")) == [b".", b"a", b"ab"]
    assert c.step(walk(c, b"ab", b".")).is_forced_end


def test_or_is_a_union(table):
    c = constraints_for('"[X]" where X in ["a"] or X in ["b"]', "X", table)
    assert allowed(c, Progress()) == [b"a", b"ab", b"b"][0:1] + [b"b"]


def test_not_in_allows_any_token_but_not_ending_on_the_option(table):
    c = constraints_for('"[X]" where not X in ["a"]', "X", table)
    assert b"<eos>" not in allowed(c, walk(c, b"a"))
    assert b"<eos>" in allowed(c, walk(c, b"b"))


def test_not_of_a_length_bound_is_the_opposite_bound(table):
    c = constraints_for('"[X]" where not len(TOKENS(X)) >= 2', "X", table)
    assert c.step(walk(c, b"a")).is_forced_end


def test_python_condition_is_checked_when_the_variable_would_end(table):
    c = constraints_for('"[X]" where X.endswith("b") and len(TOKENS(X)) < 5', "X", table)
    assert b"<eos>" not in allowed(c, walk(c, b"a"))
    assert b"<eos>" in allowed(c, walk(c, b"a", b"b"))


def test_python_values_come_from_the_scope(table):
    c = constraints_for('"[X]" where X in options and len(TOKENS(X)) < n', "X", table, scope={"options": ["b"], "n": 2})
    assert allowed(c, Progress()) == [b"b"]


def test_constraints_on_other_variables(table):
    query = '"[A][B]" where A in ["a", "b"] and (A == "a" or B in ["12"]) and B != A'
    assert allowed(constraints_for(query, "A", table), Progress()) == [b"a", b"b"]
    after_a = {"A": VariableRecord("a", "a", 1)}
    assert allowed(constraints_for(query, "B", table, after_a), walk(constraints_for(query, "B", table, after_a), b"a")) \
        == sorted(set(VOCAB[1:]) - {b"\xa9"})  # A == "a": B is free, but may not end as "a"
    after_b = {"A": VariableRecord("b", "b", 1)}
    assert allowed(constraints_for(query, "B", table, after_b), Progress()) == [b"1", b"12"]


def test_unsatisfiable_constraints_raise_naming_the_variable(table):
    c = constraints_for('"[X]" where X in ["zzz"]', "X", table)
    with pytest.raises(ConstraintError, match="on X"):
        c.step(Progress())


def test_contradiction_raises(table):
    c = constraints_for('"[X]" where len(TOKENS(X)) > 2 and len(TOKENS(X)) < 2', "X", table)
    with pytest.raises(ConstraintError, match="X"):
        c.step(walk(c, b"a"))


@pytest.mark.parametrize("where, fragment", [
    ('STOPS_AT(Y, "x")', "needs a query variable"),
    ('STOP_AT(X, "x")', "unknown constraint STOP_AT"),
    ("INT(X, 1)", "INT takes 1 argument"),
    ('STOPS_AT(X, "a") or X in ["a"]', "only be combined with 'and'"),
    ('not STOPS_AT(X, "a")', "only be combined with 'and'"),
])
def test_bad_constraints_are_syntax_errors(table, where, fragment):
    with pytest.raises(QuerySyntaxError, match=fragment):
        constraints_for(f'"[X]" where {where}', "X", table)


@pytest.mark.parametrize("where, fragment", [
    ('X in "abc"', "must be a list of strings"),
    ('STOPS_AT(X, "")', "non-empty string"),
    ("len(TOKENS(X)) < 1.5", "must be an int"),
    ("X in undefined_name", "NameError"),
])
def test_bad_values_name_the_problem(table, where, fragment):
    with pytest.raises(InvalidRequestError, match=fragment):
        constraints_for(f'"[X]" where {where}', "X", table)


def test_int_ends_as_lmql_does(table):
    """LMQL 0.7.3 IntOp.follow: number token first, then any token; a non-digit ends it."""
    c = constraints_for('"[X]" where INT(X)', "X", table)
    assert allowed(c, Progress()) == [b" ", b" 3", b"1", b"12"]
    assert allowed(c, walk(c, b" ")) == [b"1", b"12"]
    assert allowed(c, walk(c, b"12")) == sorted(set(VOCAB) - {b"\xc3", b"\xa9"})  # the end competes with all
    assert c.step(walk(c, b"12", b".")).is_forced_end  # a non-digit ended the number
