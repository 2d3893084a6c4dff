"""Queries end to end on the embedded model, in-process (``local:builtin:tiny``)."""

import asyncio

import pytest

import lmql_backends as lmql
from lmql_backends.sampling import SamplingParams
from lmql_backends.errors import ConstraintError, InvalidRequestError, QuerySyntaxError
from lmql_backends.runtime.api import score_sync
from lmql_backends.runtime.models import make_client

pytestmark = pytest.mark.timeout(120)

MODEL = "local:builtin:tiny"
HEADLINE = 'argmax "Hello[WHO]" from "local:builtin:tiny" where STOPS_AT(WHO, "\\n") and len(TOKENS(WHO)) < 10'


@pytest.fixture(scope="module")
def client():
    return make_client(MODEL)


def greedy_tokens(client, prompt, n, allow_eos=False):
    """The first `n` greedy tokens after `prompt`, straight from the client (no query runtime)."""
    import torch

    ids = [client.bos_token_id] + client.tokenizer(prompt, add_special_tokens=False).input_ids
    mask = torch.ones(client.num_tokens, dtype=torch.bool)
    mask[client.eos_token_id] = allow_eos
    choices = asyncio.run(client.generate(ids, mask, n, SamplingParams()))
    return [c.token_id for c in choices]


def test_headline_query(client):
    result = lmql.run_sync(HEADLINE)
    value = result.variables["WHO"]
    assert result.prompt == "Hello" + value
    assert value and "\n" not in value[:-1]
    generated = greedy_tokens(client, "Hello", 9, allow_eos=True)
    eos = client.eos_token_id
    expected = generated[:generated.index(eos)] if eos in generated else generated
    text = client.tokenizer.decode(expected)
    assert value == (text[:text.index("\n") + 1] if "\n" in text else text)


def test_token_count_exactly(client):
    result = lmql.run_sync('"She said:[X]" where len(TOKENS(X)) == 5')
    assert result.variables["X"] == client.tokenizer.decode(greedy_tokens(client, "She said:", 5))


def test_stops_at_keeps_and_stops_before_drops(client):
    kept = lmql.run_sync('"Hello[X]" where STOPS_AT(X, " the") and len(TOKENS(X)) < 30').variables["X"]
    dropped = lmql.run_sync('"Hello[X]" where STOPS_BEFORE(X, " the") and len(TOKENS(X)) < 30').variables["X"]
    assert kept.endswith(" the") and kept.count(" the") == 1
    assert dropped == kept[:-len(" the")]


def test_options(client):
    options = [" them", " all", " the world"]
    result = lmql.run_sync('"The best of[X]" where X in options', options=options)
    assert result.variables["X"] in options
    assert result.prompt == "The best of" + result.variables["X"]


def test_equals_forces_a_literal():
    result = lmql.run_sync('"Dear[X], I write" where X == " Mr. Darcy"')
    assert result.variables["X"] == " Mr. Darcy"
    assert result.prompt == "Dear Mr. Darcy, I write"


def test_multibyte_characters_survive_split_tokens(client):
    literal = " Ça va, café — naïve “quotes”"
    pieces = [client.tokenizer.decode([t]) for t in client.tokenizer(literal, add_special_tokens=False).input_ids]
    assert any("\ufffd" in piece for piece in pieces)  # some character is split across tokens
    result = lmql.run_sync('"She said[X]" where X == literal', literal=literal)
    assert result.variables["X"] == literal and result.prompt == "She said" + literal


def test_int_value_is_an_int():
    result = lmql.run_sync('"Her age was[N: int] years" where len(TOKENS(N)) < 4')
    value = result.variables["N"]
    assert isinstance(value, int)
    assert result.prompt.startswith("Her age was") and result.prompt.endswith(" years")
    assert str(value) in result.prompt


def test_int_function_form():
    result = lmql.run_sync('"There were[N] of them" where INT(N) and len(TOKENS(N)) < 3')
    assert isinstance(result.variables["N"], int)


def test_regex():
    result = lmql.run_sync('"Mr.[NAME]" where REGEX(NAME, r" [A-Z][a-z]+( [A-Z][a-z]+)?") and len(TOKENS(NAME)) < 6')
    import re

    assert re.fullmatch(r" [A-Z][a-z]+( [A-Z][a-z]+)?", result.variables["NAME"])


def test_character_length():
    result = lmql.run_sync('"Mr.[NAME]" where len(NAME) < 6')
    assert 0 < len(result.variables["NAME"]) <= 5


def test_or_and_not():
    result = lmql.run_sync('"I am[X]" where (X in [" very", " not"] or X == " sure") and not X == " not"')
    assert result.variables["X"] in (" very", " sure")


def test_several_variables_and_python_statements():
    query = '''
        argmax(max_len=200)
            "Names:"
            names = []
            for i in range(3):
                "[NAME]"
                names.append(NAME)
            "\\nCount: {len(names)} {names[0]!r}"
        where
            STOPS_AT(NAME, ",") and len(TOKENS(NAME)) < 4 and NAME != ""
    '''
    result = lmql.run_sync(query)
    head, _, tail = result.prompt.partition("\nCount: ")
    assert head.startswith("Names:") and tail.startswith("3 ")
    first = eval(tail[2:])  # the repr of the first NAME, interpolated by the program
    assert first and head.startswith("Names:" + first)
    last = result.variables["NAME"]
    assert last and head.endswith(last) and list(result.variables) == ["NAME"]


def test_inputs_are_interpolated():
    result = lmql.run_sync('"Dear {title} {name},[X]" where len(TOKENS(X)) < 3', title="Mr.", name="Darcy")
    assert result.prompt.startswith("Dear Mr. Darcy,")


def test_distribution_clause():
    query = 'argmax\n    "It was[X]"\nfrom "local:builtin:tiny"\ndistribution X in [" a", " the", " very"]'
    result = lmql.run_sync(query)
    probs = result.variables["P(X)"]
    assert [option for option, _ in probs] == [" a", " the", " very"]
    assert sum(p for _, p in probs) == pytest.approx(1.0)
    assert result.variables["X"] == max(probs, key=lambda item: item[1])[0]
    assert result.distribution_variable == "X" and result.distribution_values == [" a", " the", " very"]
    assert [lp for _, lp in result.variables["log P(X)"]] == pytest.approx(
        [__import__("math").log(p) for _, p in probs])
    assert result.prompt == "It was" + result.variables["X"]


def test_score_matches_the_distribution_clause():
    pairs = score_sync("It was", [" a", " the", " very"], model=MODEL)
    result = lmql.run_sync('"It was[X]" distribution X in [" a", " the", " very"]')
    assert [o for o, _ in pairs] == [o for o, _ in result.variables["P(X)"]]
    assert [p for _, p in pairs] == pytest.approx([p for _, p in result.variables["P(X)"]])


def test_sampling_is_seeded_and_returns_n_results():
    query = '"Hello[X]" where len(TOKENS(X)) < 6'
    first = lmql.run_sync(query, decoder="sample(n=3, seed=7, temperature=1.2)")
    again = lmql.run_sync(query, decoder=lmql.runtime.sample(n=3, seed=7, temperature=1.2))
    assert len(first) == 3 and [r.prompt for r in first] == [r.prompt for r in again]
    single = lmql.run_sync(query, decoder="sample(seed=8, temperature=1.2)")
    assert single.prompt == first[1].prompt  # sample i uses seed + i


def test_beam_returns_n_results_best_first(client):
    results = lmql.run_sync('beam(n=3)\n    "Hello[X]"\nwhere len(TOKENS(X)) < 4')
    assert len(results) == 3 and len({r.prompt for r in results}) == 3

    async def total_logprob(result):
        ids = [client.bos_token_id] + client.tokenizer("Hello", add_special_tokens=False).input_ids
        value = client.tokenizer(result.variables["X"], add_special_tokens=False).input_ids
        return sum(await client.score(ids + value, len(ids)))

    scores = [asyncio.run(total_logprob(r)) for r in results]
    assert scores == sorted(scores, reverse=True)


def test_max_len_truncates_the_query(client):
    result = lmql.run_sync('argmax(max_len=8)\n    "Hello[X] and [Y]"')
    assert result.is_truncated and list(result.variables) == ["X"]
    assert result.prompt == "Hello" + result.variables["X"]
    num_prompt = 1 + len(client.tokenizer("Hello", add_special_tokens=False).input_ids)
    assert result.variables["X"] == client.tokenizer.decode(greedy_tokens(client, "Hello", 8 - num_prompt))


def test_chunksize_does_not_change_results():
    query = '"Hello[X]" where STOPS_AT(X, ".") and len(TOKENS(X)) < 20'
    a = lmql.run_sync(query, decoder="argmax(chunksize=1)")
    b = lmql.run_sync(query, decoder="argmax(chunksize=7)")
    assert a.prompt == b.prompt


def test_unsatisfiable_constraints_raise():
    with pytest.raises(ConstraintError, match="X"):
        lmql.run_sync('"Hi[X]" where len(TOKENS(X)) > 3 and len(TOKENS(X)) < 2')


@pytest.mark.parametrize("decoder, fragment", [
    ("argmax(n=2)", "argmax does not take n"),
    ("sample(bogus=1)", "bogus"),
    ("beam(n=30)", "n must be an integer in"),
    ("argmax(backend='grpc')", "backend 'grpc'"),
    ("greedy", "unknown decoder"),
])
def test_bad_decoder_arguments_are_named(decoder, fragment):
    with pytest.raises(InvalidRequestError, match=fragment):
        lmql.run_sync('"a[X]"', decoder=decoder)


def test_syntax_error_surfaces_from_run():
    with pytest.raises(QuerySyntaxError):
        lmql.run_sync('argmax "Hello[WHO" from "local:builtin:tiny"')


async def test_query_decorator():
    @lmql.query
    async def greet(name, n=3):
        '''argmax "Dear {name},[X]" from "local:builtin:tiny" where len(TOKENS(X)) < n'''

    result = await greet("Emma")
    assert result.prompt.startswith("Dear Emma,")
    assert greet.run_sync("Emma").prompt == result.prompt
    with pytest.raises(InvalidRequestError, match="greet"):
        await greet()


def test_run_sync_works_inside_a_running_loop():
    async def inner():
        return lmql.run_sync('"Hi[X]" where len(TOKENS(X)) < 3')

    assert asyncio.run(inner()).prompt.startswith("Hi")


def test_model_helpers():
    spec = lmql.inprocess("builtin:tiny", dtype="float32")
    assert spec.name == "local:builtin:tiny" and spec.options.dtype == "float32"
    with pytest.raises(InvalidRequestError, match="cuda"):
        lmql.model("builtin:tiny", endpoint="127.0.0.1:1", cuda=True)
    with pytest.raises(InvalidRequestError, match="endpoint"):
        lmql.model("local:builtin:tiny", endpoint="127.0.0.1:1")
