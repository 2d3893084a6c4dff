"""The headline query gives identical results in-process, through the new API and the legacy API."""

from __future__ import annotations

import pytest

import lmql_backends

HEADLINE = 'argmax{args} "Hello[WHO]" from {model} where STOPS_AT(WHO, "\\n") and len(TOKENS(WHO)) < 10'


def headline_results(tiny_model, new_server, legacy_server):
    queries = {
        "in-process": HEADLINE.format(args="", model=f'"local:{tiny_model}"'),
        "new": HEADLINE.format(args="", model=f'lmql.model("{tiny_model}", endpoint="{new_server.endpoint}")'),
        "legacy": HEADLINE.format(
            args='(backend="legacy")', model=f'lmql.model("{tiny_model}", endpoint="{legacy_server.endpoint}")'
        ),
    }
    return {backend: lmql_backends.run_sync(query) for backend, query in queries.items()}


@pytest.mark.timeout(120)
def test_headline_query_agrees_on_every_backend(tiny_model, new_server, legacy_server):
    results = headline_results(tiny_model, new_server, legacy_server)
    reference = results["in-process"]
    assert reference.prompt.startswith("Hello") and reference.prompt == "Hello" + reference.variables["WHO"]
    num_tokens = len(load_tokens(tiny_model, reference.variables["WHO"]))
    assert 1 <= num_tokens <= 9
    for backend, result in results.items():
        assert (result.prompt, result.variables) == (reference.prompt, reference.variables), backend


def test_legacy_backend_really_speaks_the_legacy_protocol(tiny_model, legacy_server):
    before = legacy_server.state.engine.stats().num_prompt_tokens
    query = HEADLINE.format(args='(backend="legacy")', model=f'lmql.model("{tiny_model}", endpoint="{legacy_server.endpoint}")')
    lmql_backends.run_sync(query)
    assert legacy_server.state.engine.stats().num_prompt_tokens > before


def load_tokens(model: str, text: str) -> list[int]:
    from lmql_backends.loader import load_tokenizer

    return load_tokenizer(model)(text, add_special_tokens=False).input_ids
