"""The ``where`` clause as a constraint tree, and the step rules of a variable being generated.

Compiling (`compile_constraints`) turns the clause's AST into nodes: ``and``/``or``/``not`` and
the atoms ``STOPS_AT``, ``STOPS_BEFORE``, ``INT``, ``REGEX``, ``len(TOKENS(X)) op N``,
``len(X) op N``, ``X in options``, ``X == value`` and any other Python condition (checked when
the variable ends). ``not`` is pushed down to the atoms.

Binding (`ConstraintSet.bind`), at the moment a variable starts, evaluates the Python parts
(options, bounds, patterns) in the program's scope and simplifies the tree for that variable:
atoms about finished variables become constants, atoms about variables not generated yet are
true. The result, `VariableConstraints`, gives the hard mask of each step (`step`) and applies
a token (`advance`): EOS ends the variable, a stop phrase ends it and cuts the text.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from typing import Any, Sequence

import torch

from ..errors import ConstraintError, InvalidRequestError, QuerySyntaxError
from .masks import (
    Allowed, allow_all, allow_none, apply_utf8_rule, char_budget_mask, intersect, model_mask,
    pending_char, prefix_mask, regex_index, text_tokens, union, utf8_mask,
)
from .tokens import INT_BODY, TokenTable, count_chars

CONSTRAINT_FUNCTIONS = ("STOPS_AT", "STOPS_BEFORE", "INT", "REGEX", "TOKENS")
COMPARE_OPS = {ast.Lt: "<", ast.LtE: "<=", ast.Eq: "==", ast.NotEq: "!=", ast.Gt: ">", ast.GtE: ">="}
FLIPPED = {"<": ">", "<=": ">=", "==": "==", "!=": "!=", ">": "<", ">=": "<="}
NEGATED = {"<": ">=", "<=": ">", "==": "!=", "!=": "==", ">": "<=", ">=": "<"}


def compare(a: int, op: str, b: int) -> bool:
    return {"<": a < b, "<=": a <= b, "==": a == b, "!=": a != b, ">": a > b, ">=": a >= b}[op]


# ---- the state of a variable being generated -------------------------------------------

@dataclasses.dataclass(frozen=True)
class Progress:
    """The tokens generated so far for one variable, and how it ended (finish_reason)."""

    token_ids: tuple[int, ...] = ()
    data: bytes = b""
    finish_reason: str | None = None  # "eos", "stop", "forced", "length"
    kept_bytes: int | None = None  # a stop phrase cut the value to data[:kept_bytes]

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def value_bytes(self) -> bytes:
        return self.data if self.kept_bytes is None else self.data[:self.kept_bytes]

    @property
    def text(self) -> str:
        return self.value_bytes.decode("utf-8", errors="replace")

    @property
    def pending(self) -> bytes:
        """The unfinished last character of the value (b"" when every character is whole)."""
        pending = pending_char(self.value_bytes)
        return b"" if pending is None else pending

    def end(self, reason: str) -> "Progress":
        return dataclasses.replace(self, finish_reason=reason)


@dataclasses.dataclass(frozen=True)
class VariableRecord:
    """A finished variable as constraints on later variables see it."""

    text: str
    value: Any
    num_tokens: int


@dataclasses.dataclass(frozen=True)
class StopPhrase:
    phrase: bytes
    keep: bool


@dataclasses.dataclass(frozen=True)
class Step:
    """The next step of a variable: the model's mask, or the variable ends without a token."""

    mask: torch.Tensor | None
    useful_tokens: int | None = None  # see Bound.useful_tokens
    is_forced_end: bool = False


# ---- bound constraints: evaluated at every step ------------------------------------------

class Bound:
    """A constraint bound to values, for the variable being generated."""

    def evaluate(self, progress: Progress) -> Allowed:
        raise NotImplementedError

    def is_satisfied(self, record: VariableRecord) -> bool:
        """Whether a finished variable with `record` satisfies the constraint."""
        raise NotImplementedError

    def useful_tokens(self, progress: Progress) -> int | None:
        """How many tokens may follow under one mask (None: no known limit).

        Only an efficiency hint for chunked generation: 1 when the mask changes after every
        token, the remaining budget of a token-count bound. It never changes a result.
        """
        return None

    def tokens_left(self, progress: Progress) -> int | None:
        """How many more tokens the constraint lets the value have (None: no limit)."""
        return None

    def tail(self, progress: Progress) -> bytes | None:
        """The one rest an option constraint leaves (LMQL's mask ``tail``), else None."""
        return None

    def describe(self, variable: str) -> str:
        """The constraint as written in a where clause (for error messages)."""
        return "a condition"


@dataclasses.dataclass(frozen=True)
class Constant(Bound):
    value: bool
    table: TokenTable

    def evaluate(self, progress):
        return allow_all(True) if self.value else allow_none(self.table)

    def is_satisfied(self, record):
        return self.value


@dataclasses.dataclass(frozen=True)
class BoundAll(Bound):
    children: tuple[Bound, ...]

    def evaluate(self, progress):
        result = self.children[0].evaluate(progress)
        for child in self.children[1:]:
            result = intersect(result, child.evaluate(progress))
        return result

    def is_satisfied(self, record):
        return all(c.is_satisfied(record) for c in self.children)

    def useful_tokens(self, progress):
        limits = [n for n in (c.useful_tokens(progress) for c in self.children) if n is not None]
        return min(limits, default=None)

    def tokens_left(self, progress):
        limits = [n for n in (c.tokens_left(progress) for c in self.children) if n is not None]
        return min(limits, default=None)

    def tail(self, progress):
        return next((t for t in (c.tail(progress) for c in self.children) if t is not None), None)

    def describe(self, variable):
        return " and ".join(c.describe(variable) for c in self.children)


@dataclasses.dataclass(frozen=True)
class BoundAny(Bound):
    children: tuple[Bound, ...]

    def evaluate(self, progress):
        result = self.children[0].evaluate(progress)
        for child in self.children[1:]:
            result = union(result, child.evaluate(progress))
        return result

    def is_satisfied(self, record):
        return any(c.is_satisfied(record) for c in self.children)

    def useful_tokens(self, progress):
        limits = [c.useful_tokens(progress) for c in self.children]
        return None if None in limits else max(limits)

    def tokens_left(self, progress):
        limits = [c.tokens_left(progress) for c in self.children]
        return None if None in limits else max(limits)

    def describe(self, variable):
        return "(" + " or ".join(c.describe(variable) for c in self.children) + ")"


@dataclasses.dataclass(frozen=True)
class BoundNot(Bound):
    """Negation of a condition checked at the end: any token, may end when the child may not."""

    child: Bound

    def evaluate(self, progress):
        return allow_all(not self.child.evaluate(progress).can_end)

    def is_satisfied(self, record):
        return not self.child.is_satisfied(record)


@dataclasses.dataclass(frozen=True)
class BoundTokenCount(Bound):
    op: str
    limit: int
    table: TokenTable

    def evaluate(self, progress):
        count = progress.num_tokens
        can_end = compare(count, self.op, self.limit)
        if self.op in ("<", "<=", "==") and not compare(count + 1, "<" if self.op == "<" else "<=", self.limit):
            return allow_none(self.table, can_end)
        return allow_all(can_end)

    def is_satisfied(self, record):
        return compare(record.num_tokens, self.op, self.limit)

    def useful_tokens(self, progress):
        left = self.tokens_left(progress)
        return None if left is None else max(1, left)

    def tokens_left(self, progress):
        if self.op not in ("<", "<=", "=="):
            return None
        return (self.limit - 1 if self.op == "<" else self.limit) - progress.num_tokens

    def describe(self, variable):
        return f"len(TOKENS({variable})) {self.op} {self.limit}"


@dataclasses.dataclass(frozen=True)
class BoundCharCount(Bound):
    op: str
    limit: int
    table: TokenTable

    def evaluate(self, progress):
        count = count_chars(progress.value_bytes)
        can_end = compare(count, self.op, self.limit)
        if self.op in ("<", "<=", "=="):
            budget = (self.limit - 1 if self.op == "<" else self.limit) - count
            if budget >= self.table.max_token_chars:  # no token is too long yet
                return allow_all(can_end)
            return Allowed(char_budget_mask(self.table, budget), can_end)
        return allow_all(can_end)

    def is_satisfied(self, record):
        return compare(len(record.text), self.op, self.limit)

    def useful_tokens(self, progress):
        return 1 if self.op in ("<", "<=", "==") else None

    def describe(self, variable):
        return f"len({variable}) {self.op} {self.limit}"


@dataclasses.dataclass(frozen=True)
class BoundOptions(Bound):
    options: tuple[bytes, ...]
    is_negated: bool
    table: TokenTable

    def evaluate(self, progress):
        value = progress.value_bytes
        is_option = value in self.options
        if self.is_negated:
            return allow_all(not is_option)
        return Allowed(prefix_mask(self.table, value, self.options), is_option)

    def is_satisfied(self, record):
        return (record.text.encode() in self.options) != self.is_negated

    def useful_tokens(self, progress):
        return None if self.is_negated else 1

    def tail(self, progress):
        """LMQL 0.7.3 (``ops/token_set.py:289-296``): one remaining option gives its rest as a tail."""
        value = progress.value_bytes
        rests = [o[len(value):] for o in self.options if len(o) > len(value) and o.startswith(value)]
        return rests[0] if len(rests) == 1 and not self.is_negated else None

    def describe(self, variable):
        options = [o.decode("utf-8", "replace") for o in self.options]
        return f"{variable} {'not in' if self.is_negated else 'in'} {options!r}"


@dataclasses.dataclass(frozen=True)
class BoundInt(Bound):
    """``INT(X)`` and ``[X: int]`` as LMQL 0.7.3 decodes them (its ``IntOp.follow``).

    The first token is a number token (``[ 1-9][0-9]*``, a lone space included); after only
    whitespace, a number token without the space; once the value has a digit and only digits,
    commas and whitespace, every token and the end are allowed (argmax compares the end with
    every other token); a token that brings any other character ends the variable, and the
    value keeps only its digits (`int_value`). A token leaving a character unfinished is not
    chosen as that ending token (the UTF-8 rule).
    """

    table: TokenTable

    def evaluate(self, progress):
        value = progress.value_bytes
        if value == b"":
            return Allowed(self.table.int_start_mask, False)
        if value.strip() == b"":
            return Allowed(self.table.int_continue_mask, False)
        if INT_BODY.fullmatch(value):
            return Allowed(utf8_mask(self.table, b"", 0), True)
        return allow_none(self.table, True)

    def is_satisfied(self, record):
        return int_value(record.text) is not None

    def useful_tokens(self, progress):
        # the mask is "every whole token" from the first digit until a token ends the number
        return None if INT_BODY.fullmatch(progress.value_bytes) and progress.value_bytes.strip() else 1

    def describe(self, variable):
        return f"INT({variable})"


def int_value(text: str) -> int | None:
    """The value of an INT variable: its digits (LMQL drops every other character), or None."""
    digits = "".join(c for c in text if c in "0123456789")
    return int(digits) if digits else None


@dataclasses.dataclass(frozen=True)
class BoundRegex(Bound):
    pattern: str
    table: TokenTable

    def evaluate(self, progress):
        return regex_index(self.table, self.pattern).allowed(progress.token_ids)

    def is_satisfied(self, record):
        return re.fullmatch(self.pattern, record.text) is not None

    def describe(self, variable):
        return f"REGEX({variable}, {self.pattern!r})"


@dataclasses.dataclass(frozen=True)
class BoundCheck(Bound):
    """Any other Python condition: checked when the variable would end."""

    code: Any
    variable: str
    scope: dict
    is_int: bool

    def evaluate(self, progress):
        return allow_all(self.check(progress.text))

    def is_satisfied(self, record):
        return self.check(record.text)

    def check(self, text: str) -> bool:
        value = int(text) if self.is_int and text.strip().isdigit() else text
        try:
            return bool(eval(self.code, {**self.scope, self.variable: value}))  # noqa: S307
        except Exception:  # a condition that cannot be evaluated on this value does not hold
            return False


# ---- compiled constraints: bound when a variable starts ----------------------------------

@dataclasses.dataclass
class BindContext:
    """What binding needs: the variable starting, finished variables and the Python scope."""

    variable: str
    records: dict[str, VariableRecord]
    scope: dict[str, Any]
    table: TokenTable
    int_variables: frozenset[str]

    def knows(self, names: frozenset[str]) -> bool:
        return all(name in self.records and name != self.variable for name in names)

    def evaluate(self, code) -> Any:
        values = {name: record.value for name, record in self.records.items()}
        try:
            return eval(code, {**self.scope, **values})  # noqa: S307
        except Exception as exc:
            raise InvalidRequestError(
                f"the where clause failed while {self.variable} starts: {type(exc).__name__}: {exc}"
            ) from exc

    def constant(self, value: bool) -> Bound:
        return Constant(bool(value), self.table)


class Node:
    """A compiled constraint (not yet bound to values).

    `bind` returns None when the constraint cannot be decided yet (it is about a variable that
    has not been generated): such a part counts as true, also under ``not``.
    """

    def bind(self, ctx: BindContext) -> Bound | None:
        raise NotImplementedError

    def negate(self) -> "Node":
        return Not(self)


@dataclasses.dataclass(frozen=True)
class AllOf(Node):
    children: tuple[Node, ...]

    def bind(self, ctx):
        bound = [b for b in (child.bind(ctx) for child in self.children) if b is not None]
        if any(isinstance(b, Constant) and not b.value for b in bound):
            return ctx.constant(False)
        kept = tuple(b for b in bound if not isinstance(b, Constant))
        return kept[0] if len(kept) == 1 else BoundAll(kept) if kept else ctx.constant(True)

    def negate(self):
        return AnyOf(tuple(child.negate() for child in self.children))


@dataclasses.dataclass(frozen=True)
class AnyOf(Node):
    children: tuple[Node, ...]

    def bind(self, ctx):
        bound = [child.bind(ctx) for child in self.children]
        if any(b is None or (isinstance(b, Constant) and b.value) for b in bound):
            return ctx.constant(True)
        kept = tuple(b for b in bound if not isinstance(b, Constant))
        return kept[0] if len(kept) == 1 else BoundAny(kept) if kept else ctx.constant(False)

    def negate(self):
        return AllOf(tuple(child.negate() for child in self.children))


@dataclasses.dataclass(frozen=True)
class Not(Node):
    child: Node

    def bind(self, ctx):
        bound = self.child.bind(ctx)
        if bound is None:
            return None
        return ctx.constant(not bound.value) if isinstance(bound, Constant) else BoundNot(bound)

    def negate(self):
        return self.child


@dataclasses.dataclass(frozen=True)
class Atom(Node):
    """A constraint on one variable (`target`) with Python parts evaluated at bind time."""

    target: str
    codes: tuple = ()
    expr_variables: frozenset[str] = frozenset()

    def bind(self, ctx):
        if not ctx.knows(self.expr_variables):
            return None  # depends on a variable that is not generated yet
        if self.target == ctx.variable:
            return self.make_bound(ctx, [ctx.evaluate(code) for code in self.codes])
        record = ctx.records.get(self.target)
        if record is None:
            return None
        return ctx.constant(self.make_bound(ctx, [ctx.evaluate(code) for code in self.codes]).is_satisfied(record))

    def make_bound(self, ctx: BindContext, values: list[Any]) -> Bound:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class CountAtom(Atom):
    """``len(TOKENS(X)) op N`` (unit "tokens") or ``len(X) op N`` (unit "chars")."""

    op: str = "<"
    unit: str = "tokens"

    def make_bound(self, ctx, values):
        limit = values[0]
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise InvalidRequestError(f"the bound of len(...) {self.op} N on {self.target} must be an int, got {limit!r}")
        kind = BoundTokenCount if self.unit == "tokens" else BoundCharCount
        return kind(self.op, limit, ctx.table)

    def negate(self):
        return dataclasses.replace(self, op=NEGATED[self.op])


@dataclasses.dataclass(frozen=True)
class OptionsAtom(Atom):
    """``X in options`` / ``X not in options``; ``X == v`` is ``X in [v]``."""

    is_negated: bool = False
    is_single: bool = False

    def make_bound(self, ctx, values):
        options = [values[0]] if self.is_single else values[0]
        if isinstance(options, (str, bytes)) or not hasattr(options, "__iter__"):
            raise InvalidRequestError(
                f"the options of {self.target} in ... must be a list of strings, got {options!r}", self.target
            )
        return BoundOptions(tuple(str(o).encode() for o in options), self.is_negated, ctx.table)

    def negate(self):
        return dataclasses.replace(self, is_negated=not self.is_negated)


@dataclasses.dataclass(frozen=True)
class IntAtom(Atom):
    def make_bound(self, ctx, values):
        return BoundInt(ctx.table)


@dataclasses.dataclass(frozen=True)
class RegexAtom(Atom):
    def make_bound(self, ctx, values):
        if not isinstance(values[0], str):
            raise InvalidRequestError(f"the pattern of REGEX({self.target}, ...) must be a string, got {values[0]!r}")
        return BoundRegex(values[0], ctx.table)


@dataclasses.dataclass(frozen=True)
class StopAtom(Atom):
    """``STOPS_AT`` / ``STOPS_BEFORE``: not a mask, an ending rule (only under ``and``)."""

    keep: bool = True

    def bind(self, ctx):
        return None

    def phrase(self, ctx: BindContext) -> StopPhrase:
        phrase = ctx.evaluate(self.codes[0])
        if not isinstance(phrase, str) or not phrase:
            name = "STOPS_AT" if self.keep else "STOPS_BEFORE"
            raise InvalidRequestError(f"{name}({self.target}, ...) needs a non-empty string, got {phrase!r}")
        return StopPhrase(phrase.encode(), self.keep)

    def negate(self):
        raise InvalidRequestError(f"STOPS_AT/STOPS_BEFORE on {self.target} cannot be negated; combine them with 'and'")


@dataclasses.dataclass(frozen=True)
class CheckAtom(Node):
    """Any other Python condition over variables and values."""

    code: Any = None
    variables: frozenset[str] = frozenset()

    def bind(self, ctx):
        if ctx.variable in self.variables and ctx.knows(self.variables - {ctx.variable}):
            return BoundCheck(self.code, ctx.variable, {**ctx.scope, **record_values(ctx)},
                              ctx.variable in ctx.int_variables)
        if ctx.knows(self.variables):
            return ctx.constant(bool(ctx.evaluate(self.code)))
        return None


def record_values(ctx: BindContext) -> dict[str, Any]:
    return {name: record.value for name, record in ctx.records.items()}


# ---- the constraints of a query -------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class VariableConstraints:
    """The bound constraints of the variable being generated: masks per step, token effects."""

    variable: str
    table: TokenTable
    tree: Bound
    stops: tuple[StopPhrase, ...] = ()

    def step(self, progress: Progress, max_tokens: int | None = None) -> Step:
        """The mask for the next token after `progress` (ConstraintError when nothing fits).

        `max_tokens` is the most tokens the value may have (the decoder's length budget); the
        UTF-8 rule (masks.apply_utf8_rule) uses it with the constraints' own token bounds.
        """
        tokens_left = self.tokens_left(progress, max_tokens)
        allowed = apply_utf8_rule(self.table, self.tree.evaluate(progress), progress.pending, tokens_left)
        tokens = text_tokens(self.table, allowed)
        if not bool(tokens.any()):
            if allowed.can_end:
                return Step(None, is_forced_end=True)
            raise self.unsatisfiable(progress, tokens_left, max_tokens)
        return Step(model_mask(self.table, tokens, allowed.can_end), self.tree.useful_tokens(progress))

    def tokens_left(self, progress: Progress, max_tokens: int | None) -> int | None:
        limits = [self.tree.tokens_left(progress)]
        if max_tokens is not None:
            limits.append(max_tokens - progress.num_tokens)
        known = [n for n in limits if n is not None]
        return min(known, default=None)

    def unsatisfiable(self, progress: Progress, tokens_left: int | None, max_tokens: int | None) -> ConstraintError:
        """The error of a variable that can neither grow nor end: names the constraint and budget."""
        budget = (f"; {progress.num_tokens} tokens used, {max(tokens_left, 0)} left "
                  f"(the token budget: the where clause's len(TOKENS(...)) bound or max_len"
                  f"{'' if max_tokens is None else f' / the context, {max_tokens} tokens here'})"
                  if tokens_left is not None else "")
        return ConstraintError(
            f"the constraints on {self.variable} cannot be met: {self.tree.describe(self.variable)} "
            f"allows no next token after {progress.text!r} and does not let {self.variable} end{budget}; "
            "raise the token budget (len(TOKENS(...)) or max_len) or relax the constraint"
        )

    def tail(self, progress: Progress) -> bytes | None:
        """The rest of the one option the value can still become, if the constraints leave one."""
        return self.tree.tail(progress)

    def advance(self, progress: Progress, token_id: int) -> Progress:
        """`progress` after `token_id`: EOS ends the variable, a stop phrase ends and cuts it."""
        if token_id == self.table.eos_token_id:
            return progress.end("eos")
        data = progress.data + self.table.token_bytes[token_id]
        grown = Progress(progress.token_ids + (token_id,), data)
        cut = self.stop_cut(data)
        return grown if cut is None else dataclasses.replace(grown, finish_reason="stop", kept_bytes=cut)

    def stop_cut(self, data: bytes) -> int | None:
        """Bytes to keep when a stop phrase occurs in `data` (earliest occurrence wins)."""
        cuts = []
        for stop in self.stops:
            index = data.find(stop.phrase)
            if index >= 0:
                cuts.append((index, index + len(stop.phrase) if stop.keep else index))
        return min(cuts)[1] if cuts else None


@dataclasses.dataclass(frozen=True)
class ConstraintSet:
    """The compiled ``where`` clause plus ``[X: int]`` holes."""

    tree: Node
    stops: tuple[StopAtom, ...] = ()
    int_variables: frozenset[str] = frozenset()

    def bind(self, variable: str, records: dict[str, VariableRecord], scope: dict[str, Any],
             table: TokenTable) -> VariableConstraints:
        """The constraints of `variable`, starting now, with earlier variables in `records`."""
        ctx = BindContext(variable, records, scope, table, self.int_variables)
        stops = tuple(s.phrase(ctx) for s in self.stops if s.target == variable and ctx.knows(s.expr_variables))
        tree = self.tree.bind(ctx)
        return VariableConstraints(variable, table, tree if tree is not None else ctx.constant(True), stops)


def compile_constraints(where, hole_names: Sequence[str], int_variables: frozenset[str] = frozenset()) -> ConstraintSet:
    """Compile a parsed ``where`` Expression (or None) for a query with holes `hole_names`."""
    compiler = _Compiler(frozenset(hole_names), where)
    children = list(compiler.conjuncts(where.node)) if where is not None else []
    stops = tuple(c for c in children if isinstance(c, StopAtom))
    nodes = [c for c in children if not isinstance(c, StopAtom)]
    nodes += [IntAtom(name) for name in sorted(int_variables)]
    return ConstraintSet(AllOf(tuple(nodes)), stops, frozenset(int_variables) | compiler.int_targets(nodes))


class _Compiler:
    """From the ``where`` AST to constraint nodes."""

    def __init__(self, holes: frozenset[str], where):
        self.holes, self.where = holes, where

    def conjuncts(self, node: ast.expr):
        """The top-level ``and`` parts of the clause (where stop atoms may appear)."""
        if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.And):
            for value in node.values:
                yield from self.conjuncts(value)
        else:
            yield self.compile(node)

    def int_targets(self, nodes: list[Node]) -> frozenset[str]:
        return frozenset(n.target for n in nodes if isinstance(n, IntAtom))

    def compile(self, node: ast.expr) -> Node:
        if isinstance(node, ast.BoolOp):
            children = tuple(self.compile_nested(v) for v in node.values)
            return AllOf(children) if isinstance(node.op, ast.And) else AnyOf(children)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return self.compile_nested(node.operand).negate()
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id.isupper():
            return self.compile_function(node)
        if isinstance(node, ast.Compare):
            return self.compile_compare(node)
        return self.check(node)

    def compile_nested(self, node: ast.expr) -> Node:
        compiled = self.compile(node)
        if isinstance(compiled, StopAtom):
            self.fail(node, "STOPS_AT/STOPS_BEFORE can only be combined with 'and'")
        return compiled

    def compile_function(self, node: ast.Call) -> Node:
        name = node.func.id
        if name not in CONSTRAINT_FUNCTIONS or name == "TOKENS":
            self.fail(node, f"unknown constraint {name}; expected STOPS_AT, STOPS_BEFORE, INT, REGEX or len(TOKENS(X))")
        arity = 1 if name == "INT" else 2
        if len(node.args) != arity or node.keywords:
            example = f"{name}(X)" if arity == 1 else f"{name}(X, \"...\")"
            self.fail(node, f"{name} takes {arity} argument{'s' * (arity > 1)}, e.g. {example}")
        target = self.variable_of(node.args[0], name)
        if name == "INT":
            return IntAtom(target)
        codes, names = self.python(node.args[1])
        if name == "REGEX":
            return RegexAtom(target, codes, names)
        return StopAtom(target, codes, names, keep=(name == "STOPS_AT"))

    def compile_compare(self, node: ast.Compare) -> Node:
        if len(node.ops) > 1:  # a < len(X) < b
            parts, left = [], node.left
            for op, right in zip(node.ops, node.comparators):
                parts.append(self.compile_compare(ast.Compare(left, [op], [right])))
                left = right
            return AllOf(tuple(parts))
        left, op, right = node.left, node.ops[0], node.comparators[0]
        return self.count_atom(left, op, right) or self.options_atom(left, op, right) or self.check(node)

    def count_atom(self, left, op, right) -> Node | None:
        if type(op) not in COMPARE_OPS:
            return None
        for counted, other, flip in ((left, right, False), (right, left, True)):
            unit, target = self.counted(counted)
            if unit is not None:
                symbol = FLIPPED[COMPARE_OPS[type(op)]] if flip else COMPARE_OPS[type(op)]
                codes, names = self.python(other)
                return CountAtom(target, codes, names, op=symbol, unit=unit)
        return None

    def counted(self, node: ast.expr) -> tuple[str | None, str | None]:
        """("tokens", X) for len(TOKENS(X)), ("chars", X) for len(X), else (None, None)."""
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "len"
                and len(node.args) == 1):
            return None, None
        arg = node.args[0]
        if isinstance(arg, ast.Call) and isinstance(arg.func, ast.Name) and arg.func.id == "TOKENS":
            return "tokens", self.variable_of(arg.args[0] if arg.args else arg, "TOKENS")
        if isinstance(arg, ast.Name) and arg.id in self.holes:
            return "chars", arg.id
        return None, None

    def options_atom(self, left, op, right) -> Node | None:
        if isinstance(op, (ast.In, ast.NotIn)) and self.is_variable(left):
            codes, names = self.python(right)
            return OptionsAtom(left.id, codes, names, is_negated=isinstance(op, ast.NotIn))
        if isinstance(op, (ast.Eq, ast.NotEq)):
            for variable, other in ((left, right), (right, left)):
                if self.is_variable(variable) and not self.is_variable(other):
                    codes, names = self.python(other)
                    return OptionsAtom(variable.id, codes, names, isinstance(op, ast.NotEq), is_single=True)
        return None

    def check(self, node: ast.expr) -> Node:
        codes, names = self.python(node)
        return CheckAtom(codes[0], names)

    def python(self, node: ast.expr) -> tuple[tuple, frozenset[str]]:
        """A Python sub-expression: its code and the query variables it mentions."""
        code = compile(ast.fix_missing_locations(ast.Expression(node)), "<where>", "eval")
        names = frozenset(n.id for n in ast.walk(node) if isinstance(n, ast.Name) and n.id in self.holes)
        return (code,), names

    def is_variable(self, node: ast.expr) -> bool:
        return isinstance(node, ast.Name) and node.id in self.holes

    def variable_of(self, node: ast.expr, function: str) -> str:
        if not self.is_variable(node):
            holes = ", ".join(sorted(self.holes)) or "none"
            self.fail(node, f"{function} needs a query variable as its first argument (the query's variables: {holes})")
        return node.id

    def fail(self, node: ast.AST, message: str):
        line, column = 1, 1
        if self.where is not None:
            line = self.where.line + getattr(node, "lineno", 1) - 1
            column = getattr(node, "col_offset", 0) + (self.where.column - 1 if getattr(node, "lineno", 1) == 1 else 1)
        raise QuerySyntaxError(message, line, max(column, 1))
