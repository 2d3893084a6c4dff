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
import copy
import dataclasses
import inspect
from typing import Any

from ..errors import InvalidRequestError

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


# ---- calls in ``where`` clauses ----------------------------------------------------------------------
#
# LMQL evaluates a where clause's Python calls synchronously (its CallOp calls ``f(*args)``), so an
# async function there gives an un-awaited coroutine. Here a call whose query variables are all
# finished when a hole starts (``X in await_options()``, ``len(TOKENS(X)) < limit(Y)``) is awaited
# once, before the hole is generated, and the constraints see its value: `rewrite_where_calls`
# turns each call into ``__lmql_where_call__(KEY, f, *args)`` and `await_where_calls` computes the
# values by KEY. A call on the variable being generated (``is_valid(X)``) runs while it is
# generated and cannot wait: an async function there is an error that says so.

WHERE_CALL_FUNCTION = "__lmql_where_call__"
NOT_REWRITTEN = frozenset({"len"})
SCOPED_NODES = (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def is_rewritten_call(node: ast.AST) -> bool:
    """A Python call of a where clause (not ``len``, not a constraint like ``STOPS_AT`` or ``TOKENS``)."""
    if not isinstance(node, ast.Call):
        return False
    return not (isinstance(node.func, ast.Name) and (node.func.id.isupper() or node.func.id in NOT_REWRITTEN))


class _WhereCallRewriter(ast.NodeTransformer):
    def visit_Call(self, node: ast.Call) -> ast.AST:
        key = ast.unparse(node)
        self.generic_visit(node)
        if not is_rewritten_call(node):
            return node
        call = ast.Call(ast.Name(WHERE_CALL_FUNCTION, ast.Load()), [ast.Constant(key), node.func, *node.args],
                        node.keywords)
        return ast.copy_location(call, node)

    def skip(self, node: ast.AST) -> ast.AST:
        return node  # names bound inside (c in [f(c) for c in L]) exist only there

    visit_Lambda = visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = skip


def rewrite_where_calls(node: ast.expr) -> ast.expr:
    """`node` with its calls going through ``__lmql_where_call__`` (a copy; `node` is unchanged)."""
    return _WhereCallRewriter().visit(copy.deepcopy(node))


def split_calls(node: ast.expr, known: frozenset[str], variables: frozenset[str]) -> tuple[list, list]:
    """The outermost rewritten calls of `node` mentioning no query variable outside `known`, and
    the calls that do (they run while a variable is generated)."""
    ready: list[ast.Call] = []
    waiting: list[ast.Call] = []

    def visit(current: ast.AST) -> None:
        if isinstance(current, SCOPED_NODES):
            return
        if is_rewritten_call(current):
            names = {n.id for n in ast.walk(current) if isinstance(n, ast.Name)}
            if not (names & variables) - known:
                ready.append(current)
                return
            waiting.append(current)
        for child in ast.iter_child_nodes(current):
            visit(child)

    visit(node)
    return ready, waiting


def check_not_async(call_node: ast.Call, scope: dict[str, Any]) -> None:
    """An async function called on the variable being generated: say it cannot wait (see `WhereCalls`)."""
    if not isinstance(call_node.func, (ast.Name, ast.Attribute)):
        return
    try:
        function = eval(compile(ast.Expression(call_node.func), "<where>", "eval"), dict(scope))  # noqa: S307
    except Exception:  # noqa: BLE001 - not resolvable here: the constraint reports it when it runs
        return
    if inspect.iscoroutinefunction(function) or getattr(function, "is_async", False) is True:
        raise async_check_error(ast.unparse(call_node))


def async_check_error(key: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"{key} in the where clause is async and depends on the variable being generated; a condition "
        "checked while a variable is generated cannot wait (LMQL does not await it either): make it a "
        "plain function, or compute the value in the program before the prompt statement", key,
    )


@dataclasses.dataclass(frozen=True)
class _Failed:
    error: BaseException


class WhereCalls:
    """``__lmql_where_call__`` of one hole: the awaited values by KEY, else a plain call."""

    def __init__(self, values: dict[str, Any]):
        self.values = values

    def __call__(self, key: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        if key in self.values:
            value = self.values[key]
            if isinstance(value, _Failed):
                raise value.error
            return value
        result = function(*args, **kwargs)
        if inspect.isawaitable(result):
            close = getattr(result, "close", None)
            if close is not None:
                close()
            raise async_check_error(key)
        return result


async def await_where_calls(nodes: list[ast.expr], scope: dict[str, Any], known: frozenset[str],
                            variables: frozenset[str]) -> WhereCalls:
    """Evaluate (awaiting) the calls of the where clauses `nodes` whose variables are `known`."""
    values: dict[str, Any] = {}
    for node in nodes:
        ready, waiting = split_calls(node, known, variables)
        for call_node in waiting:
            check_not_async(call_node, scope)
        for call_node in ready:
            key = ast.unparse(call_node)
            if key in values:
                continue
            try:
                value = eval(compile_async_expression(key), {CALL_FUNCTION: call, **scope})  # noqa: S307
                values[key] = await value if inspect.iscoroutine(value) else value
            except Exception as exc:  # noqa: BLE001 - raised where the constraint uses it
                values[key] = _Failed(exc)
    return WhereCalls(values)
