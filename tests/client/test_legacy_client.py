"""LegacyClient: the same tokens and logprobs as InProcessClient, old-server fallback, clear errors."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
import torch
from aiohttp import web

from lmql_backends.client.inprocess import InProcessClient
from lmql_backends.client.legacy_client import LegacyClient
from lmql_backends.engine import SamplingParams
from lmql_backends.errors import BackendResponseError, BackendTimeoutError, BackendUnavailableError

pytestmark = pytest.mark.timeout(120)

MODEL = "builtin:tiny"
PROMPTS = ["It is a truth universally acknowledged", "Emma Woodhouse", "The", "Captain Wentworth had"]


@pytest.fixture(scope="module")
def inprocess():
    return InProcessClient(MODEL)


@pytest.fixture
async def legacy(legacy_server, inprocess):
    async with LegacyClient(MODEL, legacy_server.endpoint, inprocess.tokenizer) as client:
        yield client


def encode(client, text: str) -> list[int]:
    return [client.bos_token_id, *client.tokenizer(text)["input_ids"]]


def assert_same_choices(got, expected) -> None:
    assert [c.token_id for c in got] == [c.token_id for c in expected]
    for a, b in zip(got, expected):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


async def assert_greedy_like_inprocess(client, inprocess, texts: list[str]) -> None:
    for text in texts:
        ids = encode(inprocess, text)
        assert_same_choices(
            await client.generate(ids, None, 1, SamplingParams()), await inprocess.generate(ids, None, 1, SamplingParams())
        )


def make_mask(client, seed: int, num_allowed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(client.num_tokens, dtype=torch.bool)
    mask[torch.randperm(client.num_tokens, generator=generator)[:num_allowed]] = True
    return mask


# ---- agreement with the in-process backend --------------------------------------------------------


@pytest.mark.parametrize("text", PROMPTS)
async def test_greedy_generate_matches_inprocess(legacy, inprocess, text):
    ids = encode(inprocess, text)
    got = await legacy.generate(ids, None, 5, SamplingParams())
    assert len(got) == 1  # the legacy backend returns one token per call
    assert_same_choices(got, await inprocess.generate(ids, None, 1, SamplingParams()))


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_masked_generate_matches_inprocess(legacy, inprocess, seed):
    ids = encode(inprocess, PROMPTS[seed % len(PROMPTS)])
    mask = make_mask(inprocess, seed, num_allowed=40)
    got = await legacy.generate(ids, mask, 1, SamplingParams())
    assert mask[got[0].token_id]
    assert_same_choices(got, await inprocess.generate(ids, mask, 1, SamplingParams()))


@pytest.mark.parametrize("seed, temperature, top_p", [(0, 1.0, 1.0), (7, 0.7, 0.9), (42, 1.3, 0.95)])
async def test_seeded_sampling_matches_inprocess(legacy, inprocess, seed, temperature, top_p):
    sampling = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)
    mask = make_mask(inprocess, seed, num_allowed=500)
    for text in PROMPTS:
        ids = encode(inprocess, text)
        assert_same_choices(
            await legacy.generate(ids, mask, 1, sampling), await inprocess.generate(ids, mask, 1, sampling)
        )


async def test_a_greedy_decode_token_by_token_matches_inprocess(legacy, inprocess):
    ids = encode(inprocess, "Mrs. Jennings")
    expected = await inprocess.generate(ids, None, 12, SamplingParams())
    got = []
    for _ in expected:
        [choice] = await legacy.generate(ids + [c.token_id for c in got], None, 1, SamplingParams())
        got.append(choice)
        if choice.token_id == inprocess.eos_token_id:
            break
    assert_same_choices(got, expected)


async def test_top_tokens_match_inprocess(legacy, inprocess):
    ids = encode(inprocess, PROMPTS[0])
    assert_same_choices(await legacy.top_tokens(ids, None, 5), await inprocess.top_tokens(ids, None, 5))
    mask = make_mask(inprocess, 5, num_allowed=3)
    masked = await legacy.top_tokens(ids, mask, 10)
    assert len(masked) == 3
    assert_same_choices(masked, await inprocess.top_tokens(ids, mask, 10))


async def test_score_matches_inprocess(legacy, inprocess):
    ids = encode(inprocess, "She had a lively, playful disposition, which delighted in anything ridiculous, "
                            "and she told the story with great spirit among her friends")
    assert len(ids) > 20  # more positions than the client keeps in flight
    got = await legacy.score(ids, 2)
    expected = await inprocess.score(ids, 2)
    assert len(got) == len(ids) - 2
    assert got == pytest.approx(expected, abs=1e-4)
    assert await legacy.score(ids, len(ids)) == []


async def test_many_requests_in_flight_at_once(legacy, inprocess):
    prompts = [encode(inprocess, text) for text in PROMPTS * 2]  # each prompt twice
    got = await asyncio.gather(*(legacy.generate(ids, None, 1, SamplingParams()) for ids in prompts))
    for ids, choices in zip(prompts, got):
        assert_same_choices(choices, await inprocess.generate(ids, None, 1, SamplingParams()))
    assert legacy.transport.supports_long_poll is True


# ---- fake servers on loopback -----------------------------------------------------------------------


async def start_app(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


def make_old_style_app(inprocess: InProcessClient | None) -> web.Application:
    """An original-style server: no long-poll (the query is part of the client id), 50 ms polling.

    With `inprocess`, forwards are answered by the real model; without, nothing is ever answered.
    """
    results: dict[str, list] = {}

    async def queue(request):
        assert not request.query_string, "the client must not send ?wait= to a server that did not offer it"
        payload = json.loads(await request.read())
        key = f"{request.remote}-{payload['client_id']}"
        if inprocess is not None:
            logits = await inprocess.next_token_logits(payload["input_ids"][0])
            results.setdefault(key, []).append(
                {"client_id": key, "sample_id": payload["sample_id"], "next_token_logits": [logits.tolist()]}
            )
        return web.json_response({"sample_id": payload["sample_id"]})

    async def fetch(request):
        key = f"{request.remote}-{request.path_qs.split('/')[2]}"  # as the original: query included
        return web.json_response(results.pop(key, []))

    app = web.Application()
    app.router.add_post("/queue", queue)
    app.router.add_get("/results/{tail:.*}", fetch)
    return app


async def test_polling_fallback_against_an_old_style_server(inprocess):
    runner, endpoint = await start_app(make_old_style_app(inprocess))
    try:
        async with LegacyClient(MODEL, endpoint, inprocess.tokenizer) as client:
            await assert_greedy_like_inprocess(client, inprocess, PROMPTS[:2])
            ids = encode(inprocess, PROMPTS[2])
            assert await client.score(ids, 1) == pytest.approx(await inprocess.score(ids, 1), abs=1e-4)
            assert client.transport.supports_long_poll is False
    finally:
        await runner.cleanup()


async def test_no_result_within_chunk_timeout_names_the_endpoint(inprocess):
    runner, endpoint = await start_app(make_old_style_app(None))
    try:
        async with LegacyClient(MODEL, endpoint, inprocess.tokenizer, chunk_timeout=0.5) as client:
            with pytest.raises(BackendTimeoutError, match=endpoint):
                await client.generate([0, 1], None, 1, SamplingParams())
    finally:
        await runner.cleanup()


# ---- clear errors -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_down_server_says_how_to_start_it(inprocess):
    port = free_port()
    async with LegacyClient(MODEL, f"http://127.0.0.1:{port}/", inprocess.tokenizer) as client:
        with pytest.raises(BackendUnavailableError) as info:
            await client.top_tokens([0], None, 3)
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert f"lmql-backends serve-model {MODEL} --legacy --port {port}" in message


async def test_a_400_carries_the_server_text(legacy_server, inprocess):
    async with LegacyClient("gpt2", legacy_server.endpoint, inprocess.tokenizer) as client:
        with pytest.raises(BackendResponseError, match="The inference API serves model builtin:tiny not gpt2.") as info:
            await client.generate([0], None, 1, SamplingParams())
    assert info.value.status == 400


async def test_an_error_result_is_raised(tiny_model, inprocess):
    from lmql_backends.server.app import serve

    handle = await asyncio.to_thread(serve, tiny_model, port=0, legacy=True, background=True)
    try:
        handle.state.engine.stop()
        async with LegacyClient(MODEL, handle.endpoint, inprocess.tokenizer) as client:
            with pytest.raises(BackendResponseError, match="the engine is shutting down"):
                await client.generate([0], None, 1, SamplingParams())
    finally:
        await asyncio.to_thread(handle.stop)


async def test_api_key_is_sent_as_a_bearer_token(tiny_model, inprocess):
    from lmql_backends.server.app import serve

    handle = await asyncio.to_thread(serve, tiny_model, port=0, legacy=True, background=True, api_key="s3cret")
    try:
        async with LegacyClient(MODEL, handle.endpoint, inprocess.tokenizer, api_key="s3cret") as client:
            assert len(await client.top_tokens([0], None, 2)) == 2
        async with LegacyClient(MODEL, handle.endpoint, inprocess.tokenizer) as client:
            with pytest.raises(BackendResponseError, match="API key") as info:
                await client.top_tokens([0], None, 2)
        assert info.value.status == 401
    finally:
        await asyncio.to_thread(handle.stop)


async def test_a_bad_request_carries_the_detail_header(legacy, inprocess):
    with pytest.raises(BackendResponseError, match=r"Bad request\. \(.*attention_mask"):
        await legacy.transport.call({
            "action": "forward", "input_ids": [[0, 1]], "attention_mask": [[1]], "model_identifier": MODEL,
        })
