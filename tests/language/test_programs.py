"""The LMQL language corpus (tests/language/programs/*.lmql), run on the three backends.

Each program names its checks in ``# check: EXPR`` comments (EXPR sees `prompt`, `variables`
and `value`, the program's return value) and its inputs in ``# inputs: {...}``. Every program
runs on builtin:tiny in-process, over the new API and over the legacy API; the three give the
same prompt, variables and return value, and the checks hold.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import lmql_backends as lmql
from lmql_backends.errors import InvalidRequestError, QuerySyntaxError
from lmql_backends.language.parser import file_inputs
from lmql_backends.runtime.api import execute, run_until_complete

pytestmark = pytest.mark.timeout(600)

PROGRAMS = sorted((Path(__file__).parent / "programs").glob("*.lmql"))


def header(text: str, key: str) -> list[str]:
    prefix = f"# {key}:"
    return [line.strip()[len(prefix):].strip() for line in text.splitlines() if line.strip().startswith(prefix)]


def run_program(path: Path, model=None, backend=None):
    text = path.read_text(encoding="utf-8")
    inputs = file_inputs(text, path.name)
    decoder = lmql.argmax(backend=backend) if "distribution" not in text else None
    if decoder is None and backend is not None:
        decoder = lmql.argmax(backend=backend)
    return run_until_complete(lambda: execute(text, model=model or "local:builtin:tiny", decoder=decoder, **inputs))


def plain(result):
    return result.prompt, result.variables, result.return_value


@pytest.fixture(scope="module")
def in_process():
    return {path.name: run_program(path) for path in PROGRAMS}


@pytest.mark.parametrize("path", PROGRAMS, ids=lambda p: p.stem)
def test_program_runs_in_process_and_its_checks_hold(path, in_process):
    result = in_process[path.name]
    checks = header(path.read_text(encoding="utf-8"), "check")
    assert checks, f"{path.name} has no '# check:' line"
    scope = {"prompt": result.prompt, "variables": result.variables, "value": result.return_value}
    for check in checks:
        assert eval(check, scope), (check, plain(result))  # noqa: S307 - the corpus's own checks


@pytest.mark.parametrize("server", ["new_server", "legacy_server"])
def test_servers_agree_with_in_process(server, in_process, request):
    handle = request.getfixturevalue(server)
    model = lmql.model("builtin:tiny", endpoint=handle.endpoint)
    backend = "legacy" if server == "legacy_server" else None
    for path in PROGRAMS:
        result = run_program(path, model, backend)
        expected = in_process[path.name]
        if "P(ANSWER)" in expected.variables:  # probabilities agree up to float noise
            for key in ("P(ANSWER)", "log P(ANSWER)"):
                assert [o for o, _ in result.variables.pop(key)] == [o for o, _ in expected.variables[key]]
            expected = type(expected)(expected.prompt, {k: v for k, v in expected.variables.items() if "P(" not in k},
                                      return_value=expected.return_value)
        assert plain(result) == plain(expected), path.name


def test_run_gives_the_return_value_and_run_file_prints_it(tmp_path, capsys):
    from lmql_backends.cli import main

    assert lmql.run_sync('"x[X]" where len(TOKENS(X)) < 2\nreturn 41 + 1') == 42
    path = tmp_path / "q.lmql"
    path.write_text('"Hello[WHO]" where len(TOKENS(WHO)) < 3\nreturn WHO.upper()\n')
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Hello") and "return value:" in out


@pytest.mark.parametrize("query, fragment", [
    ('argmax "Q [A]" from "openai/text-davinci-003"', "'openai/text-davinci-003' is an OpenAI model"),
    ('"Q [A]" from "chatgpt"', "model=lmql.model"),
    ('argmax "Q [A]" from lmql.model("openai/gpt-3.5-turbo-instruct")', "local:NAME"),
])
def test_openai_models_are_named_with_the_way_out(query, fragment):
    with pytest.raises(InvalidRequestError, match=fragment) as info:
        lmql.run_sync(query)
    assert not isinstance(info.value, QuerySyntaxError)


def test_lmql_only_imports_name_what_is_missing():
    with pytest.raises(InvalidRequestError, match="lmql.demo import gsm8k_samples"):
        lmql.run_sync('from lmql.demo import gsm8k_samples\n"{gsm8k_samples()}[X]"')


def test_undefined_names_say_how_to_pass_them():
    with pytest.raises(InvalidRequestError, match=r"pass it as an input \(run\(query, question=...\)\)"):
        lmql.run_sync('"Q: {question} [A]" where len(TOKENS(A)) < 2')


def test_statement_where_applies_to_its_own_holes_only():
    """LMQL's reference: the constraint of "Hello, [NAME]!" does not apply to "Another [NAME]"."""
    result = lmql.run_sync('"Hello,[NAME]" where len(TOKENS(NAME)) == 1\n"Another[NAME]" where len(TOKENS(NAME)) == 3')
    first, second = result.prompt.split("Another")
    tokenizer = lmql.runtime.models.shared_tokenizer("builtin:tiny")
    assert len(tokenizer(second, add_special_tokens=False).input_ids) == 3
    assert result.variables["NAME"] == second


def test_query_function_from_python_sync_and_async():
    @lmql.query
    def greet(name):
        '''lmql
        "Hello {name},[X]" where len(TOKENS(X)) < 3
        return name + X
        '''

    value = greet("Ann")
    assert isinstance(value, str) and value.startswith("Ann")
    assert asyncio.run(greet.call("Ann")) == value


def test_conformance_command_takes_the_corpus_with_its_inputs(new_server, legacy_server, capsys):
    """`lmql-backends conformance FILES` runs every corpus program (with its ``# inputs:``) on the three backends."""
    from lmql_backends.cli import main

    argv = ["conformance", "--endpoint", new_server.endpoint, "--legacy-endpoint", legacy_server.endpoint,
            *map(str, PROGRAMS)]
    assert main(argv) == 0
    assert f"all {len(PROGRAMS)} queries agree" in capsys.readouterr().out


def test_a_bad_inputs_line_is_named():
    with pytest.raises(QuerySyntaxError, match=r"q.lmql: '# inputs:' must be followed by a Python dict literal"):
        file_inputs('# inputs: person="Ann"\n"Hi {person}"', "q.lmql")
    assert file_inputs('# inputs: {"person": "Ann"}\n"Hi {person}"') == {"person": "Ann"}


@pytest.mark.parametrize("decoder", ["beam_var", "var", "best_k", "beam_sample"])
def test_lmql_decoders_not_implemented_are_named_with_those_that_exist(decoder):
    for query, kwargs in ((f'{decoder}(n=2) "x[X]" where len(TOKENS(X)) < 2', {}),
                          ('"x[X]" where len(TOKENS(X)) < 2', {"decoder": f"{decoder}(n=2)"})):
        with pytest.raises(InvalidRequestError, match=rf"decoder '{decoder}' is an LMQL decoder \(.*\), which "
                                                      r"lmql-backends does not implement; use argmax, sample"):
            lmql.run_sync(query, **kwargs)


INNER_CALLS = '''
@lmql.query
def word():
    \'\'\'lmql
    "One word:[W]" where len(TOKENS(W)) < 3
    return W
    \'\'\'
summarize = lmql.F("Summary:[S]", "len(TOKENS(S)) < 3")
"no holes here"
return word(), summarize()
'''


@pytest.mark.parametrize("server", ["new_server", "legacy_server"])
def test_query_functions_called_in_a_query_run_on_the_callers_model_and_backend(server, request):
    """The outer query generates nothing: every token the server computes is for the inner calls."""
    handle = request.getfixturevalue(server)
    engine = handle.state.engine
    backend = "legacy" if server == "legacy_server" else None
    before = engine.stats().num_prompt_tokens
    remote = lmql.run_sync(INNER_CALLS, model=lmql.model("builtin:tiny", endpoint=handle.endpoint),
                           decoder=lmql.argmax(backend=backend))
    assert engine.stats().num_prompt_tokens > before
    assert remote == lmql.run_sync(INNER_CALLS, model="local:builtin:tiny")


def test_streaming_decorators_see_every_token_whatever_the_chunk_size():
    query = (PROGRAMS[0].parent / "streaming_decorators.lmql").read_text()
    chunked = lmql.run_sync(query, decoder="argmax(chunksize=16)")["seen"]
    assert chunked == lmql.run_sync(query, decoder="argmax(chunksize=1)")["seen"]
    assert len(chunked) >= 3 and chunked[-1] == chunked[-2]


def test_an_async_check_on_the_variable_being_generated_says_it_cannot_wait():
    query = 'async def ok(x):\n    return True\n"Hi[X]" where len(TOKENS(X)) < 3 and ok(X)'
    with pytest.raises(InvalidRequestError, match=r"ok\(X\) in the where clause is async and depends on the variable"):
        lmql.run_sync(query)


def test_a_failing_where_call_names_the_variable_it_was_for():
    query = 'def boom():\n    raise ValueError("no options")\n"Hi[X]" where X in boom()'
    with pytest.raises(InvalidRequestError, match=r"failed while X starts: ValueError: no options"):
        lmql.run_sync(query)
