"""Parse a query into its clauses: decoder, prompt, ``from``, ``where``, ``distribution``.

Standard form (one line or indented over several lines, as in the LMQL docs)::

    argmax(max_len=64)
        "Hello[WHO]"
    from
        "local:builtin:tiny"
    where
        STOPS_AT(WHO, "\\n") and len(TOKENS(WHO)) < 10

Modern form: the query starts with its prompt string, the decoder and model come from the
call (``run(query, decoder=..., model=...)``)::

    "Hello[WHO]" where len(TOKENS(WHO)) < 10

Clauses are split with Python's `tokenize` at top-level keywords; the prompt clause is compiled
by `program.compile_prompt`, the other clauses are Python expressions (`Expression`).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import io
import textwrap
import token as tokens
import tokenize
from types import CodeType
from typing import Any

from ..errors import QuerySyntaxError
from .program import PromptProgram, compile_prompt

DECODER_NAMES = ("argmax", "sample", "beam")
CLAUSE_KEYWORDS = ("from", "where", "distribution")
OPENERS, CLOSERS = "([{", ")]}"
SKIPPED_TOKENS = (tokens.NL, tokens.COMMENT, tokens.INDENT, tokens.DEDENT, tokens.NEWLINE, tokens.ENCODING)


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
class DecoderClause:
    """``argmax``, ``sample(n=2, temperature=0.8)``, ...: the name and keyword arguments."""

    name: str
    arguments: tuple[tuple[str, Expression], ...] = ()


@dataclasses.dataclass(frozen=True)
class DistributionClause:
    """``distribution VAR in [options]``."""

    variable: str
    values: Expression


@dataclasses.dataclass(frozen=True)
class Query:
    """A parsed query; clauses that were not written are None."""

    source: str
    prompt: PromptProgram
    decoder: DecoderClause | None = None
    model: Expression | None = None
    where: Expression | None = None
    distribution: DistributionClause | None = None

    @property
    def globals(self) -> dict[str, Any]:
        return self.prompt.globals


@dataclasses.dataclass(frozen=True)
class _Clause:
    """A clause's keyword and where its body starts and ends (token positions)."""

    keyword: str
    start: tuple[int, int]
    end: tuple[int, int]
    keyword_start: tuple[int, int] = (1, 0)


def query_globals() -> dict[str, Any]:
    """Names every query sees: ``lmql`` is this package, never the real LMQL."""
    import lmql_backends

    return {"lmql": lmql_backends, "lmql_backends": lmql_backends}


@functools.lru_cache(maxsize=256)
def parse_query(source: str) -> Query:
    """Parse `source` into a :class:`Query`; raises QuerySyntaxError with line and column."""
    if not isinstance(source, str):
        raise QuerySyntaxError(f"a query must be a string, got {type(source).__name__}")
    text = textwrap.dedent(source).strip("\n")
    if not text.strip():
        raise QuerySyntaxError("the query is empty; write at least a query string", 1, 1)
    clauses = _ClauseSplitter(text).split()
    return _QueryBuilder(text, clauses).build()


class _ClauseSplitter:
    """Finds the clauses of a query from its Python tokens."""

    def __init__(self, text: str):
        self.text = text
        self.tokens = read_tokens(text)
        self.end = self.tokens[-1].end if self.tokens else (1, 0)

    def split(self) -> list[_Clause]:
        starts = self.decoder_clause() + self.keyword_starts()
        clauses = []
        for i, (keyword, body_start, keyword_start) in enumerate(starts):
            end = starts[i + 1][2] if i + 1 < len(starts) else self.end
            clauses.append(_Clause(keyword, body_start, end, keyword_start))
        return clauses

    def decoder_clause(self) -> list[tuple[str, tuple[int, int], tuple[int, int]]]:
        """[("decoder", start, start), ("prompt", start, start)] or only the prompt."""
        first = self.significant(0)
        if first is None:
            raise QuerySyntaxError("the query is empty; write at least a query string", 1, 1)
        start = self.tokens[first]
        if start.type == tokens.NAME and start.string in CLAUSE_KEYWORDS:
            raise QuerySyntaxError(f"expected a prompt (a query string) before {start.string!r}", *position(start.start))
        if start.type != tokens.NAME or self.looks_like_statement(first):
            return [("prompt", start.start, start.start)]
        if start.string not in DECODER_NAMES:
            raise QuerySyntaxError(
                f"unknown decoder {start.string!r}; expected one of {', '.join(DECODER_NAMES)} "
                "or a query string", *position(start.start),
            )
        after = self.skip_call(first + 1)
        body = self.significant(after)
        body_start = self.tokens[body].start if body is not None else self.end
        return [("decoder", start.start, start.start), ("prompt", body_start, self.tokens[after - 1].end)]

    def looks_like_statement(self, index: int) -> bool:
        """Whether the first NAME starts a Python statement (``x = 1``) rather than a decoder."""
        following = self.tokens[index + 1] if index + 1 < len(self.tokens) else None
        return following is not None and following.type == tokens.OP and following.string != "("

    def skip_call(self, index: int) -> int:
        """Index after the balanced ``( ... )`` at `index`, or `index` when there is none."""
        if index >= len(self.tokens) or self.tokens[index].string != "(":
            return index
        depth = 0
        for i in range(index, len(self.tokens)):
            depth += bracket_change(self.tokens[i])
            if depth == 0:
                return i + 1
        raise QuerySyntaxError("expected ')' to close the decoder arguments", *position(self.tokens[index].start))

    def keyword_starts(self) -> list[tuple[str, tuple[int, int], tuple[int, int]]]:
        """(keyword, body start, keyword start) for each top-level clause keyword."""
        found, depth, line_start = [], 0, True
        for i, tok in enumerate(self.tokens):
            in_prompt = not found  # after from/where/distribution, indented keywords start clauses too
            if self.is_clause_keyword(i, depth, line_start and in_prompt):
                found.append((tok.string, tok.end, tok.start))
            depth += bracket_change(tok)
            line_start = tok.type in (tokens.NEWLINE, tokens.NL, tokens.INDENT, tokens.DEDENT)
        return found

    def is_clause_keyword(self, i: int, depth: int, line_start: bool) -> bool:
        tok = self.tokens[i]
        if tok.type != tokens.NAME or tok.string not in CLAUSE_KEYWORDS or depth != 0:
            return False
        if line_start and tok.start[1] != 0:
            return False  # an indented line of the prompt clause (``from x import y``)
        if tok.string == "from":
            return not self.is_python_from(i)
        if tok.string == "distribution":
            return self.is_distribution(i)
        return True

    def is_python_from(self, i: int) -> bool:
        """``yield from`` / ``raise X from Y`` / ``from m import n`` are Python, not clauses."""
        previous = self.tokens[i - 1] if i > 0 else None
        if previous is not None and previous.string == "yield":
            return True
        line = [t.string for t in self.tokens if t.start[0] == self.tokens[i].start[0]]
        return "import" in line or (line[:1] == ["raise"])

    def is_distribution(self, i: int) -> bool:
        following = [t for t in self.tokens[i + 1:i + 8] if t.type not in SKIPPED_TOKENS][:1]
        return bool(following) and following[0].type == tokens.NAME

    def significant(self, index: int) -> int | None:
        for i in range(index, len(self.tokens)):
            if self.tokens[i].type not in SKIPPED_TOKENS and self.tokens[i].type != tokens.ENDMARKER:
                return i
        return None


class _QueryBuilder:
    """Turns split clauses into a :class:`Query`, checking their order."""

    def __init__(self, text: str, clauses: list[_Clause]):
        self.text, self.clauses = text, clauses
        self.offsets = line_offsets(text)

    def build(self) -> Query:
        self.check_order()
        by_keyword = {c.keyword: c for c in self.clauses}
        prompt = self.build_prompt(by_keyword["prompt"])
        return Query(
            source=self.text,
            prompt=prompt,
            decoder=self.build_decoder(by_keyword.get("decoder")),
            model=self.build_expression(by_keyword.get("from")),
            where=self.build_expression(by_keyword.get("where")),
            distribution=self.build_distribution(by_keyword.get("distribution")),
        )

    def check_order(self) -> None:
        seen: set[str] = set()
        for clause in self.clauses:
            if clause.keyword in seen:
                raise QuerySyntaxError(f"duplicate {clause.keyword!r} clause", *position(clause.keyword_start))
            if "distribution" in seen:
                raise QuerySyntaxError(
                    f"the {clause.keyword!r} clause must come before the 'distribution' clause",
                    *position(clause.keyword_start),
                )
            seen.add(clause.keyword)

    def body(self, clause: _Clause) -> str:
        return self.text[self.offset(clause.start):self.offset(clause.end)]

    def offset(self, pos: tuple[int, int]) -> int:
        row, col = pos
        return self.offsets[row - 1] + col if row - 1 < len(self.offsets) else len(self.text)

    def build_prompt(self, clause: _Clause) -> PromptProgram:
        row, col = clause.start
        line_before = self.text[self.offsets[row - 1]:self.offset(clause.start)] if row - 1 < len(self.offsets) else ""
        source, indent = dedent_body(self.body(clause), col, bool(line_before.strip()))
        if not source.strip():
            raise QuerySyntaxError("expected a prompt (a query string)", *position(clause.start))
        return compile_prompt(source, clause.start[0], indent, query_globals())

    def build_decoder(self, clause: _Clause | None) -> DecoderClause | None:
        if clause is None:
            return None
        text = self.body(clause)
        node = parse_expression(text, clause.start, "decoder").node
        return make_decoder_clause(node, text, clause.start)

    def build_expression(self, clause: _Clause | None) -> Expression | None:
        if clause is None:
            return None
        return parse_expression(self.body(clause), clause.start, clause.keyword)

    def build_distribution(self, clause: _Clause | None) -> DistributionClause | None:
        if clause is None:
            return None
        node = parse_expression(self.body(clause), clause.start, "distribution").node
        if not (isinstance(node, ast.Compare) and isinstance(node.left, ast.Name)
                and len(node.ops) == 1 and isinstance(node.ops[0], ast.In)):
            raise QuerySyntaxError("expected 'distribution VAR in [options]'", *position(clause.keyword_start))
        values = make_expression(node.comparators[0], clause.start)
        return DistributionClause(node.left.id, values)


def make_decoder_clause(node: ast.expr, text: str, start: tuple[int, int]) -> DecoderClause:
    if isinstance(node, ast.Name):
        return DecoderClause(node.id)
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise QuerySyntaxError(f"expected a decoder like argmax or sample(n=2), got {text.strip()!r}", *position(start))
    if node.args:
        raise QuerySyntaxError(
            f"decoder arguments must be given by keyword, e.g. {node.func.id}(n=2)", *position(start)
        )
    if any(k.arg is None for k in node.keywords):
        raise QuerySyntaxError("'**' arguments are not allowed in the decoder clause", *position(start))
    arguments = tuple((k.arg, make_expression(k.value, start)) for k in node.keywords)
    return DecoderClause(node.func.id, arguments)


def parse_expression(body: str, start: tuple[int, int], keyword: str) -> Expression:
    """Parse a clause body as one Python expression (it may span several lines)."""
    if not body.strip():
        raise QuerySyntaxError(f"expected an expression after {keyword!r}", *position(start))
    try:
        node = ast.parse("(" + body + "\n)", "<query>", "eval").body
    except SyntaxError as exc:
        line, column = syntax_error_position(exc, body, start)
        raise QuerySyntaxError(f"the {keyword!r} clause is not valid: {exc.msg}", line, max(column, 1)) from None
    return make_expression(node, start, body.strip())


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


def dedent_body(body: str, column: int, is_mid_line: bool) -> tuple[str, int]:
    """Dedent a prompt clause body starting at `column`; return it and the indent removed.

    A body starting in the middle of a line (``argmax "Hello[WHO]" from ...``) keeps its first
    line as it is and dedents the lines after it on their own.
    """
    if not is_mid_line:
        padded = " " * column + body
        return textwrap.dedent(padded), common_indent(padded)
    first, newline, rest = body.partition("\n")
    return first.strip() + newline + textwrap.dedent(rest), column


def common_indent(text: str) -> int:
    indents = [len(line) - len(line.lstrip()) for line in text.splitlines() if line.strip()]
    return min(indents, default=0)


def read_tokens(text: str) -> list[tokenize.TokenInfo]:
    """The Python tokens of a query; bad tokens become QuerySyntaxError."""
    try:
        found = list(tokenize.generate_tokens(io.StringIO(text + "\n").readline))
    except tokenize.TokenError as exc:
        message, (line, column) = exc.args
        raise QuerySyntaxError(f"unexpected end of query: {message}", line, column + 1) from None
    except (IndentationError, SyntaxError) as exc:
        raise QuerySyntaxError(f"bad indentation: {exc.msg}", exc.lineno, exc.offset or 1) from None
    for tok in found:
        if tok.type == tokens.ERRORTOKEN and tok.string.strip():
            what = "unterminated string" if tok.string in "'\"" else f"unexpected character {tok.string!r}"
            raise QuerySyntaxError(what, *position(tok.start))
    return found


def bracket_change(tok: tokenize.TokenInfo) -> int:
    if tok.type != tokens.OP:
        return 0
    return 1 if tok.string in OPENERS else -1 if tok.string in CLOSERS else 0


def line_offsets(text: str) -> list[int]:
    offsets, total = [], 0
    for line in text.splitlines(keepends=True):
        offsets.append(total)
        total += len(line)
    return offsets


def position(pos: tuple[int, int]) -> tuple[int, int]:
    """A tokenize (row, 0-based col) as (line, 1-based column)."""
    return pos[0], pos[1] + 1
