"""Overload: 64 concurrent requests against small limits; each completes or is refused, none hangs.

New API: a refused request is a 429 OpenAI error with ``Retry-After``. Legacy API: a refused
forward is ``429 text/plain`` with ``Retry-After`` before any ``200``, and every accepted sample
still gets its result (nothing is lost). Both runtime clients report a refusal as a clear
`BackendResponseError` with ``status == 429``, without waiting.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from lmql_backends.client.legacy_client import LegacyClient
from lmql_backends.client.openai_client import OpenAIClient
from lmql_backends.engine import EngineConfig, Request, SamplingParams
from lmql_backends.errors import BackendResponseError
from reliability_support import MODEL, base_url, collect_legacy, new_client_id, sse_payloads, start_server, wait_until

pytestmark = pytest.mark.timeout(180)

NUM_REQUESTS = 64
MAX_TOKENS = 32
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=90)  # a request still open after this is a hang
LONG_PROMPT_LENGTH = 900


@pytest.fixture(scope="module")
def new_server():
    handle = start_server(engine=EngineConfig(max_num_seqs=4, max_queue=8))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def legacy_server():
    handle = start_server(legacy=True, engine=EngineConfig(max_num_seqs=2, max_queue=4))
    yield handle
    handle.stop()


def retry_after(headers) -> int:
    value = headers["Retry-After"]
    assert value.isdigit() and int(value) >= 1, value
    return int(value)


# ---- new API ------------------------------------------------------------------------------------


async def one_stream(session: aiohttp.ClientSession, url: str, seed: int) -> str:
    """'completed' (a whole stream) or 'refused' (429 with Retry-After); anything else fails."""
    body = {"model": MODEL, "prompt": [0, seed % 2000 + 1], "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "temperature": 0.8, "seed": seed, "stream": True}
    async with session.post(url, json=body) as response:
        text = await response.text()
        if response.status == 429:
            retry_after(response.headers)
            assert json.loads(text)["error"]["code"] == "queue_full"
            return "refused"
    assert response.status == 200, text
    payloads = sse_payloads(text)
    assert payloads[-1] == "[DONE]" and not any('"error"' in p for p in payloads), payloads[-2:]
    finishes = [c["finish_reason"] for p in payloads[:-1] for c in json.loads(p)["choices"] if c["finish_reason"]]
    assert finishes == ["length"], finishes
    return "completed"


async def many_streams(url: str) -> list[str]:
    connector = aiohttp.TCPConnector(limit=NUM_REQUESTS)
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT, connector=connector) as session:
        return await asyncio.gather(*(one_stream(session, url, seed) for seed in range(NUM_REQUESTS)))


def test_64_streams_each_complete_or_get_429_with_retry_after(new_server):
    outcomes = asyncio.run(many_streams(base_url(new_server) + "/v1/completions"))
    assert outcomes.count("completed") >= 1 and outcomes.count("refused") >= 1, outcomes
    engine = new_server.state.engine
    # num_pending is what admission counts (it drops just after a sequence leaves the scheduler)
    assert wait_until(lambda: engine.stats().num_running + engine.stats().num_waiting == 0
                      and engine.num_pending == 0, seconds=10)


async def openai_client_call(endpoint: str, tokenizer):
    async with OpenAIClient(MODEL, endpoint, tokenizer, chunk_timeout=30) as client:
        return await client.generate([0, 5], None, 2, SamplingParams(temperature=0))


def test_openai_client_reports_a_full_server_as_a_429(new_server):
    engine = new_server.state.engine
    blockers = occupy(engine)
    try:
        with pytest.raises(BackendResponseError) as info:
            asyncio.run(openai_client_call(new_server.endpoint, new_server.state.loaded.tokenizer))
        assert info.value.status == 429 and "retry" in str(info.value)
    finally:
        release(engine, blockers)
    assert len(asyncio.run(openai_client_call(new_server.endpoint, new_server.state.loaded.tokenizer))) == 2


def occupy(engine) -> list[Request]:
    """Fill every slot of the engine (running and queued) with long generations."""
    # an earlier test's requests may still be finishing: start from an idle engine
    assert wait_until(lambda: engine.num_pending == 0, seconds=10)
    capacity = engine.config.max_num_seqs + engine.config.max_queue
    blockers = [Request([0, 1], 1000, SamplingParams(temperature=0)) for _ in range(capacity)]
    for request in blockers:
        engine.submit(request, lambda out: None)
    return blockers


def release(engine, blockers: list[Request]) -> None:
    for request in blockers:
        engine.abort(request.request_id)
    # num_pending is what admission counts (it drops just after a sequence leaves the scheduler)
    assert wait_until(lambda: engine.stats().num_running + engine.stats().num_waiting == 0
                      and engine.num_pending == 0, seconds=10)


# ---- legacy API ---------------------------------------------------------------------------------


async def one_forward(session: aiohttp.ClientSession, url: str, client_id: str, sample_id: int) -> str:
    ids = [0, *[(sample_id * 31 + i) % 2000 + 1 for i in range(LONG_PROMPT_LENGTH)]]  # no shared prefix
    body = {"action": "forward", "client_id": client_id, "sample_id": sample_id, "input_ids": [ids],
            "attention_mask": None, "model_identifier": MODEL}
    async with session.post(url, data=json.dumps(body)) as response:
        text = await response.text()
        if response.status == 429:
            retry_after(response.headers)
            assert response.headers["Content-Type"].startswith("text/plain") and "retry later" in text, text
            return "refused"
    assert response.status == 200 and json.loads(text) == {"sample_id": sample_id}, text
    return "accepted"


async def many_forwards(url: str, client_id: str) -> list[str]:
    connector = aiohttp.TCPConnector(limit=NUM_REQUESTS)
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT, connector=connector) as session:
        return await asyncio.gather(*(one_forward(session, url, client_id, i) for i in range(NUM_REQUESTS)))


def test_64_legacy_forwards_are_accepted_or_429_and_no_sample_is_lost(legacy_server):
    client_id = new_client_id("load")
    outcomes = asyncio.run(many_forwards(base_url(legacy_server) + "/queue", client_id))
    assert outcomes.count("accepted") >= 1 and outcomes.count("refused") >= 1, outcomes
    accepted = {i for i, outcome in enumerate(outcomes) if outcome == "accepted"}
    results = collect_legacy(legacy_server, client_id, len(accepted))
    assert {r["sample_id"] for r in results} == accepted
    vocab = legacy_server.state.loaded.vocab_size
    assert all(len(r["next_token_logits"][0]) == vocab for r in results), [r for r in results if "error" in r][:1]


async def legacy_client_call(endpoint: str, tokenizer):
    async with LegacyClient(MODEL, endpoint, tokenizer, chunk_timeout=30) as client:
        return await client.next_token_logits([0, 5])


def test_legacy_client_reports_a_full_server_as_a_429(legacy_server):
    engine = legacy_server.state.engine
    blockers = occupy(engine)
    try:
        with pytest.raises(BackendResponseError) as info:
            asyncio.run(legacy_client_call(legacy_server.endpoint, legacy_server.state.loaded.tokenizer))
        assert info.value.status == 429 and "retry later" in str(info.value)
    finally:
        release(engine, blockers)
    logits = asyncio.run(legacy_client_call(legacy_server.endpoint, legacy_server.state.loaded.tokenizer))
    assert logits.shape == (legacy_server.state.loaded.vocab_size,)
