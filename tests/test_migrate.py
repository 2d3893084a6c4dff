"""``lmql-backends migrate``: the rewrite rules on text, the file walker on temp dirs, and a migrated
query giving the same result on the new backend as the original did on the legacy backend."""

from __future__ import annotations

import pytest

import lmql_backends as lmql
from lmql_backends.cli import main
from lmql_backends.migrate import MARKER, file_kind, leftover_lines, migrate_path, migrate_text

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("kind, before, after", [
    ("lmql", 'argmax(backend="legacy")\n    "Hi[X]"\n', 'argmax\n    "Hi[X]"\n'),
    ("lmql", "argmax(backend='legacy') \"Hi[X]\"", 'argmax "Hi[X]"'),
    ("lmql", 'sample(n=2, backend="legacy", seed=1) "Hi[X]"', 'sample(n=2, seed=1) "Hi[X]"'),
    ("lmql", 'beam(backend = "legacy", n=3) "Hi[X]"', 'beam(n=3) "Hi[X]"'),
    ("lmql", 'sample(n=2, backend="legacy") "Hi[X]"', 'sample(n=2) "Hi[X]"'),
    ("lmql", 'argmax(chunksize=4) "Hi[X]"', 'argmax(chunksize=4) "Hi[X]"'),
    ("python", "run_sync(q, decoder=\"argmax(backend='legacy')\")", 'run_sync(q, decoder="argmax")'),
    ("python", 'q = """sample(backend=\\"legacy\\", n=2) "x[X]" """', 'q = """sample(n=2) "x[X]" """'),
    ("python", 'd = lmql.argmax(backend="legacy")', "d = lmql.argmax()"),
    ("python", 'd = lmql.sample(n=2, backend="legacy", seed=3)', "d = lmql.sample(n=2, seed=3)"),
    ("python", 'd = make_decoder("beam", backend="legacy", n=2)', 'd = make_decoder("beam", n=2)'),
    ("python", 'backend = "legacy"', 'backend = "legacy"'),
    ("python", 'h = lmql.serve("m", port=0, legacy=True, background=True)',
     'h = lmql.serve("m", port=0, background=True)'),
    ("python", 'run(["lmql-backends", "serve-model", "m", "--legacy"])',
     'run(["lmql-backends", "serve-model", "m"])'),
    ("python", 'os.system("lmql-backends serve-model m --legacy --port 9")',
     'os.system("lmql-backends serve-model m --port 9")'),
    ("shell", "lmql-backends serve-model builtin:tiny --legacy --port 8081 &\n",
     "lmql-backends serve-model builtin:tiny --port 8081 &\n"),
    ("shell", "lmql-backends serve-model m \\\n    --cuda \\\n    --legacy\necho done\n",
     "lmql-backends serve-model m \\\n    --cuda\necho done\n"),
    ("shell", "lmql-backends serve-model m \\\n    --legacy \\\n    --port 1\n",
     "lmql-backends serve-model m \\\n    --port 1\n"),
    ("shell", "some-tool --legacy\n", "some-tool --legacy\n"),
    ("shell", "lmql-backends run 'argmax(backend=\"legacy\") \"Hi[X]\"'\n", "lmql-backends run 'argmax \"Hi[X]\"'\n"),
])
def test_rewrites(kind, before, after):
    assert migrate_text(before, kind).text == after


def test_legacy_urls_get_a_marker_comment_above_the_line():
    text = "#!/bin/sh\n  curl -s http://localhost:8080/results/me\ncurl -d @b http://h:1/queue\n"
    migrated = migrate_text(text, "shell")
    lines = migrated.text.splitlines()
    assert lines[1].startswith(f"  # {MARKER} http://localhost:8080/results/me is the legacy API")
    assert "POST http://localhost:8080/v1/completions" in lines[1] and "MIGRATION.md" in lines[1]
    assert lines[2] == "  curl -s http://localhost:8080/results/me"
    assert lines[3].startswith(f"# {MARKER} http://h:1/queue") and lines[4] == "curl -d @b http://h:1/queue"
    assert [c.rule for c in migrated.changes] == ["legacy endpoint", "legacy endpoint"]


def test_a_url_inside_a_multiline_python_string_is_marked_above_the_string():
    text = 'x = 1\nDOC = """Poll\n    http://127.0.0.1:9000/results/abc\n"""\n'
    lines = migrate_text(text, "python").text.splitlines()
    assert lines[1].startswith(f"# {MARKER} http://127.0.0.1:9000/results/abc")
    assert lines[2] == 'DOC = """Poll'
    compile("\n".join(lines), "<migrated>", "exec")


@pytest.mark.parametrize("kind, text", [
    ("python", 'import lmql\nr = lmql.run_sync(\'argmax(backend="legacy") "Hi[X]"\')\nURL = "http://h:8/queue"\n'),
    ("shell", "lmql-backends serve-model m \\\n  --legacy \\\n  --port 1\ncurl http://h:8/results/x\n"),
    ("lmql", '# from http://h:8/queue\nsample(backend="legacy", n=2) "Hi[X]"\n'),
])
def test_migrating_twice_changes_nothing_more(kind, text):
    once = migrate_text(text, kind)
    assert once.text != text and once.changes
    twice = migrate_text(once.text, kind)
    assert twice.text == once.text and not twice.changes


def test_python_that_does_not_tokenize_keeps_call_parentheses():
    text = 'def broken(:\n    d = "argmax(backend=\'legacy\')"\n'
    assert migrate_text(text, "python").text == 'def broken(:\n    d = "argmax()"\n'


def test_crlf_line_endings_are_kept():
    text = 'argmax(backend="legacy")\r\n    "Hi[X]"\r\n# http://h:1/queue\r\n'
    migrated = migrate_text(text, "lmql").text
    assert migrated.count("\r\n") == migrated.count("\n") == 4 and migrated.startswith("argmax\r\n")


def test_leftovers_are_lines_to_change_by_hand():
    text = 'backend = "legacy"\nopts = {"backend": "legacy"}\nok = 1\npython -m lmql.model.serve gpt2\n'
    assert leftover_lines(text) == [1, 2, 4]


def test_file_kinds(tmp_path):
    files = {"q.lmql": "lmql", "a.py": "python", "s.sh": "shell", "t.bash": "shell", "notes.txt": None}
    for name in files:
        (tmp_path / name).write_text("x\n")
    for shebang, kind in [("#!/bin/bash", "shell"), ("#!/usr/bin/env sh", "shell"), ("#!/usr/bin/env python3", None)]:
        path = tmp_path / f"script-{kind}-{len(shebang)}"
        path.write_text(shebang + "\necho hi\n")
        files[path.name] = kind
    assert {name: file_kind(tmp_path / name) for name in files} == files


def make_project(root):
    (root / "queries").mkdir(parents=True)
    (root / "queries" / "hello.lmql").write_text('argmax(backend="legacy") "Hello[X]" where len(TOKENS(X)) < 4\n')
    (root / "app.py").write_text('import lmql_backends as lmql\nd = lmql.argmax(backend="legacy")\nmode = "legacy"\n')
    (root / "serve").write_text("#!/usr/bin/env bash\nlmql-backends serve-model builtin:tiny --legacy --port 8080\n")
    (root / "notes.txt").write_text('argmax(backend="legacy")\n')
    (root / ".venv").mkdir()
    (root / ".venv" / "lib.py").write_text('d = argmax(backend="legacy")\n')
    (root / "latin1.py").write_bytes('d = "café"  # argmax(backend="legacy")\n'.encode("latin-1"))
    return {path: path.read_bytes() for path in root.rglob("*") if path.is_file()}


def test_dry_run_prints_the_diff_and_changes_nothing(tmp_path, capsys):
    contents = make_project(tmp_path)
    assert main(["migrate", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert {path: path.read_bytes() for path in contents} == contents
    assert "--- a/queries/hello.lmql\n+++ b/queries/hello.lmql\n" in out
    assert '-argmax(backend="legacy") "Hello[X]"' in out and '+argmax "Hello[X]"' in out
    assert "--- a/app.py" in out and "+d = lmql.argmax()" in out
    assert "--- a/serve" in out and "+lmql-backends serve-model builtin:tiny --port 8080" in out
    assert "notes.txt" not in out and ".venv" not in out and "latin1" not in out
    assert "3 file(s) would change: 2 decoder backend, 1 serve-model --legacy (dry run: nothing written)" in out


def test_migrate_rewrites_the_files_then_finds_nothing(tmp_path, capsys):
    contents = make_project(tmp_path)
    assert main(["migrate", str(tmp_path)]) == 0
    assert "3 file(s) changed" in capsys.readouterr().out
    assert (tmp_path / "queries" / "hello.lmql").read_text() == 'argmax "Hello[X]" where len(TOKENS(X)) < 4\n'
    assert (tmp_path / "serve").read_text().endswith("serve-model builtin:tiny --port 8080\n")
    for unchanged in ("notes.txt", ".venv/lib.py", "latin1.py"):
        assert (tmp_path / unchanged).read_bytes() == contents[tmp_path / unchanged]
    assert main(["migrate", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "no legacy-backend usage to rewrite found\n"


def test_lines_to_change_by_hand_are_noted(tmp_path, capsys):
    (tmp_path / "cfg.py").write_text('settings = {"backend": "legacy"}\n')
    assert main(["migrate", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"note: {tmp_path / 'cfg.py'}:1: still selects the legacy backend" in out


def test_a_single_file_can_be_migrated(tmp_path):
    path = tmp_path / "q.lmql"
    path.write_text('beam(n=2, backend="legacy") "Hi[X]"\n')
    [migration] = migrate_path(path)
    assert migration.diff.startswith("--- a/q.lmql\n+++ b/q.lmql\n")
    assert path.read_text() == 'beam(n=2) "Hi[X]"\n'


def test_a_missing_path_is_named(tmp_path, capsys):
    assert main(["migrate", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_a_migrated_query_gives_on_the_new_backend_what_it_gave_on_the_legacy_backend(new_server, legacy_server):
    query = ('sample(n=2, seed=5, backend="legacy")\n    "Hello[X]"\n'
             'from lmql.model("builtin:tiny", endpoint=endpoint)\nwhere STOPS_AT(X, ",") and len(TOKENS(X)) < 6\n')
    migrated = migrate_text(query, "lmql").text
    assert migrated.startswith("sample(n=2, seed=5)\n")
    before = lmql.run_sync(query, endpoint=legacy_server.endpoint)
    after = lmql.run_sync(migrated, endpoint=new_server.endpoint)
    assert [(r.prompt, r.variables) for r in after] == [(r.prompt, r.variables) for r in before]
