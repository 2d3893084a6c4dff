"""POST /v1/queries over real HTTP: tokens, masks, variables, errors, auth, cancel on disconnect,
and the playground page with the redirect of a browser's GET /."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
import requests
from aiohttp import web

import lmql_backends
from lmql_backends.server.app import serve
from lmql_backends.server.playground import routes
from lmql_backends.server.playground.queries import RUNNING, is_enabled
from lmql_backends.server.state import STATE

ANSWER_QUERY = ('argmax "Q: What is the capital of France?\\nA: [ANSWER]" '
                'where STOPS_AT(ANSWER, "\\n") and len(TOKENS(ANSWER)) < 12')
CHOICE_QUERY = 'argmax "a [X]" where X in ["b", "c"]'
LONG_QUERY = 'argmax "Once upon a time[STORY]" where len(TOKENS(STORY)) < 900'


def read_events(response: requests.Response) -> list[tuple[str, dict]]:
    """The (type, data) events of an SSE answer."""
    events = []
    for frame in response.text.split("\n\n"):
        if frame.strip():
            kind, data = frame.split("\n", 1)
            events.append((kind.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return events


def post_query(server, body: dict, **kwargs) -> requests.Response:
    return requests.post(f"http://127.0.0.1:{server.port}/v1/queries", json=body, timeout=120, **kwargs)


def of_kind(events, kind: str) -> list[dict]:
    return [data for k, data in events if k == kind]


def test_tokens_stream_with_logprobs_and_the_variable_run_sync_gives(new_server):
    response = post_query(new_server, {"query": ANSWER_QUERY})
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = read_events(response)
    assert [k for k, _ in events][-2:] == ["result", "done"]
    expected = lmql_backends.run_sync(ANSWER_QUERY)
    result = of_kind(events, "result")[0]
    assert result["variables"] == expected.variables
    assert result["prompt"] == expected.prompt
    tokens = of_kind(events, "token")
    assert len(tokens) == result["num_tokens"] > 0
    assert result["logprob"] == pytest.approx(sum(t["logprob"] for t in tokens))
    # the prompt, then the tokens, spell the result's prompt
    shown = "".join(d["text"] for k, d in events if k in ("prompt", "token"))
    assert shown == expected.prompt
    for token in tokens:
        assert len(token["top"]) == 5 and token["num_allowed"] >= 1
        assert token["top"][0]["logprob"] >= token["top"][-1]["logprob"]
    assert [d["variable"] for d in of_kind(events, "variable_end")] == ["ANSWER"]


def test_the_legacy_server_runs_queries_too(legacy_server):
    events = read_events(post_query(legacy_server, {"query": CHOICE_QUERY}))
    assert of_kind(events, "result")[0]["variables"] == lmql_backends.run_sync(CHOICE_QUERY).variables


def test_a_mask_shows_how_many_tokens_it_allowed_and_the_best_token_it_removed(new_server):
    events = read_events(post_query(new_server, {"query": CHOICE_QUERY, "top_k": 20}))
    token = of_kind(events, "token")[0]
    assert token["num_allowed"] == 2  # " b" and " c" ... or "b"/"c": the two options' first tokens
    assert token["num_allowed"] < token["num_tokens"]
    best = token["best_masked"]
    assert best is not None and best["is_allowed"] is False
    assert best["logprob"] > token["model_logprob"]  # the model preferred it
    assert token["logprob"] > token["model_logprob"]  # renormalised over the two allowed tokens
    assert of_kind(events, "result")[0]["variables"] == lmql_backends.run_sync(CHOICE_QUERY).variables


def test_a_stop_phrase_is_named_as_what_ended_the_variable(new_server):
    query = 'argmax "Say: [X] and [Y] done" where STOPS_AT(X, "1") and len(TOKENS(X)) < 30 and len(TOKENS(Y)) < 3'
    events = read_events(post_query(new_server, {"query": query}))
    ends = [(d["variable"], d["reason"]) for d in of_kind(events, "variable_end")]
    expected = lmql_backends.run_sync(query)
    assert expected.variables["X"].endswith("1")
    assert ends == [("X", "stop"), ("Y", "forced")]
    assert "stop phrase of X" in of_kind(events, "variable_end")[0]["description"]
    assert of_kind(events, "result")[0]["variables"] == expected.variables
    assert of_kind(events, "prompt")[-1]["text"] == " done"


def test_a_sampling_decoder_given_in_the_body_matches_run_sync(new_server):
    decoder = {"name": "sample", "temperature": 0.9, "seed": 7, "max_len": 64}
    query = '"Hello[X]" where len(TOKENS(X)) < 8'
    result = of_kind(read_events(post_query(new_server, {"query": query, "decoder": decoder})), "result")[0]
    expected = lmql_backends.run_sync(query, decoder="sample(temperature=0.9, seed=7, max_len=64)")
    assert result["variables"] == expected.variables


def test_a_distribution_is_reported_with_its_probabilities(new_server):
    query = 'argmax "a [X]" distribution X in ["b", "c"]'
    result = of_kind(read_events(post_query(new_server, {"query": query})), "result")[0]
    expected = lmql_backends.run_sync(query)
    assert result["distributions"]["X"] == [list(pair) for pair in expected.variables["P(X)"]]
    assert sum(p for _, p in result["distributions"]["X"]) == pytest.approx(1)


def test_a_syntax_error_is_a_400_naming_the_line_and_column(new_server):
    response = post_query(new_server, {"query": 'argmax\n  "a [X"'})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["line"] == 2 and error["column"] >= 1 and "hole" in error["message"]


def test_an_error_while_running_is_an_error_event(new_server):
    query = 'argmax\n  "a [X]"\nwhere\n  len(TOKENS(X)) < foo'
    events = read_events(post_query(new_server, {"query": query}))
    assert [k for k, _ in events][-2:] == ["error", "done"]
    error = of_kind(events, "error")[0]
    assert "foo" in error["message"] and error["status"] == 400
    assert (error["line"], error["column"]) == (4, 20)  # where foo stands


@pytest.mark.parametrize("body, field", [
    ({}, "query"), ({"query": ""}, "query"), ({"query": "\"a[X]\"", "top_k": 0}, "top_k"),
    ({"query": "\"a[X]\"", "decoder": "beam(n=2)"}, "decoder"), ({"query": "\"a[X]\"", "extra": 1}, "extra"),
])
def test_invalid_bodies_are_400_naming_the_field(new_server, body, field):
    response = post_query(new_server, body)
    assert response.status_code == 400
    assert field in response.json()["error"]["message"]


def test_a_body_over_the_limit_is_413(tiny_model):
    with serve(tiny_model, port=0, background=True, max_body_bytes=200, engine_process=False) as handle:
        response = post_query(handle, {"query": '"a [X]"' + " " * 300})
        assert response.status_code == 413 and "max-body-bytes" in response.json()["error"]["message"]


def test_the_api_key_is_needed_for_queries_but_not_for_the_page(tiny_model):
    with serve(tiny_model, port=0, background=True, api_key="secret", engine_process=False) as handle:
        assert post_query(handle, {"query": CHOICE_QUERY}).status_code == 401
        ok = post_query(handle, {"query": CHOICE_QUERY}, headers={"Authorization": "Bearer secret"})
        assert ok.status_code == 200 and of_kind(read_events(ok), "result")
        base = f"http://127.0.0.1:{handle.port}"
        assert requests.get(base + "/playground", timeout=30).status_code == 200
        assert requests.get(base + "/playground/static/app.js", timeout=30).status_code == 200
        assert requests.get(base + "/v1/models", timeout=30).status_code == 401


async def wait_until(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the condition did not hold in time")
        await asyncio.sleep(0.02)


async def test_closing_the_connection_cancels_the_query_and_its_engine_requests(new_server):
    running = new_server._runner.app[RUNNING]
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{new_server.port}/v1/queries"
        async with session.post(url, json={"query": LONG_QUERY}) as response:
            assert response.status == 200
            seen = 0
            async for line in response.content:
                seen += line.startswith(b"event: token")
                if seen == 3:
                    break
            assert len(running) == 1
    await wait_until(lambda: not running and new_server.state.engine.num_pending == 0)


def test_the_capacity_limit_refuses_more_running_queries_with_429(new_server, monkeypatch):
    from lmql_backends.server.playground import queries

    monkeypatch.setattr(queries, "MAX_RUNNING_QUERIES", 0)
    response = post_query(new_server, {"query": CHOICE_QUERY})
    assert response.status_code == 429 and "Retry-After" in response.headers


def test_a_browser_get_of_the_root_is_redirected_to_the_page(new_server):
    base = f"http://127.0.0.1:{new_server.port}"
    page = requests.get(base + "/", headers={"Accept": "text/html,application/xhtml+xml"}, timeout=30)
    assert page.history[0].status_code == 302 and page.url == base + "/playground"
    assert "<textarea" in page.text and "Run" in page.text
    # API clients and WebSocket upgrades are not redirected: / is LMTP's WebSocket, which says so
    plain = requests.get(base + "/", timeout=30)
    assert not plain.history and plain.status_code == 400 and "WebSocket" in plain.json()["error"]["message"]
    upgrade = {"Accept": "text/html", "Upgrade": "websocket", "Connection": "Upgrade"}
    assert requests.get(base + "/", headers=upgrade, allow_redirects=False, timeout=30).status_code != 302


@pytest.mark.parametrize("host, explicit, enabled", [
    ("127.0.0.1", False, True), ("::1", False, True), ("localhost", False, True), ("127.0.0.2", False, True),
    ("0.0.0.0", False, False), ("", False, False), ("192.0.2.1", False, False), ("example.org", False, False),
    ("0.0.0.0", True, True),
])
def test_queries_run_only_on_loopback_unless_asked(host, explicit, enabled):
    assert is_enabled(host, explicit) is enabled


async def test_a_server_on_another_address_refuses_queries_with_403(new_server, aiohttp_client=None):
    app = web.Application()
    app[STATE] = new_server.state
    routes.add_routes(app, "0.0.0.0", explicit=False)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{port}/v1/queries", json={"query": CHOICE_QUERY}) as response:
                assert response.status == 403
                assert "--playground" in (await response.json())["error"]["message"]
            async with session.get(f"http://127.0.0.1:{port}/playground") as page:
                assert page.status == 200
    finally:
        await runner.cleanup()
