"""Function calls inside query code, as LMQL runs them: awaited when they return an awaitable.

LMQL rewrites every call ``f(x)`` of a query program (and of its ``{...}`` interpolations) into
``await lmql.runtime_support.call(f, x)``, and drops an ``await`` the user wrote around it: an
async tool or a nested query function is awaited whether or not ``await`` is written. The same
rewrite is done here with `CallTransformer`; `call` is the function the rewritten code calls.

Not rewritten: calls inside nested ``def``/``lambda``/``class`` bodies and generator
expressions (they are not the query's own async code), and ``locals()``, ``globals()``,
``vars()``, ``eval``, ``exec``, ``super`` (they must run in the caller's frame).
"""

from __future__ import annotations

import ast
import inspect
from typing import Any

CALL_FUNCTION = "__lmql_call__"
FRAME_FUNCTIONS = frozenset({"locals", "globals", "vars", "eval", "exec", "super", "dir", "print"})


async def call(function: Any, *args: Any, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)``, awaited when it returns an awaitable (LMQL's call rule)."""
    result = function(*args, **kwargs)
    while inspect.isawaitable(result):
        result = await result
    return result


class CallTransformer(ast.NodeTransformer):
    """``f(x)`` -> ``await __lmql_call__(f, x)``; ``await f(x)`` -> the same."""

    def __init__(self, excluded: frozenset[str] = frozenset()):
        self.excluded = FRAME_FUNCTIONS | excluded

    def visit_Await(self, node: ast.Await) -> ast.AST:
        value = self.visit(node.value)
        return value if isinstance(value, ast.Await) else ast.copy_location(ast.Await(value), node)

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id in self.excluded:
            return node
        wrapped = ast.Call(ast.Name(CALL_FUNCTION, ast.Load()), [node.func, *node.args], node.keywords)
        return ast.copy_location(ast.Await(ast.copy_location(wrapped, node)), node)

    def skip(self, node: ast.AST) -> ast.AST:
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = visit_ClassDef = visit_GeneratorExp = skip


def compile_async_expression(source: str):
    """Compile an expression of query code; evaluating it gives a coroutine when it awaits."""
    node = ast.parse("(" + source + "\n)", "<query expression>", "eval")
    node = ast.fix_missing_locations(CallTransformer().visit(node))
    return compile(node, "<query expression>", "eval", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
