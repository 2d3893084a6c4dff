"""``lmql-backends conformance``: the comparison rules, the report, and the command on real servers."""

from __future__ import annotations

import io
import re

import pytest

from lmql_backends import serve
from lmql_backends.cli import main
from lmql_backends.conformance import (
    DEFAULT_SEED, TOLERANCE, BackendTarget, ConformanceCase, ConformanceOptions, ConformanceReport, Outcome,
    ResultView, TokenLogprob, compare_outcomes, decoder_for, first_differing_token, make_targets, run_case,
    run_command,
)
from lmql_backends.language.parser import parse_query

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from lmql_backends.loader import load_tokenizer

    return load_tokenizer(tiny_model)


def outcome(backend: str, *results: ResultView, logprobs=None, error: Exception | None = None) -> Outcome:
    made = Outcome(backend, list(results), logprobs=dict(logprobs or {}))
    if error is not None:
        made.error_type, made.error = type(error).__name__, str(error)
    return made


def view(prompt: str = "Hello there", **variables) -> ResultView:
    return ResultView(prompt, variables, False)


# ---- comparison rules -------------------------------------------------------------------------------

def test_identical_outcomes_have_no_difference(tokenizer):
    a = outcome("in-process", view(X=" there"), logprobs={("top_tokens", b"k", 5): TokenLogprob(3, -1.0)})
    b = outcome("new", view(X=" there"), logprobs={("top_tokens", b"k", 5): TokenLogprob(3, -1.0 + TOLERANCE / 2)})
    assert compare_outcomes(a, b, tokenizer) == []


def test_a_differing_variable_names_its_first_differing_token(tokenizer):
    expected, actual = " she said that the house", " she said that a house"
    [prompt, variable] = compare_outcomes(outcome("in-process", view("A" + expected, X=expected)),
                                          outcome("legacy", view("A" + actual, X=actual)), tokenizer)
    ids_a = tokenizer(expected, add_special_tokens=False).input_ids
    ids_b = tokenizer(actual, add_special_tokens=False).input_ids
    position = next(i for i, (a, b) in enumerate(zip(ids_a, ids_b)) if a != b)
    assert (variable.backend, variable.result, variable.variable, variable.position) == ("legacy", 0, "X", position)
    assert (variable.expected, variable.actual) == (repr(expected), repr(actual))
    assert prompt.variable == "prompt"


def test_first_differing_token_of_a_prefix_is_its_length(tokenizer):
    assert first_differing_token(tokenizer, " the house", " the house was") == len(
        tokenizer(" the house", add_special_tokens=False).input_ids)


def test_distribution_probabilities_are_compared_within_the_tolerance(tokenizer):
    def with_p(p_the: float) -> Outcome:
        return outcome("new", view(X=" a", **{"P(X)": [(" a", 0.6), (" the", p_the)]}))

    reference = with_p(0.4)
    assert compare_outcomes(reference, with_p(0.4 + TOLERANCE / 10), tokenizer) == []
    [difference] = compare_outcomes(reference, with_p(0.401), tokenizer)
    assert (difference.variable, difference.position) == ("P(X)", 1)
    assert difference.expected == repr((" the", 0.4)) and difference.actual == repr((" the", 0.401))


def test_token_logprobs_off_by_more_than_the_tolerance_are_reported_at_their_position(tokenizer):
    key = ("generate(temperature=0.0, top_p=1.0)", b"ctx", 42)
    a = outcome("in-process", view(), logprobs={key: TokenLogprob(17, -2.0)})
    b = outcome("new", view(), logprobs={key: TokenLogprob(17, -2.0 + 3 * TOLERANCE)})
    [difference] = compare_outcomes(a, b, tokenizer)
    assert (difference.variable, difference.position) == ("token logprob (generate)", 17)
    assert difference.expected == "-2.000000" and difference.actual == "-1.999700"


def test_a_query_must_fail_on_every_backend_or_on_none(tokenizer):
    from lmql_backends.errors import BackendResponseError, ContextLengthError

    failed = outcome("in-process", error=ContextLengthError("too long"))
    assert compare_outcomes(failed, outcome("new", error=ContextLengthError("too long")), tokenizer) == []
    assert compare_outcomes(failed, outcome("legacy", error=BackendResponseError("HTTP 400")), tokenizer) == []
    [difference] = compare_outcomes(failed, outcome("legacy", view()), tokenizer)
    assert (difference.variable, difference.expected, difference.actual) == (
        "error", "ContextLengthError", "1 result(s)")


def test_a_different_number_of_results_is_one_difference(tokenizer):
    [difference] = compare_outcomes(outcome("in-process", view(), view()), outcome("new", view()), tokenizer)
    assert (difference.variable, difference.expected, difference.actual) == ("number of results", "2", "1")


def test_exit_code_says_agree_differ_or_failed(tokenizer):
    from lmql_backends.conformance import CaseReport, Difference

    case = ConformanceCase("q", '"a[X]"')
    agree = CaseReport(case, {"in-process": outcome("in-process", view())}, [], {})
    differ = CaseReport(case, {"in-process": outcome("in-process", view())},
                        [Difference("new", 0, "X", 0, "'a'", "'b'")], {})
    failed = CaseReport(case, {"in-process": outcome("in-process", error=ValueError("x"))}, [], {})
    assert [ConformanceReport(c).exit_code for c in ([agree], [agree, differ], [agree, failed])] == [0, 1, 2]


def test_sample_without_a_seed_is_pinned_and_the_backend_argument_replaced():
    target = BackendTarget("legacy", None, "legacy")
    unseeded = decoder_for(parse_query('sample(n=2) "a[X]"'), target, {})
    assert (unseeded.seed, unseeded.n, unseeded.backend) == (DEFAULT_SEED, 2, "legacy")
    seeded = decoder_for(parse_query('sample(seed=5, backend="legacy") "a[X]"'), BackendTarget("new", None), {})
    assert (seeded.seed, seeded.backend) == (5, None)


# ---- foreign servers (--foreign; the real one: tests/engine/test_upstream_vllm.py) --------------------

def test_on_a_foreign_server_only_the_values_of_sample_queries_differ_as_expected(tokenizer):
    from lmql_backends.conformance import CaseReport, Difference, format_report, is_expected_on_foreign

    sampled, greedy = ConformanceCase("s", 'sample(seed=1) "a[X]"'), ConformanceCase("g", 'argmax "a[X]"')
    value, logprob = Difference("new", 0, "X", 0, "'a'", "'b'"), Difference("new", None, "token logprob", 3, "-1", "-2")
    assert is_expected_on_foreign(sampled, value)
    assert not is_expected_on_foreign(sampled, logprob)  # the same call must score the same anywhere
    assert not is_expected_on_foreign(greedy, value)
    reference = {"in-process": outcome("in-process", view()), "new": outcome("new", view())}
    expected_only = ConformanceReport([CaseReport(sampled, reference, [], {}, [value])], ("in-process", "new"))
    assert expected_only.exit_code == 0
    text = format_report(expected_only)
    assert "Expected differences on a foreign server" in text and "expected (1)" in text
    assert text.endswith("0 of 1 queries agree on in-process, new; 1 differ as expected on a foreign server (seeded sampling)")


def test_a_server_is_foreign_when_its_models_are_not_owned_by_lmql_backends(new_server):
    from lmql_backends.conformance import is_foreign_server

    assert not is_foreign_server(new_server.endpoint)


# ---- the command on real servers -----------------------------------------------------------------------

def write_queries(folder) -> list[str]:
    folder.mkdir(exist_ok=True)
    (folder / "hello.lmql").write_text(
        'argmax "Hello[WHO]" from "gpt2" where STOPS_AT(WHO, ",") and len(TOKENS(WHO)) < 6\n')
    (folder / "sample.lmql").write_text(
        'sample(n=2)\n    "It was[X] and[Y]"\nwhere\n    len(TOKENS(X)) < 4 and len(TOKENS(Y)) < 3\n')
    return [str(folder / "hello.lmql"), str(folder / "sample.lmql")]


def test_command_starts_its_servers_and_reports_agreement(tmp_path, capsys):
    files = write_queries(tmp_path / "queries")
    assert main(["conformance", str(tmp_path / "queries")]) == 0
    out, err = capsys.readouterr()
    assert "started the new backend on 127.0.0.1:" in err and "started the legacy backend on 127.0.0.1:" in err
    for number, name in enumerate(files, 1):
        assert re.search(rf"\[{number}/2\] {re.escape(name)} .*in-process ok.*new ok.*legacy ok.*=> agree", err)
        assert re.search(rf"^{re.escape(name)}\s+\d result\(s\)\s+agree \(\d+ lp\)\s+agree \(\d+ lp\)$", out, re.M)
    assert "all 2 queries agree on in-process, new, legacy" in out
    assert "loaded builtin:tiny" not in out  # server start-up lines go with the progress, not the report


def test_command_uses_the_given_endpoints(tmp_path, capsys, new_server, legacy_server):
    files = write_queries(tmp_path / "queries")
    before = legacy_server.state.engine.stats().num_prompt_tokens
    argv = ["conformance", "--endpoint", new_server.endpoint, "--legacy-endpoint", legacy_server.endpoint, files[0]]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "started" not in err and f"new backend: {new_server.endpoint}" in err
    assert legacy_server.state.engine.stats().num_prompt_tokens > before
    assert "all 1 queries agree" in out


@pytest.fixture(scope="module")
def impostor_server(llama_model_dir):
    """A new-API server that answers to 'builtin:tiny' but runs the random Llama model."""
    handle = serve(llama_model_dir, port=0, background=True, served_model_names=("builtin:tiny",))
    yield handle
    handle.stop()


async def test_a_backend_running_another_model_differs_at_the_first_token(impostor_server, legacy_server, tokenizer):
    case = ConformanceCase("hello", 'argmax "Hello[X]" where len(TOKENS(X)) < 5')
    targets = make_targets("builtin:tiny", impostor_server.endpoint, legacy_server.endpoint)
    report = await run_case(case, targets, tokenizer)
    expected = report.outcomes["in-process"].results[0].variables["X"]
    actual = report.outcomes["new"].results[0].variables["X"]
    assert expected != actual
    [difference] = [d for d in report.differences if d.variable == "X"]
    assert difference.backend == "new" and difference.position == first_differing_token(tokenizer, expected, actual)
    assert (difference.expected, difference.actual) == (repr(expected), repr(actual))
    assert not [d for d in report.differences if d.backend == "legacy"]


def test_command_exits_1_and_prints_the_differences(tmp_path, impostor_server, legacy_server):
    files = write_queries(tmp_path / "queries")
    out, log = io.StringIO(), io.StringIO()
    options = ConformanceOptions("builtin:tiny", impostor_server.endpoint, legacy_server.endpoint, (files[0],))
    assert run_command(options, out, log) == 1
    text = out.getvalue()
    assert re.search(rf"^{re.escape(files[0])}\s+1 result\(s\)\s+DIFFER \(\d\)\s+agree", text, re.M)
    assert re.search(rf"^{re.escape(files[0])}\s+new\s+0\s+WHO\s+\d+\s+'", text, re.M)
    assert "Differences" in text and re.search(r"difference\(s\) in 1 of 1 queries", text)
    assert "=> DIFFER" in log.getvalue()


def test_a_query_failing_everywhere_exits_2(tmp_path, new_server, legacy_server, capsys):
    broken = tmp_path / "broken.lmql"
    broken.write_text('argmax "It was[X" where len(TOKENS(X)) < 3\n')
    argv = ["conformance", "--endpoint", new_server.endpoint, "--legacy-endpoint", legacy_server.endpoint, str(broken)]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert "=> FAILED everywhere" in err
    assert f"{broken} [every backend]: QuerySyntaxError" in out


def test_a_missing_file_is_named(tmp_path, capsys):
    assert main(["conformance", str(tmp_path / "nope.lmql")]) == 2
    assert "nope.lmql" in capsys.readouterr().err
