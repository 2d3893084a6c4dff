"""The same queries give identical results in-process, over the new API and over the legacy API."""

import pytest

import lmql_backends as lmql

pytestmark = pytest.mark.timeout(300)

QUERIES = [
    ('"Hello[WHO]" where STOPS_AT(WHO, "\\n") and len(TOKENS(WHO)) < 10', "argmax"),
    ('"She said:[X]" where len(TOKENS(X)) == 4', "argmax(chunksize=3)"),
    ('"Hello[X]" where STOPS_BEFORE(X, " the") and len(TOKENS(X)) < 12', "argmax"),
    ('"The best of[X]" where X in [" them", " all", " the world"]', "argmax"),
    ('"Her age was[N: int] years" where len(TOKENS(N)) < 4', "argmax"),
    ('"Mr.[NAME]" where REGEX(NAME, r" [A-Z][a-z]+") and len(TOKENS(NAME)) < 5', "argmax"),
    ('"A[X], B[Y]" where len(TOKENS(X)) < 3 and len(X) < 8 and len(TOKENS(Y)) < 3', "argmax"),
    ('"Hello[X]" where len(TOKENS(X)) < 6', "sample(n=2, seed=11, temperature=1.3)"),
    ('"Hello[X]" where len(TOKENS(X)) < 4', "sample(seed=3, top_p=0.8)"),
    ('"Hello[X]" where len(TOKENS(X)) < 3', "beam(n=2)"),
]
DISTRIBUTION = '"It was[X]" distribution X in [" a", " the", " very"]'


def backend_of(server):
    return "legacy" if server == "legacy_server" else None


@pytest.fixture(scope="module")
def reference():
    """Each query's result in-process."""
    return [lmql.run_sync(query, decoder=decoder) for query, decoder in QUERIES]


def as_plain(result):
    results = result if isinstance(result, list) else [result]
    return [(r.prompt, r.variables, r.is_truncated) for r in results]


@pytest.mark.parametrize("server", ["new_server", "legacy_server"])
def test_http_backends_match_in_process(server, reference, request):
    handle = request.getfixturevalue(server)
    model = lmql.model("builtin:tiny", endpoint=handle.endpoint)
    for (query, decoder), expected in zip(QUERIES, reference):
        clause = lmql.runtime.api.parse_decoder_text(decoder)
        arguments = {name: e.evaluate({}) for name, e in clause.arguments}
        chosen = lmql.runtime.make_decoder(clause.name, backend=backend_of(server), **arguments)
        result = lmql.run_sync(query, model=model, decoder=chosen)
        assert as_plain(result) == as_plain(expected), (query, decoder)


@pytest.mark.parametrize("server", ["new_server", "legacy_server"])
def test_distribution_matches_in_process(server, request):
    """Same choice; probabilities equal up to float noise (the engines may reuse cached prefixes)."""
    handle = request.getfixturevalue(server)
    expected = lmql.run_sync(DISTRIBUTION)
    model = lmql.model("builtin:tiny", endpoint=handle.endpoint)
    result = lmql.run_sync(DISTRIBUTION, model=model, decoder=f"argmax(backend={backend_of(server)!r})")
    assert result.prompt == expected.prompt and result.variables["X"] == expected.variables["X"]
    for key in ("P(X)", "log P(X)"):
        assert [o for o, _ in result.variables[key]] == [o for o, _ in expected.variables[key]]
        assert [p for _, p in result.variables[key]] == pytest.approx(
            [p for _, p in expected.variables[key]], rel=1e-4, abs=1e-6)
