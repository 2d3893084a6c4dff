"""OpenAIClient against a real new-API server gives the in-process results, and clear errors."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
import torch
from aiohttp import web

from lmql_backends.client.inprocess import InProcessClient
from lmql_backends.client.base import make_base_url
from lmql_backends.client.openai_client import OpenAIClient
from lmql_backends.engine import SamplingParams
from lmql_backends.errors import (
    BackendResponseError, BackendTimeoutError, BackendUnavailableError, ConstraintError, InvalidRequestError,
)

pytestmark = pytest.mark.timeout(120)

MODEL = "builtin:tiny"
PROMPT = "She was the youngest of the two daughters of a most affectionate"


@pytest.fixture(scope="module")
def inprocess() -> InProcessClient:
    return InProcessClient(MODEL)


@pytest.fixture
async def client(new_server, inprocess):
    async with OpenAIClient(MODEL, new_server.endpoint, inprocess.tokenizer) as client:
        yield client


@pytest.fixture(scope="module")
def prompt_ids(inprocess) -> list[int]:
    return inprocess.tokenizer.encode(PROMPT, add_special_tokens=False)


def make_mask(inprocess, words: list[str]) -> torch.Tensor:
    mask = torch.zeros(inprocess.num_tokens, dtype=torch.bool)
    for word in words:
        mask[inprocess.tokenizer.encode(word, add_special_tokens=False)[0]] = True
    return mask


def assert_same_choices(got, expected) -> None:
    assert [c.token_id for c in got] == [c.token_id for c in expected]
    assert [c.logprob for c in got] == pytest.approx([c.logprob for c in expected], abs=1e-4)


# ---- same results as in-process ----------------------------------------------------------


async def test_greedy_generate_matches_inprocess(client, inprocess, prompt_ids):
    got = await client.generate(prompt_ids, None, 20, SamplingParams())
    expected = await inprocess.generate(prompt_ids, None, 20, SamplingParams())
    assert 1 <= len(got) <= 20
    assert_same_choices(got, expected)


async def test_masked_greedy_generate_matches_inprocess(client, inprocess, prompt_ids):
    mask = make_mask(inprocess, [" and", " of", " the", ",", " Emma", " was"])
    got = await client.generate(prompt_ids, mask, 12, SamplingParams())
    expected = await inprocess.generate(prompt_ids, mask, 12, SamplingParams())
    assert all(mask[c.token_id] for c in got)
    assert_same_choices(got, expected)


@pytest.mark.parametrize("sampling", [
    SamplingParams(temperature=1.0, seed=7),
    SamplingParams(temperature=0.7, top_p=0.9, seed=12345),
    SamplingParams(temperature=1.0),  # no seed: both backends use seed 0
], ids=["t1-seed7", "t0.7-topp0.9", "no-seed"])
async def test_seeded_sampling_matches_inprocess(client, inprocess, prompt_ids, sampling):
    got = await client.generate(prompt_ids, None, 16, sampling)
    expected = await inprocess.generate(prompt_ids, None, 16, sampling)
    assert_same_choices(got, expected)


async def test_masked_sampling_matches_inprocess(client, inprocess, prompt_ids):
    mask = make_mask(inprocess, [" and", " of", " the", ",", " Emma", " was", "."])
    sampling = SamplingParams(temperature=1.2, seed=3)
    got = await client.generate(prompt_ids, mask, 16, sampling)
    expected = await inprocess.generate(prompt_ids, mask, 16, sampling)
    assert all(mask[c.token_id] for c in got)
    assert_same_choices(got, expected)


async def test_generate_stops_after_eos_like_inprocess(client, inprocess, prompt_ids):
    mask = torch.zeros(inprocess.num_tokens, dtype=torch.bool)
    mask[inprocess.eos_token_id] = True
    got = await client.generate(prompt_ids, mask, 5, SamplingParams())
    assert [c.token_id for c in got] == [inprocess.eos_token_id]
    assert got[0].logprob == pytest.approx(0.0, abs=1e-6)


async def test_all_true_mask_is_the_same_as_no_mask(client, inprocess, prompt_ids):
    mask = torch.ones(inprocess.num_tokens, dtype=torch.bool)
    got = await client.generate(prompt_ids, mask, 8, SamplingParams())
    expected = await inprocess.generate(prompt_ids, None, 8, SamplingParams())
    assert_same_choices(got, expected)


@pytest.mark.parametrize("k", [1, 5, 20])
async def test_top_tokens_match_inprocess(client, inprocess, prompt_ids, k):
    got = await client.top_tokens(prompt_ids, None, k)
    expected = await inprocess.top_tokens(prompt_ids, None, k)
    assert len(got) == k
    assert_same_choices(got, expected)


async def test_masked_top_tokens_match_inprocess(client, inprocess, prompt_ids):
    mask = make_mask(inprocess, [" and", " of", " the", ",", " Emma"])
    got = await client.top_tokens(prompt_ids, mask, 10)
    expected = await inprocess.top_tokens(prompt_ids, mask, 10)
    assert len(got) == int(mask.sum()) < 10
    assert_same_choices(got, expected)


@pytest.mark.parametrize("num_context", [1, 5])
async def test_score_matches_inprocess(client, inprocess, prompt_ids, num_context):
    got = await client.score(prompt_ids, num_context)
    expected = await inprocess.score(prompt_ids, num_context)
    assert len(got) == len(prompt_ids) - num_context
    assert got == pytest.approx(expected, abs=1e-4)


async def test_score_of_nothing_is_empty_and_num_context_zero_is_rejected(client, prompt_ids):
    assert await client.score(prompt_ids, len(prompt_ids)) == []
    with pytest.raises(InvalidRequestError, match="num_context"):
        await client.score(prompt_ids, 0)


async def test_context_length_comes_from_the_server(client, new_server):
    assert client.context_length is None
    info = await client.connect()
    assert client.context_length == info.context_length == new_server.state.loaded.context_length
    assert info.vocab_size == new_server.state.loaded.vocab_size


async def test_endpoint_with_scheme_and_v1_works(new_server, inprocess, prompt_ids):
    async with OpenAIClient(MODEL, f"http://{new_server.endpoint}/v1/", inprocess.tokenizer) as client:
        got = await client.top_tokens(prompt_ids, None, 3)
    assert [c.token_id for c in got] == [c.token_id for c in await inprocess.top_tokens(prompt_ids, None, 3)]


def test_endpoint_forms():
    assert make_base_url("localhost:8080") == "http://localhost:8080"
    assert make_base_url("http://127.0.0.1:9000/v1/", drop_suffix="/v1") == "http://127.0.0.1:9000"
    with pytest.raises(InvalidRequestError, match="endpoint"):
        make_base_url("  ")


# ---- errors ---------------------------------------------------------------------------------


async def test_all_false_mask_is_a_constraint_error(client, inprocess, prompt_ids):
    mask = torch.zeros(inprocess.num_tokens, dtype=torch.bool)
    with pytest.raises(ConstraintError):
        await client.generate(prompt_ids, mask, 3, SamplingParams())


async def test_top_k_out_of_range_is_rejected(client, prompt_ids):
    with pytest.raises(InvalidRequestError, match="21"):
        await client.top_tokens(prompt_ids, None, 21)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_down_server_is_backend_unavailable(inprocess, prompt_ids):
    port = free_port()
    async with OpenAIClient(MODEL, f"127.0.0.1:{port}", inprocess.tokenizer, chunk_timeout=5) as client:
        with pytest.raises(BackendUnavailableError) as info:
            await client.generate(prompt_ids, None, 3, SamplingParams())
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and f"serve-model MODEL --port {port}" in message


async def test_error_status_is_backend_response_error(new_server, inprocess, prompt_ids):
    async with OpenAIClient("not-served", new_server.endpoint, inprocess.tokenizer) as client:
        with pytest.raises(BackendResponseError) as info:
            await client.generate(prompt_ids, None, 3, SamplingParams())
    assert info.value.status == 404
    assert "not-served" in str(info.value) and MODEL in str(info.value)


async def test_context_overflow_is_a_400_backend_response_error(client, new_server, prompt_ids):
    too_many = new_server.state.loaded.context_length
    with pytest.raises(BackendResponseError) as info:
        await client.generate(prompt_ids, None, too_many, SamplingParams())
    assert info.value.status == 400 and "context length" in str(info.value)


async def start_fake_server(handler) -> tuple[web.AppRunner, str]:
    """A loopback server whose every route is `handler` (it stands in for a broken server)."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


@pytest.fixture
async def stalled_endpoint():
    """A loopback server that accepts requests and never answers them."""
    release = asyncio.Event()

    async def never_answer(request):
        await release.wait()
        return web.Response(status=503)

    runner, endpoint = await start_fake_server(never_answer)
    yield endpoint
    release.set()
    await runner.cleanup()


async def test_stalled_server_is_a_backend_timeout(stalled_endpoint, inprocess, prompt_ids):
    async with OpenAIClient(MODEL, stalled_endpoint, inprocess.tokenizer, chunk_timeout=0.5) as client:
        with pytest.raises(BackendTimeoutError) as info:
            await asyncio.wait_for(client.generate(prompt_ids, None, 3, SamplingParams()), 10)
    assert stalled_endpoint in str(info.value) and "0.5" in str(info.value)


async def test_api_key_is_sent_as_bearer(inprocess, prompt_ids):
    seen = []

    async def record(request):
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"error": {"message": "nope"}}, status=401)

    runner, endpoint = await start_fake_server(record)
    try:
        async with OpenAIClient(MODEL, endpoint, inprocess.tokenizer, api_key="s3cret") as client:
            with pytest.raises(BackendResponseError) as info:
                await client.score(prompt_ids, 1)
    finally:
        await runner.cleanup()
    assert seen and all(h == "Bearer s3cret" for h in seen)
    assert info.value.status == 401 and "nope" in str(info.value)


def sse_answer(*payloads: str):
    """A handler answering completions with these SSE payloads (and /v1/models with nothing)."""

    async def handler(request):
        if request.path.endswith("/models"):
            return web.json_response({"object": "list", "data": []})
        body = "".join(f"data: {p}\n\n" for p in payloads)
        return web.Response(text=body, content_type="text/event-stream")

    return handler


TOKEN_CHUNK = json.dumps({"choices": [{"index": 0, "text": "x", "finish_reason": None,
                                       "logprobs": {"tokens": ["token_id:7"], "token_logprobs": [-0.5]}}]})


@pytest.mark.parametrize("payloads,error,words", [
    ([json.dumps({"error": {"message": "the engine stopped", "code": "request_cancelled"}}), "[DONE]"],
     BackendResponseError, ["the engine stopped", "request_cancelled"]),
    ([TOKEN_CHUNK.replace("token_id:7", "hello"), "[DONE]"], BackendResponseError,
     ["'hello'", "return_tokens_as_token_ids"]),
    ([TOKEN_CHUNK], BackendResponseError, ["without [DONE]"]),
    (["{broken"], BackendResponseError, ["cannot be read"]),
], ids=["error-frame", "text-tokens", "no-done", "bad-json"])
async def test_broken_streams_raise_clear_errors(inprocess, prompt_ids, payloads, error, words):
    runner, endpoint = await start_fake_server(sse_answer(*payloads))
    try:
        async with OpenAIClient(MODEL, endpoint, inprocess.tokenizer, chunk_timeout=5) as client:
            with pytest.raises(error) as info:
                await client.generate(prompt_ids, None, 3, SamplingParams())
    finally:
        await runner.cleanup()
    assert endpoint in str(info.value)
    assert all(w in str(info.value) for w in words), str(info.value)


async def test_long_sse_lines_are_read_whole(inprocess, prompt_ids):
    logprobs = {"tokens": ["token_id:7"] * 20_000, "token_logprobs": [-0.25] * 20_000}
    chunk = json.dumps({"choices": [{"index": 0, "text": "", "finish_reason": "length", "logprobs": logprobs}]})
    assert len(chunk) > 2**18
    runner, endpoint = await start_fake_server(sse_answer(chunk, "[DONE]"))
    try:
        async with OpenAIClient(MODEL, endpoint, inprocess.tokenizer, chunk_timeout=5) as client:
            got = await client.generate(prompt_ids, None, 3, SamplingParams())
    finally:
        await runner.cleanup()
    assert len(got) == 20_000 and got[0].token_id == 7 and got[0].logprob == -0.25


async def test_connection_dropped_mid_stream_is_backend_unavailable(inprocess, prompt_ids):
    async def drop_after_one_chunk(request):
        if request.path.endswith("/models"):
            return web.json_response({"object": "list", "data": []})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(f"data: {TOKEN_CHUNK}\n\n".encode())
        request.transport.close()
        return response

    runner, endpoint = await start_fake_server(drop_after_one_chunk)
    try:
        async with OpenAIClient(MODEL, endpoint, inprocess.tokenizer, chunk_timeout=5) as client:
            with pytest.raises(BackendUnavailableError) as info:
                await client.generate(prompt_ids, None, 3, SamplingParams())
    finally:
        await runner.cleanup()
    assert endpoint in str(info.value) and "serve-model" in str(info.value)


def test_one_client_works_in_successive_event_loops(new_server, inprocess, prompt_ids):
    client = OpenAIClient(MODEL, new_server.endpoint, inprocess.tokenizer)

    async def top_two():
        async with client:  # aclose() in the loop that used the session
            return await client.top_tokens(prompt_ids, None, 2)

    first, second = asyncio.run(top_two()), asyncio.run(top_two())
    assert first == second and len(first) == 2


async def test_top_tokens_drop_alternatives_the_mask_forbids(inprocess, prompt_ids):
    """vLLM fills top_logprobs up to `logprobs` entries with masked tokens when the mask allows fewer."""
    body = {"choices": [{"index": 0, "text": "x", "finish_reason": "length", "logprobs": {
        "tokens": ["token_id:7"], "token_logprobs": [0.0],
        "top_logprobs": [{"token_id:7": 0.0, "token_id:0": -9999.0, "token_id:3": float("-inf")}]}}]}

    async def handler(request):
        if request.path.endswith("/models"):
            return web.json_response({"object": "list", "data": []})
        return web.Response(text=json.dumps(body), content_type="application/json")  # -Infinity, as Python writes it

    mask = torch.zeros(inprocess.num_tokens, dtype=torch.bool)
    mask[7] = True
    runner, endpoint = await start_fake_server(handler)
    try:
        async with OpenAIClient(MODEL, endpoint, inprocess.tokenizer) as client:
            choices = await client.top_tokens(prompt_ids, mask, 3)
            unmasked = await client.top_tokens(prompt_ids, None, 3)
    finally:
        await runner.cleanup()
    assert [(c.token_id, c.logprob) for c in choices] == [(7, 0.0)]
    assert [c.token_id for c in unmasked] == [7, 0]  # without a mask only the -inf entry goes
