"""``lmql-backends migrate PATH [--dry-run]``: rewrite legacy-backend usage for the new backend.

Pure functions on text (`migrate_text`) plus a thin file walker (`migrate_path`). Files looked at
under PATH: ``.lmql`` (queries), ``.py`` and shell scripts (``.sh``, ``.bash``, or any file whose
first line is a ``sh``/``bash``/``zsh``/``dash``/``ksh`` shebang). Version-control, virtualenv and
cache folders are skipped. The rewrites:

1. **Decoder argument** ``backend="legacy"`` (either quote, also ``backend=\\"legacy\\"`` inside a
   Python string): removed, other arguments kept — ``sample(n=2, backend="legacy")`` →
   ``sample(n=2)``. A decoder clause left with empty parentheses loses them
   (``argmax(backend="legacy") "..."`` → ``argmax "..."``) in query text: ``.lmql`` files, shell
   scripts and Python string literals. In Python code a call keeps its parentheses
   (``lmql.argmax(backend="legacy")`` → ``lmql.argmax()``).
2. **Server flag**: on a ``serve-model`` command (also continued over ``\\`` lines, and in a Python
   argument list) ``--legacy`` is removed; in Python, ``serve(..., legacy=True)`` loses ``legacy=True``.
3. **Legacy endpoint URLs** (``http://HOST:PORT/queue``, ``http://HOST:PORT/results/...``) are not
   rewritten, because the payloads differ (token ids and logits vs. completions); a marker comment
   is put on the line above, pointing to ``POST http://HOST:PORT/v1/completions`` and the migration
   guide. In Python the comment goes above the line where a multi-line string starts.

Running it twice changes nothing the second time.
"""

from __future__ import annotations

import bisect
import dataclasses
import difflib
import io
import pathlib
import re
import sys
import tokenize
from typing import Callable, Iterator, TextIO

from .errors import InvalidRequestError

KINDS = ("lmql", "python", "shell")
SUFFIX_KINDS = {".lmql": "lmql", ".py": "python", ".sh": "shell", ".bash": "shell"}
SKIPPED_DIRS = frozenset({
    ".git", ".hg", ".svn", "__pycache__", "node_modules", ".venv", "venv", ".tox", ".nox",
    ".mypy_cache", ".pytest_cache", ".ruff_cache", ".eggs", "build", "dist",
})
SHELL_SHEBANG = re.compile(r"^#!\s*\S*/(?:env\s+)?(?:ba|z|da|k)?sh\b")
MARKER = "lmql-backends migrate:"
GUIDE = "migration/MIGRATION.md"

QUOTE = r"""\\?["']"""
BACKEND_ARG = rf"backend\s*=\s*{QUOTE}legacy{QUOTE}"
LEGACY_TRUE = r"legacy\s*=\s*True"
DECODER_CALL = re.compile(r"(?<![\w.])(?P<name>argmax|sample|beam)\((?P<args>[^()]*)\)")
SERVE_CALL = re.compile(r"(?<![\w])(?P<name>(?:\w+\.)*serve)\((?P<args>[^()]*)\)")
LEGACY_URL = re.compile(r"""(?P<base>https?://[^\s"'/]+)/(?:queue|results)\b[^\s"')]*""")
LEFTOVER = re.compile(r"""backend["']?\s*[:=]\s*\\?["']legacy\\?["']|lmql\.model\.serve\b""")
LEGACY_FLAGS = (
    re.compile(r"""\s*,\s*(["'])--legacy\1"""),          # ["serve-model", "m", "--legacy"]
    re.compile(r"""(["'])--legacy\1\s*,\s*"""),          # ["--legacy", "--port", "1"]
    re.compile(r"""(?:^|[ \t]+)--legacy(?=[\s"';&|)]|$)"""),  # serve-model m --legacy --port 1
)


@dataclasses.dataclass(frozen=True)
class Change:
    """One rewrite: which rule, and the text it applied to."""

    rule: str
    before: str


@dataclasses.dataclass(frozen=True)
class Migration:
    """The migrated text and what changed."""

    text: str
    changes: tuple[Change, ...] = ()

    def then(self, rewrite: Callable[[str], "Migration"]) -> "Migration":
        """Apply another rewrite to the text, keeping every change."""
        result = rewrite(self.text)
        return Migration(result.text, self.changes + result.changes)


# ---- rule 1: the decoder argument backend="legacy" ------------------------------------------------

def remove_keyword(arguments: str, keyword: str) -> str:
    """Remove every ``keyword`` argument from the text between a call's parentheses."""
    text = re.sub(rf"\s*,\s*{keyword}(?=\s*(?:,|$))", "", arguments)
    return re.sub(rf"^\s*{keyword}\s*(?:,\s*)?", "", text)


def remove_keyword_in_calls(text: str, keyword: str, rule: str, drop_empty: bool,
                            call: re.Pattern = DECODER_CALL) -> Migration:
    """Remove `keyword` arguments inside calls matched by `call`; optionally drop ``()`` left empty."""
    changes = []

    def rewrite(match: re.Match) -> str:
        arguments = match["args"]
        if not re.search(keyword, arguments):
            return match[0]
        changes.append(Change(rule, match[0]))
        remaining = remove_keyword(arguments, keyword)
        if drop_empty and not remaining.strip():
            return match["name"]
        return f"{match['name']}({remaining})"

    return Migration(call.sub(rewrite, text), tuple(changes))


def remove_keyword_arguments(text: str, keyword: str, rule: str) -> Migration:
    """Remove `keyword` wherever it is a keyword argument (after ``(`` or ``,``) of any call."""
    changes: list[Change] = []

    def removed(replacement: str) -> Callable[[re.Match], str]:
        def replace(match: re.Match) -> str:
            changes.append(Change(rule, match[0].strip(" \t\n,(")))
            return replacement
        return replace

    text = re.sub(rf"\s*,\s*{keyword}(?=\s*[,)])", removed(""), text)
    text = re.sub(rf"\(\s*{keyword}\s*(?:,\s*)?", removed("("), text)
    return Migration(text, tuple(changes))


def rewrite_query_text(text: str) -> Migration:
    """Rule 1 in query text: remove ``backend="legacy"``, and the decoder's ``()`` if left empty."""
    return (Migration(text)
            .then(lambda t: remove_keyword_in_calls(t, BACKEND_ARG, "decoder backend", drop_empty=True))
            .then(lambda t: remove_keyword_arguments(t, BACKEND_ARG, "decoder backend")))


def rewrite_python_code(text: str) -> Migration:
    """Rules 1 and 2 in Python: query strings as query text, then keyword arguments of calls."""
    return (Migration(text)
            .then(rewrite_python_strings)
            .then(lambda t: remove_keyword_arguments(t, BACKEND_ARG, "decoder backend"))
            .then(lambda t: remove_keyword_in_calls(t, LEGACY_TRUE, "serve legacy=True", False, SERVE_CALL)))


def rewrite_python_strings(text: str) -> Migration:
    """Apply `rewrite_query_text` inside every string literal (tokenized, so code is left alone)."""
    spans = string_spans(text)
    changes: list[Change] = []
    for start, end in reversed(spans):
        result = rewrite_query_text(text[start:end])
        text = text[:start] + result.text + text[end:]
        changes = list(result.changes) + changes
    return Migration(text, tuple(changes))


def string_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) offsets of the string literals of Python source; [] if it does not tokenize."""
    offsets = line_offsets(text)
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return []
    return [(offsets[t.start[0] - 1] + t.start[1], offsets[t.end[0] - 1] + t.end[1])
            for t in tokens if t.type == tokenize.STRING]


def split_lines(text: str) -> list[str]:
    """The lines of `text` with their endings, split after ``\\n`` only (as tokenize does)."""
    return io.StringIO(text, newline="\n").readlines()


def line_offsets(text: str) -> list[int]:
    """The offset where each line starts."""
    offsets = [0]
    for line in split_lines(text):
        offsets.append(offsets[-1] + len(line))
    return offsets


# ---- rule 2: serve-model --legacy ---------------------------------------------------------------------

def remove_legacy_flag(text: str) -> Migration:
    """Remove ``--legacy`` from ``serve-model`` commands (continuation lines included)."""
    lines, changes = [], []
    in_command = False
    for line in split_lines(text):
        body = line.rstrip("\r\n")
        in_command = in_command or "serve-model" in body
        new = strip_legacy_flag(body) if in_command else body
        if new == body:
            lines.append(line)
        else:
            changes.append(Change("serve-model --legacy", body.strip()))
            lines += keep_line(lines, line[len(body):], new, body)
        in_command = in_command and body.endswith("\\")
    return Migration("".join(lines), tuple(changes))


def strip_legacy_flag(body: str) -> str:
    """The line without its ``--legacy`` flag (plain, or as an element of a Python list)."""
    for pattern in LEGACY_FLAGS:
        body = pattern.sub("", body)
    return body


def keep_line(previous: list[str], ending: str, new: str, old: str) -> list[str]:
    """The rewritten line, or nothing when only a continuation (or nothing) is left of it."""
    if new.strip() not in ("", "\\"):
        return [new + ending]
    if new.strip() == "" and not old.rstrip().endswith("\\") and previous:
        previous[-1] = re.sub(r"[ \t]*\\(\r?\n)$", r"\1", previous[-1])  # the command now ends one line earlier
    return []


# ---- rule 3: legacy endpoint URLs -------------------------------------------------------------------

def mark_legacy_urls(text: str, anchor_lines: dict[int, int] | None = None) -> Migration:
    """Put a marker comment above every line with a legacy endpoint URL (once).

    `anchor_lines` maps a line index to the index of the line the comment must go above instead
    (where a multi-line string starts).
    """
    lines = split_lines(text)
    anchors = anchor_lines or {}
    comments: dict[int, str] = {}
    changes = []
    for index, line in enumerate(lines):
        match = LEGACY_URL.search(line)
        if match is None or MARKER in line:
            continue
        target = anchors.get(index, index)
        if target in comments or (target > 0 and MARKER in lines[target - 1]):
            continue
        comments[target] = marker_comment(lines[target], match)
        changes.append(Change("legacy endpoint", match[0]))
    for target in sorted(comments, reverse=True):
        lines.insert(target, comments[target])
    return Migration("".join(lines), tuple(changes))


def marker_comment(line: str, match: re.Match) -> str:
    indent = re.match(r"[ \t]*", line)[0]
    ending = "\r\n" if line.endswith("\r\n") else "\n"
    return (f"{indent}# {MARKER} {match[0]} is the legacy API; the new backend serves "
            f"POST {match['base']}/v1/completions (see {GUIDE}){ending}")


def string_start_lines(text: str) -> dict[int, int]:
    """For each line inside a multi-line Python string, the line (0-based) where the string starts."""
    offsets = line_offsets(text)
    anchors = {}
    for start, end in string_spans(text):
        first = line_index(offsets, start)
        for index in range(first + 1, line_index(offsets, end) + 1):
            anchors[index] = first
    return anchors


def line_index(offsets: list[int], offset: int) -> int:
    """The 0-based line of `offset`, given the start offset of every line."""
    return bisect.bisect_right(offsets, offset) - 1


# ---- one text, one file, a tree ---------------------------------------------------------------------

def migrate_text(text: str, kind: str) -> Migration:
    """Every rewrite for a file of `kind` (``lmql``, ``python`` or ``shell``)."""
    if kind not in KINDS:
        raise InvalidRequestError(f"unknown file kind {kind!r}; use one of {', '.join(KINDS)}", "kind")
    rewrite = rewrite_python_code if kind == "python" else rewrite_query_text
    migration = Migration(text).then(rewrite).then(remove_legacy_flag)
    anchors = string_start_lines(migration.text) if kind == "python" else None
    return migration.then(lambda t: mark_legacy_urls(t, anchors))


def file_kind(path: pathlib.Path) -> str | None:
    """``lmql``, ``python`` or ``shell`` by suffix or shebang; None for other files."""
    if path.suffix in SUFFIX_KINDS:
        return SUFFIX_KINDS[path.suffix]
    try:
        with path.open("rb") as stream:
            first = stream.readline(256).decode("utf-8", errors="replace")
    except OSError:
        return None
    return "shell" if SHELL_SHEBANG.match(first) else None


def find_files(root: pathlib.Path) -> Iterator[tuple[pathlib.Path, str]]:
    """Every file under `root` (or `root` itself) that migrate looks at, with its kind, sorted."""
    if root.is_file():
        kind = file_kind(root)
        if kind is not None:
            yield root, kind
        return
    for path in sorted(root.iterdir()):
        if path.is_dir() and not path.is_symlink():
            if path.name not in SKIPPED_DIRS:
                yield from find_files(path)
        elif path.is_file():
            yield from find_files(path)


def leftover_lines(text: str) -> list[int]:
    """1-based lines that still look like legacy usage migrate cannot rewrite safely
    (``backend = "legacy"`` assigned to a name or a dict key, the original ``lmql.model.serve``)."""
    return [number for number, line in enumerate(split_lines(text), 1) if LEFTOVER.search(line)]


@dataclasses.dataclass(frozen=True)
class FileMigration:
    """One file that migrate changes (or would change), or that needs a look by hand."""

    path: pathlib.Path
    diff: str
    changes: tuple[Change, ...]
    leftovers: tuple[int, ...] = ()


def read_text(path: pathlib.Path) -> str | None:
    """The file's text with its line endings kept; None if it is not UTF-8."""
    try:
        with path.open(encoding="utf-8", newline="") as stream:
            return stream.read()
    except UnicodeDecodeError:
        return None


def make_diff(before: str, after: str, name: str) -> str:
    lines = difflib.unified_diff(split_lines(before), split_lines(after),
                                 fromfile=f"a/{name}", tofile=f"b/{name}")
    return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in lines)


def migrate_path(root: str | pathlib.Path, dry_run: bool = False) -> list[FileMigration]:
    """Migrate every file under `root`; with `dry_run` only compute the diffs."""
    root = pathlib.Path(root)
    if not root.exists():
        raise InvalidRequestError(f"path {str(root)!r} does not exist; pass a file or a folder to migrate", "path")
    migrations = []
    for path, kind in find_files(root):
        migration = migrate_file(path, kind, display_name(path, root), dry_run)
        if migration is not None:
            migrations.append(migration)
    return migrations


def migrate_file(path: pathlib.Path, kind: str, name: str, dry_run: bool) -> FileMigration | None:
    """Rewrite one file (unless `dry_run`); None when there is nothing to change or to look at."""
    before = read_text(path)
    if before is None:
        return None
    result = migrate_text(before, kind)
    leftovers = tuple(leftover_lines(result.text))
    if result.text == before and not leftovers:
        return None
    if result.text != before and not dry_run:
        with path.open("w", encoding="utf-8", newline="") as stream:
            stream.write(result.text)
    return FileMigration(path, make_diff(before, result.text, name), result.changes, leftovers)


def display_name(path: pathlib.Path, root: pathlib.Path) -> str:
    return str(path.relative_to(root)) if root.is_dir() else path.name


def format_summary(migrations: list[FileMigration], dry_run: bool) -> str:
    """Notes for lines to change by hand, then ``2 file(s) changed: 4 decoder backend, ...``."""
    notes = [f"note: {m.path}:{line}: still selects the legacy backend; change it by hand (see {GUIDE})"
             for m in migrations for line in m.leftovers]
    changed = [m for m in migrations if m.changes]
    if not changed:
        return "\n".join(notes + ["no legacy-backend usage to rewrite found"])
    counts: dict[str, int] = {}
    for change in (c for m in changed for c in m.changes):
        counts[change.rule] = counts.get(change.rule, 0) + 1
    verb = "would change" if dry_run else "changed"
    details = ", ".join(f"{n} {rule}" for rule, n in counts.items())
    summary = f"{len(changed)} file(s) {verb}: {details}" + (" (dry run: nothing written)" if dry_run else "")
    return "\n".join(notes + [summary])


def run_command(path: str, dry_run: bool, out: TextIO | None = None) -> int:
    """``lmql-backends migrate``: print each file's unified diff and a summary; 0 unless PATH is bad."""
    out = out or sys.stdout
    migrations = migrate_path(path, dry_run)
    for migration in migrations:
        out.write(migration.diff)
    out.write(format_summary(migrations, dry_run) + "\n")
    return 0
