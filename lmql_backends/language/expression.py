"""A Python expression of a query (a clause, a prompt statement's where), compiled once."""

from __future__ import annotations

import ast
import dataclasses
from types import CodeType
from typing import Any

from ..errors import QuerySyntaxError


@dataclasses.dataclass(frozen=True)
class Expression:
    """A Python expression of a query clause, compiled once and evaluated per run."""

    source: str
    node: ast.expr = dataclasses.field(repr=False, compare=False)
    code: CodeType = dataclasses.field(repr=False, compare=False)
    line: int = 1
    column: int = 1

    def evaluate(self, scope: dict[str, Any]) -> Any:
        return eval(self.code, scope)  # noqa: S307 - the user's own query code


@dataclasses.dataclass(frozen=True)
class DistributionClause:
    """``distribution VAR in [options]``."""

    variable: str
    values: Expression


def parse_expression(body: str, start: tuple[int, int], keyword: str) -> Expression:
    """Parse a clause body as one Python expression (it may span several lines)."""
    if not body.strip():
        raise QuerySyntaxError(f"expected an expression after {keyword!r}", *position(start))
    try:
        node = ast.parse("(" + body + "\n)", "<query>", "eval").body
    except SyntaxError as exc:
        line, column = syntax_error_position(exc, body, start)
        raise QuerySyntaxError(f"the {keyword!r} clause is not valid: {exc.msg}", line, max(column, 1)) from None
    if keyword == "where":
        node = without_await(node)
    return make_expression(node, start, body.strip())


class _AwaitRemover(ast.NodeTransformer):
    def visit_Await(self, node: ast.Await) -> ast.AST:
        return self.visit(node.value)


def without_await(node: ast.expr) -> ast.expr:
    """``await f(x)`` in a where clause is ``f(x)``: its calls are awaited anyway (`calls.await_where_calls`)."""
    return _AwaitRemover().visit(node)


def syntax_error_position(exc: SyntaxError, body: str, start: tuple[int, int]) -> tuple[int, int]:
    """Where a syntax error in a clause body is, in query coordinates (1-based)."""
    lines = body.splitlines() or [""]
    row, offset = exc.lineno or 1, exc.offset or 1
    if row > len(lines):  # past the body: the expression ended too early
        row, offset = len(lines), len(lines[-1]) + 2
    column = start[1] + offset - 1 if row == 1 else offset
    return start[0] + row - 1, max(column, 1)


def make_expression(node: ast.expr, start: tuple[int, int], source: str | None = None) -> Expression:
    code = compile(ast.fix_missing_locations(ast.Expression(node)), "<query>", "eval")
    return Expression(source if source is not None else ast.unparse(node), node, code, start[0], start[1] + 1)


def position(pos: tuple[int, int]) -> tuple[int, int]:
    """A tokenize (row, 0-based col) as (line, 1-based column)."""
    return pos[0], pos[1] + 1
