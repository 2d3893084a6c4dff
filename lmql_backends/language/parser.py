"""Parse a query into its clauses: decoder, prompt, ``from``, ``where``, ``distribution``.

Standard form (one line or indented over several lines, as in the LMQL docs)::

    argmax(max_len=64)
        "Hello[WHO]"
    from
        "local:builtin:tiny"
    where
        STOPS_AT(WHO, "\\n") and len(TOKENS(WHO)) < 10

Modern form (LMQL's standard syntax): Python with prompt statements, each with its own
``where`` (or ``distribution``); the decoder clause is optional, the model comes from the call
(``run(query, decoder=..., model=...)``)::

    import re
    def clean(s):
        return re.sub(r"\W", "", s)
    "Hello[WHO]" where len(TOKENS(WHO)) < 10
    for i in range(2):
        "-[THING]" \
            where STOPS_AT(THING, "\n")
    return clean(WHO)

Clauses are split with Python's `tokenize` at top-level keywords: a ``where`` or
``distribution`` after a query string on its logical line belongs to that prompt statement,
one at the start of a line (or after ``from``) is the query's clause. The prompt clause is
compiled by `program.compile_prompt`, the other clauses are Python expressions (`Expression`).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import io
import linecache
import textwrap
import token as tokens
import tokenize
from typing import Any

from ..errors import QuerySyntaxError
from .calls import CALL_FUNCTION, call
from .expression import DistributionClause, Expression, make_expression, parse_expression, position
from .program import IMPORT_FUNCTION, PromptProgram, arguments, compile_prompt, import_name
from .qstrings import ARGUMENTS_FUNCTION

DECODER_NAMES = ("argmax", "sample", "beam", "beam_var", "var", "best_k", "beam_sample")
# same-width stand-ins for an inline keyword, so ast positions stay those of the query text:
# ``"..." where C`` parses as ``"..." @ (C)``, ``"..." distribution X in L`` as ``"..." @~~(X in L)``
INLINE_WHERE = "@ (  "
INLINE_DISTRIBUTION = "@~~(" + " " * 8
CLAUSE_KEYWORDS = ("from", "where", "distribution")
OPENERS, CLOSERS = "([{", ")]}"
SKIPPED_TOKENS = (tokens.NL, tokens.COMMENT, tokens.INDENT, tokens.DEDENT, tokens.NEWLINE, tokens.ENCODING)


@dataclasses.dataclass(frozen=True)
class DecoderClause:
    """``argmax``, ``sample(n=2, temperature=0.8)``, ...: the name and keyword arguments."""

    name: str
    arguments: tuple[tuple[str, Expression], ...] = ()


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

    return {"lmql": lmql_backends, "lmql_backends": lmql_backends, CALL_FUNCTION: call,
            ARGUMENTS_FUNCTION: arguments, IMPORT_FUNCTION: import_name}


def source_name(text: str) -> str:
    """A file name for the query's code, registered with `linecache` so that `inspect.getsource`
    finds the functions a query defines (an ``@lmql.query`` function reads its raw docstring)."""
    name = f"<lmql query {hashlib.sha1(text.encode()).hexdigest()[:12]}>"
    linecache.cache[name] = (len(text), None, text.splitlines(keepends=True), name)
    return name


def strip_lmql_marker(source: str) -> str:
    """A query function's docstring may start with ``lmql`` (``'''lmql ...'''``): drop it."""
    stripped = source.lstrip()
    if stripped.startswith("lmql") and stripped[4:5] in ("\n", "\r", ""):
        return stripped[4:]
    return source


INPUTS_HEADER = "# inputs:"


def file_inputs(text: str, name: str = "the query") -> dict[str, Any]:
    """The inputs a query file names in a ``# inputs: {"person": "Ann"}`` comment line ({} without one)."""
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith(INPUTS_HEADER):
            literal = line.strip()[len(INPUTS_HEADER):].strip()
            try:
                inputs = ast.literal_eval(literal)
            except (ValueError, SyntaxError):
                inputs = None
            if not (isinstance(inputs, dict) and all(isinstance(k, str) for k in inputs)):
                raise QuerySyntaxError(f"{name}: '# inputs:' must be followed by a Python dict literal with "
                                       f"string keys, e.g. # inputs: {{\"person\": \"Ann\"}}; got {literal!r}",
                                       number, line.index("#") + 1)
            return inputs
    return {}


@functools.lru_cache(maxsize=256)
def parse_query(source: str) -> Query:
    """Parse `source` into a :class:`Query`; raises QuerySyntaxError with line and column."""
    if not isinstance(source, str):
        raise QuerySyntaxError(f"a query must be a string, got {type(source).__name__}")
    text = textwrap.dedent(strip_lmql_marker(source).expandtabs()).strip("\n")
    if not text.strip():
        raise QuerySyntaxError("the query is empty; write at least a query string", 1, 1)
    splitter = _ClauseSplitter(text)
    clauses = splitter.split()
    rewritten = splitter.rewritten()
    return _QueryBuilder(rewritten, clauses, splitter.insertions).build()


class _ClauseSplitter:
    """Finds the clauses of a query from its Python tokens."""

    def __init__(self, text: str):
        self.text = text
        self.tokens = read_tokens(text)
        self.end = self.tokens[-1].end if self.tokens else (1, 0)
        self.inline: list[tuple[str, int, int]] = []  # (keyword, first body token, end token)
        self.insertions: list[tuple[int, int]] = []  # where rewritten() added a ")"
        self.prompt_start = 0

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
        if start.type == tokens.NAME and start.string in CLAUSE_KEYWORDS and not self.is_python_from(first):
            raise QuerySyntaxError(f"expected a prompt (a query string) before {start.string!r}", *position(start.start))
        if start.type != tokens.NAME or self.looks_like_statement(first) or (
                start.string not in DECODER_NAMES and not self.is_followed_by_string(first)):
            # Python first (import x, def f(), x = 1): a prologue if a decoder clause follows
            decoder = self.prologue_decoder(first)
            if decoder is None:
                return [("prompt", start.start, start.start)]
            return [("prologue", start.start, start.start)] + self.decoder_at(decoder)
        if start.string not in DECODER_NAMES:
            raise QuerySyntaxError(
                f"unknown decoder {start.string!r}; expected one of {', '.join(DECODER_NAMES)} "
                "or a query string", *position(start.start),
            )
        return self.decoder_at(first)

    def prologue_decoder(self, first: int) -> int | None:
        """The decoder keyword after Python statements (LMQL's prologue), or None.

        As in LMQL, the first decoder name that starts a top-level line (``argmax``,
        ``sample(n=2)``, not ``argmax = ...`` or ``x.argmax``) starts the decoder clause; the
        lines before it are Python run before the prompt.
        """
        depth, line_start = 0, True
        for i in range(first, len(self.tokens)):
            tok = self.tokens[i]
            if (line_start and depth == 0 and tok.type == tokens.NAME and tok.string in DECODER_NAMES
                    and tok.start[1] == 0 and not self.looks_like_statement(i)):
                return i
            depth += bracket_change(tok)
            if tok.type not in (tokens.NL, tokens.COMMENT):
                line_start = tok.type in (tokens.NEWLINE, tokens.INDENT, tokens.DEDENT)
        return None

    def decoder_at(self, first: int) -> list[tuple[str, tuple[int, int], tuple[int, int]]]:
        """The decoder clause at token `first` and the prompt clause after it."""
        start = self.tokens[first]
        after = self.skip_call(first + 1)
        self.prompt_start = after
        body = self.significant(after)
        body_start = self.tokens[body].start if body is not None else self.end
        return [("decoder", start.start, start.start), ("prompt", body_start, self.tokens[after - 1].end)]

    def is_followed_by_string(self, index: int) -> bool:
        following = self.tokens[index + 1] if index + 1 < len(self.tokens) else None
        return following is not None and following.type == tokens.STRING

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
        """(keyword, body start, keyword start) for each top-level clause keyword.

        Records the inline ``where``/``distribution`` of prompt statements in `self.inline`.
        """
        found, depth, line_start = [], 0, True
        previous = None
        for i, tok in enumerate(self.tokens):
            if tok.type == tokens.NAME and tok.string in CLAUSE_KEYWORDS and depth == 0 and i >= self.prompt_start:
                kind = self.keyword_kind(i, line_start, previous, bool(found))
                if kind == "clause":
                    found.append((tok.string, tok.end, tok.start))
                elif kind == "inline":
                    self.inline.append(self.inline_clause(i))
            depth += bracket_change(tok)
            line_start = tok.type in (tokens.NEWLINE, tokens.NL, tokens.INDENT, tokens.DEDENT)
            if tok.type not in SKIPPED_TOKENS:
                previous = tok
        return found

    def keyword_kind(self, i: int, line_start: bool, previous, after_clause: bool) -> str | None:
        """"clause", "inline" (a prompt statement's own where/distribution) or None (Python)."""
        tok = self.tokens[i]
        if tok.string == "from" and self.is_python_from(i):
            return None
        if tok.string == "distribution" and not self.is_distribution(i):
            return None
        if after_clause:
            return "clause"
        if any(start <= i < end for _, start, end in self.inline):
            return None  # inside an inline clause: inline_clause has checked it
        if tok.string == "from":
            return "clause" if line_start and tok.start[1] == 0 or not line_start else None
        if line_start:
            return "clause"
        if previous is not None and previous.type == tokens.STRING:
            return "inline"
        return "clause"

    def inline_clause(self, i: int) -> tuple[str, int, int]:
        """(keyword, first body token, end token) of an inline clause: to its logical line's end."""
        depth = 0
        for j in range(i + 1, len(self.tokens)):
            tok = self.tokens[j]
            if depth == 0 and (tok.type in (tokens.NEWLINE, tokens.ENDMARKER) or tok.type == tokens.NAME and (
                    tok.string in ("from", "where", "distribution") and self.ends_inline(j, i))):
                return self.tokens[i].string, i + 1, j
            depth += bracket_change(tok)
        return self.tokens[i].string, i + 1, len(self.tokens)

    def ends_inline(self, j: int, i: int) -> bool:
        tok = self.tokens[j]
        if tok.string == "from":
            return not self.is_python_from(j)
        if tok.string == "where" and self.tokens[i].string == "distribution":
            raise QuerySyntaxError("the 'where' clause must come before the 'distribution' clause", *position(tok.start))
        if tok.string == "where":
            raise QuerySyntaxError("a prompt statement has one 'where'; join its constraints with 'and'",
                                   *position(tok.start))
        return self.is_distribution(j)

    def rewritten(self) -> str:
        """The query text with each inline keyword replaced by its same-width stand-in."""
        lines = self.text.split("\n")
        edits = []
        for keyword, body, end in self.inline:
            tok = self.tokens[body - 1]
            last = self.last_significant(body, end)
            if last is None:
                raise QuerySyntaxError(f"expected an expression after {keyword!r}", tok.end[0], tok.end[1] + 1)
            check_inline_body(self.text, tok, self.tokens[last], keyword)
            edits.append((tok.start, tok.end, INLINE_WHERE if keyword == "where" else INLINE_DISTRIBUTION))
            edits.append((self.tokens[last].end, self.tokens[last].end, ")"))
            self.insertions.append(self.tokens[last].end)
        for (row, col), (end_row, end_col), replacement in sorted(edits, reverse=True):
            line = lines[row - 1]
            lines[row - 1] = line[:col] + replacement + line[end_col if end_row == row else col:]
        return "\n".join(lines)

    def last_significant(self, start: int, end: int) -> int | None:
        for j in range(end - 1, start - 1, -1):
            if self.tokens[j].type not in SKIPPED_TOKENS and self.tokens[j].type != tokens.ENDMARKER:
                return j
        return None

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

    def __init__(self, text: str, clauses: list[_Clause], insertions: list[tuple[int, int]] = ()):
        self.text, self.clauses, self.insertions = text, clauses, list(insertions)
        self.offsets = line_offsets(text)

    def build(self) -> Query:
        self.check_order()
        by_keyword = {c.keyword: c for c in self.clauses}
        where = self.build_expression(by_keyword.get("where"))
        distribution = self.build_distribution(by_keyword.get("distribution"))
        prompt = self.build_prompt(by_keyword["prompt"], where, by_keyword.get("prologue"))
        if distribution is not None and prompt.distribution is not None:
            raise QuerySyntaxError("a query has one distribution; drop the 'distribution' clause or the inline one",
                                   *position(by_keyword["distribution"].keyword_start))
        return Query(
            source=self.text,
            prompt=prompt,
            decoder=self.build_decoder(by_keyword.get("decoder")),
            model=self.build_expression(by_keyword.get("from")),
            where=prompt.where,
            distribution=distribution or prompt.distribution,
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
        """Offset in the rewritten text of a position of the query (each inserted ")" shifts its line)."""
        row, col = pos
        if row - 1 >= len(self.offsets):
            return len(self.text)
        shift = sum(1 for r, c in self.insertions if r == row and c <= col)
        return self.offsets[row - 1] + col + shift

    def build_prompt(self, clause: _Clause, where: Expression | None, prologue: _Clause | None) -> PromptProgram:
        row, col = clause.start
        line_before = self.text[self.offsets[row - 1]:self.offset(clause.start)] if row - 1 < len(self.offsets) else ""
        source, indent = dedent_body(self.body(clause), col, bool(line_before.strip()))
        if not source.strip():
            raise QuerySyntaxError("expected a prompt (a query string)", *position(clause.start))
        before = (self.body(prologue), prologue.start[0]) if prologue is not None else None
        return compile_prompt(source, clause.start[0], indent, query_globals(), where, source_name(self.text), before)

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


def check_inline_body(text: str, keyword: tokenize.TokenInfo, last: tokenize.TokenInfo, name: str) -> None:
    """A prompt statement's where/distribution body must be one expression (errors name where)."""
    offsets = line_offsets(text)
    start = offsets[keyword.end[0] - 1] + keyword.end[1]
    end = offsets[last.end[0] - 1] + last.end[1]
    body = text[start:end]
    if name == "where":
        parse_expression(body, keyword.end, "where")
    elif not body.strip():
        raise QuerySyntaxError("expected 'distribution VAR in [options]'", *position(keyword.start))


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


