"""The constraints of one prompt statement: the query's ``where``, the statement's, its hole types.

LMQL applies a prompt statement's own ``where`` only while that statement's holes are generated
(``"-[THING]" where STOPS_AT(THING, "\\n")`` in a loop, ``"Another [NAME]"`` unconstrained after
``"Hello [NAME]" where ...``); the query's ``where`` clause applies to every hole. Typed holes
add ``INT(X)`` (``[X: int]``) or ``REGEX(X, pattern)`` (``[X: r"..."]``) for that statement.
Compiled once per statement and cached on it. Python calls in either ``where`` read the values
the program awaited before the hole started (`language.calls.await_where_calls`).
"""

from __future__ import annotations

from ..language.calls import rewrite_where_calls
from ..language.expression import Expression, make_expression, parse_expression
from ..language.program import PromptProgram, PromptStatement
from .constraints import AllOf, ConstraintSet, compile_constraints

CACHE_KEY = "constraints"


def statement_constraints(program: PromptProgram, statement: PromptStatement) -> ConstraintSet:
    """The compiled constraints for the holes of `statement` of `program`."""
    compiled = statement.compiled.get(CACHE_KEY)
    if compiled is None:
        compiled = statement.compiled[CACHE_KEY] = compile_statement(program, statement)
    return compiled


def compile_statement(program: PromptProgram, statement: PromptStatement) -> ConstraintSet:
    names = program.hole_names
    holes = statement.template.holes
    ints = frozenset(h.name for h in holes if h.type_name == "int")
    parts = [compile_constraints(with_where_calls(program.where), names),
             compile_constraints(with_where_calls(statement.where), names, ints)]
    for hole in holes:
        if hole.type_name == "regex":
            source = f"REGEX({hole.name}, {hole.pattern!r})"
            start = (statement.template.line, statement.template.column - 1)
            parts.append(compile_constraints(parse_expression(source, start, "type"), names))
    return merge(parts)


def with_where_calls(where: Expression | None) -> Expression | None:
    """`where` with its Python calls going through the hole's awaited values (`language.calls`)."""
    if where is None:
        return None
    node = rewrite_where_calls(where.node)
    return make_expression(node, (where.line, where.column - 1), where.source)


def merge(parts: list[ConstraintSet]) -> ConstraintSet:
    """All of `parts` at once."""
    return ConstraintSet(
        AllOf(tuple(p.tree for p in parts)),
        tuple(stop for p in parts for stop in p.stops),
        frozenset().union(*(p.int_variables for p in parts)),
    )
