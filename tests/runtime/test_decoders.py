"""runtime/decoders.py: argmax, sample and LMQL 0.7.3's beam search, on the embedded model.

Expected beams come from LMQL 0.7.3 itself: each query below was run as written (decoder
clause, prompt, where clause) with ``lmql.query(code)(model=lmql.model("local:" + DIR))`` on the
embedded model saved to DIR (transformers 4.34 format, benchmarks/lmql_073.py
`save_for_transformers_434`). The values are LMQL's results in its order; the log-probabilities
are ``s.logprobs.sum()`` of the sequences LMQL's ``beam_search`` passed to ``dc.finish``.
"""

from __future__ import annotations

import asyncio

import pytest

import lmql_backends as lmql
from lmql_backends.language.parser import parse_query
from lmql_backends.runtime.decoders import (
    BEAM_LENGTH_ALPHA, Beam, BeamSearch, beam, open_session, sample, argmax,
)
from lmql_backends.runtime.models import make_client

pytestmark = pytest.mark.timeout(300)

# (decoder, query) -> (LMQL 0.7.3's values, in its order; its summed log-probabilities)
LMQL_073_BEAMS = [
    ("beam(n=2)", '"Hello[X]" where len(TOKENS(X)) < 3',
     [{"X": "bert M"}, {"X": "berty"}], [-5.535656, -5.790936]),
    ("beam(n=3)", '"It was[X] and[Y]" where len(TOKENS(X)) < 3 and len(TOKENS(Y)) < 2',
     [{"X": " a few", "Y": " the"}, {"X": " not to", "Y": " the"}, {"X": " a few", "Y": " she"}],
     [-15.160103, -15.807729, -16.366075]),
    ("beam(n=2)", '"Hello[X]" where STOPS_AT(X, ".") and len(TOKENS(X)) < 10',
     [{"X": "bert Middleton, and the same time"}, {"X": "bert Middleton, and the first,"}],
     [-20.397888, -21.232224]),
    ("beam(n=3)", '"Hello[X]" where STOPS_AT(X, ",") and len(TOKENS(X)) < 8',
     [{"X": "bert Middleton,"}, {"X": "bert Middleton was not the"}, {"X": "bert Middleton was not at"}],
     [-9.370553, -14.745491, -14.88478]),
    ("beam(n=3)", '"It is a truth[X]" where STOPS_AT(X, ",") and len(TOKENS(X)) < 12',
     [{"X": ","}, {"X": " of the same time,"}, {"X": " of the same time."}], [-1.82122, -10.949192, -13.895907]),
    ("beam(n=2)", '"Q:[X] A:[Y]" where len(TOKENS(X)) < 3 and len(TOKENS(Y)) < 3',
     [{"X": " he was", "Y": " he was"}, {"X": " he was", "Y": " he had"}], [-29.974945, -30.197186]),
    ("beam(n=2)", '"Q: Name a colour:[C]" where C in [" red", " green", " blue", " yellow"]',
     [{"C": " red"}, {"C": " green"}], [-0.797463, -1.075686]),
    ("beam(n=3)", '"Hello[X]" where X in ["lo", "lolo", "lolol", " world"]',
     [{"X": "lolol"}, {"X": "lolol"}, {"X": "lo"}], [-1.583255, -1.76644, -2.091658]),
    ("beam(n=2)", '"Hello[X]" where len(X) < 10', [{"X": "bert Mery"}, {"X": "bert Ma,"}], [-7.027071, -9.74519]),
    ("beam(n=2)", '"Hello[X]!" where len(TOKENS(X)) < 4',
     [{"X": "bert Mery"}, {"X": "bert Middle"}], [-15.57613, -16.739344]),
    ("beam(n=2)", '"A number:[N]" where INT(N) and len(TOKENS(N)) < 4', [{"N": 18}, {"N": 11}], [-7.016425, -7.805375]),
    ("beam(n=3)", '"Hello[X]" where len(TOKENS(X)) < 6 and STOPS_BEFORE(X, " ")',
     [{"X": "bert"}, {"X": "verything"}, {"X": "verybody"}], [-8.488272, -12.75921, -12.823942]),
]


def decoder_of(text: str, **extra):
    clause = lmql.runtime.api.parse_decoder_text(text)
    return lmql.runtime.make_decoder(clause.name, **{name: e.evaluate({}) for name, e in clause.arguments}, **extra)


async def search(query: str, spec) -> list[Beam]:
    async with make_client("local:builtin:tiny") as client:
        session = await open_session(parse_query(query), client, spec, {})
        return await BeamSearch(session).search()


@pytest.mark.parametrize("decoder, query, values, logprobs", LMQL_073_BEAMS)
def test_beam_equals_lmql_073(decoder, query, values, logprobs):
    beams = asyncio.run(search(query, decoder_of(decoder)))
    assert [b.result.variables for b in beams] == values
    assert [b.logprob for b in beams] == pytest.approx(logprobs, abs=1e-4)


@pytest.mark.parametrize("server", ["new_server", "legacy_server"])
def test_beam_equals_lmql_073_over_http(server, request):
    endpoint = request.getfixturevalue(server).endpoint
    backend = "legacy" if server == "legacy_server" else None
    for decoder, query, values, _ in LMQL_073_BEAMS:
        results = lmql.run_sync(query, model=lmql.model("builtin:tiny", endpoint=endpoint),
                                decoder=decoder_of(decoder, backend=backend))
        assert [r.variables for r in results] == values, (decoder, query)


def test_beam_score_is_lmql_length_normalised():
    """dc.topk's default scorer: sum(logprobs) / len(seq) ** 0.7, the prompt counting (dclib_array.py:99-111)."""
    searcher = BeamSearch.__new__(BeamSearch)
    searcher.num_bos = 1
    beam_ = Beam(ids=(0, 5, 6, 7, 8), logprobs=(0.0, 0.0, 0.0, -1.0, -2.0))
    assert searcher.length(beam_) == 4
    assert searcher.score(beam_) == pytest.approx(-3.0 / 4 ** BEAM_LENGTH_ALPHA)
    assert beam_.logprob == -3.0
    longer = beam_.extended(9, -0.5)
    # one more token with a log-probability above the normalised score raises the score
    assert searcher.score(longer) > searcher.score(beam_) and longer.logprob < beam_.logprob


def test_beam_results_are_sorted_by_summed_logprob_and_at_most_n():
    for n in (1, 2, 3):
        beams = asyncio.run(search('"It was[X]" where STOPS_AT(X, ",") and len(TOKENS(X)) < 6', beam(n=n)))
        assert 1 <= len(beams) <= n
        sums = [b.logprob for b in beams]
        assert sums == sorted(sums, reverse=True)
        for b in beams:  # STOPS_AT: a comma only ends the value
            assert "," not in b.result.variables["X"][:-1]


def test_beam_n1_is_argmax_when_no_finished_beam_competes():
    """With one beam and a fixed length, beam search keeps the top token at every step: argmax."""
    query = '"Hello[X]" where len(TOKENS(X)) == 5'
    best = lmql.run_sync(query, decoder=beam(n=1))
    assert best.variables == lmql.run_sync(query, decoder=argmax()).variables


def test_beam_max_len_returns_truncated_values():
    """LMQL 0.7.3 fails with an AssertionError here (interpreter.py:1122); ours returns the values, truncated."""
    results = lmql.run_sync('"Hello[X]"', decoder=beam(n=2, max_len=10))
    assert len(results) == 2 and all(r.is_truncated for r in results)
    beams = asyncio.run(search('"Hello[X]"', beam(n=2, max_len=10)))
    assert [len(b.ids) - 1 for b in beams] == [10, 10]  # LMQL's len(seq): the tokens after BOS
    assert [b.result.variables for b in beams] == [r.variables for r in results]


def test_argmax_takes_the_top_allowed_token_at_every_step():
    """argmax equals a plain loop over the client's top token under the same constraints."""
    query = '"It was[X]" where len(TOKENS(X)) < 7'
    result = lmql.run_sync(query, decoder=argmax(chunksize=3))

    async def greedy():
        async with make_client("local:builtin:tiny") as client:
            session = await open_session(parse_query(query), client, argmax(), {})
            ids = session.context_ids("It was")
            for _ in range(6):
                (top,) = await client.top_tokens(ids, None, 1)
                if top.token_id == session.table.eos_token_id:
                    break
                ids.append(top.token_id)
            return client.tokenizer.decode(ids[len(session.context_ids("It was")):])

    assert result.variables["X"] == asyncio.run(greedy())


def test_sample_is_reproducible_by_seed_and_varies_with_it():
    query = '"Hello[X]" where len(TOKENS(X)) < 6'
    first = lmql.run_sync(query, decoder=sample(n=3, seed=5, temperature=1.5))
    again = lmql.run_sync(query, decoder=sample(n=3, seed=5, temperature=1.5))
    assert [r.variables for r in first] == [r.variables for r in again]
    values = {r.variables["X"] for seed in range(4) for r in lmql.run_sync(query, decoder=sample(n=2, seed=seed * 7))}
    assert len(values) > 1
