"""KV memory over HTTP (real servers on loopback, builtin:tiny): /metrics reports it, a branch of a
shared prompt costs only its tail, and --kv-cache-bytes bounds it: a request that can never fit is a
400 naming the flag (an LMTP error item too), a queue full of requests waiting for KV memory is a 503
with Retry-After, and the server serves again once memory frees."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from lmql_backends.engine import EngineConfig
from lmql_backends.server.app import serve

pytestmark = pytest.mark.timeout(180)

MODEL = "builtin:tiny"
BYTES_PER_TOKEN = 4 * 2 * 4 * 32 * 4  # the tiny model: 4 layers x keys and values x 4 heads x 32 wide x float32
TIMEOUT = aiohttp.ClientTimeout(total=120)
KV_FIELDS = (
    "kv_bytes_per_token", "kv_limit_bytes", "kv_used_bytes", "kv_used_tokens", "kv_shared_bytes", "kv_private_bytes",
    "kv_prefix_cache_bytes", "kv_total_bytes", "kv_reserved_bytes", "kv_free_bytes", "num_waiting_for_kv",
    "num_preemptions",
)


@pytest.fixture
async def session():
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        yield session


@pytest.fixture(scope="module")
def open_server():
    handle = serve(MODEL, port=0, background=True)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def small_kv_server():
    """KV memory for 64 tokens."""
    handle = serve(MODEL, port=0, background=True, engine=EngineConfig(kv_cache_bytes=64 * BYTES_PER_TOKEN))
    yield handle
    handle.stop()


async def metrics(session, server) -> dict[str, float]:
    async with session.get(f"http://{server.endpoint}/metrics") as response:
        text = await response.text()
    pairs = (line.split() for line in text.splitlines() if line.startswith("lmql_backends_"))
    return {name[len("lmql_backends_"):]: float(value) for name, value in pairs}


async def wait_for_metrics(session, server, condition, seconds: float = 60, each=None) -> dict[str, float]:
    """The first /metrics answer for which `condition` holds (`each` checks every answer on the way)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while True:
        values = await metrics(session, server)
        if each is not None:
            each(values)
        if condition(values):
            return values
        assert loop.time() < end, f"/metrics never showed the awaited state: {values}"
        await asyncio.sleep(0.02)


def completion(prompt: list[int], max_tokens: int, **fields) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 1.0,
            "seed": 1, **fields}


async def post(session, server, body: dict) -> tuple[int, dict, dict]:
    async with session.post(f"http://{server.endpoint}/v1/completions", json=body) as response:
        return response.status, dict(response.headers), await response.json()


def check_consistent(values: dict[str, float]) -> None:
    """What every /metrics answer must satisfy."""
    assert values["kv_shared_bytes"] + values["kv_private_bytes"] == values["kv_used_bytes"]
    assert values["kv_used_tokens"] * values["kv_bytes_per_token"] == values["kv_used_bytes"]
    assert values["kv_total_bytes"] >= max(values["kv_used_bytes"], values["kv_prefix_cache_bytes"])
    if values["kv_limit_bytes"]:
        assert values["kv_total_bytes"] <= values["kv_limit_bytes"], values
        assert values["kv_free_bytes"] <= values["kv_limit_bytes"] - values["kv_total_bytes"]


# ---- /metrics ------------------------------------------------------------------------------------


async def test_metrics_list_the_kv_memory_gauges(session, open_server):
    values = await metrics(session, open_server)
    assert set(KV_FIELDS) <= set(values)
    assert values["kv_bytes_per_token"] == BYTES_PER_TOKEN
    assert values["kv_limit_bytes"] == 0 and values["kv_free_bytes"] == 0  # no bound by default
    check_consistent(values)


async def test_eight_choices_of_one_prompt_hold_its_cached_part_once(session, open_server):
    prompt, num_cached = [5 + i % 60 for i in range(130)], 110
    status, _, _ = await post(session, open_server, completion(prompt[:num_cached], 1))  # the shared part, cached
    assert status == 200
    choices = asyncio.create_task(post(session, open_server, completion(prompt, 400, n=8)))
    values = await wait_for_metrics(
        session, open_server, lambda v: v["num_running"] == 8 and v["kv_shared_bytes"] > 0, each=check_consistent)
    assert values["kv_shared_bytes"] == num_cached * BYTES_PER_TOKEN  # counted once, not eight times
    tails = values["kv_private_bytes"] / BYTES_PER_TOKEN
    assert tails >= 8 * (len(prompt) - num_cached)  # each choice's own tokens
    assert values["kv_used_tokens"] == num_cached + tails
    assert values["kv_prefix_cache_bytes"] >= num_cached * BYTES_PER_TOKEN
    status, _, body = await choices
    assert status == 200 and len(body["choices"]) == 8
    assert all(choice["finish_reason"] == "length" for choice in body["choices"])


# ---- --kv-cache-bytes ------------------------------------------------------------------------------


async def test_a_request_that_can_never_fit_is_a_400_naming_the_flag(session, small_kv_server):
    status, _, body = await post(session, small_kv_server, completion(list(range(1, 51)), 20))
    assert status == 400
    error = body["error"]
    assert error["code"] == "kv_cache_exceeded" and error["param"] == "max_tokens"
    assert "--kv-cache-bytes" in error["message"] and "50 tokens" in error["message"]
    status, _, body = await post(session, small_kv_server, completion(list(range(1, 41)), 20))  # 60 tokens fit
    assert status == 200 and body["usage"]["completion_tokens"] == 20


async def test_lmtp_gets_the_same_error_as_an_error_item(session, small_kv_server):
    async with session.ws_connect(f"http://{small_kv_server.endpoint}/") as ws:
        payload = {"model": MODEL, "prompt": list(range(1, 61)), "stream_id": 3, "max_tokens": 10}
        await ws.send_str(f"GENERATE {json.dumps(payload)}")
        command, _, items = (await asyncio.wait_for(ws.receive_str(), 60)).partition(" ")
    [item] = json.loads(items)
    assert command == "TOKEN" and item["stream_id"] == 3
    assert item["code"] == "kv_cache_exceeded" and "--kv-cache-bytes" in item["error"]


async def test_the_legacy_api_delivers_the_same_error_as_the_samples_result(session):
    server = serve(MODEL, port=0, background=True, legacy=True, engine=EngineConfig(kv_cache_bytes=64 * BYTES_PER_TOKEN))
    try:
        url = f"http://{server.endpoint}"
        for sample_id, ids in (("too-long", list(range(1, 81))), ("fits", list(range(1, 41)))):
            body = {"action": "forward", "client_id": "kv", "sample_id": sample_id, "input_ids": [ids],
                    "attention_mask": None, "model_identifier": MODEL}
            async with session.post(f"{url}/queue", data=json.dumps(body)) as response:
                assert response.status == 200 and await response.json() == {"sample_id": sample_id}
        results: dict = {}
        while len(results) < 2:  # long polls
            async with session.get(f"{url}/results/kv", params={"wait": 5}) as response:
                results.update((r["sample_id"], r) for r in await response.json())
    finally:
        server.stop()
    assert "--kv-cache-bytes" in results["too-long"]["error"] and "80 tokens" in results["too-long"]["error"]
    [logits] = results["fits"]["next_token_logits"]  # one row
    assert len(logits) == server.state.loaded.vocab_size


@pytest.mark.parametrize("engine_process", [True, False], ids=["engine-process", "engine-thread"])
async def test_a_queue_full_of_requests_waiting_for_kv_is_a_503_then_the_server_serves_again(session, engine_process):
    """Memory for one 210-token request at a time, four sequence slots and one queue place: five requests are
    taken (one runs, four wait for memory); the sixth is refused with 503; once they are done, one more runs."""
    limit = 300 * BYTES_PER_TOKEN
    config = EngineConfig(kv_cache_bytes=limit, max_num_seqs=4, max_queue=1)
    server = serve(MODEL, port=0, background=True, engine=config, engine_process=engine_process)
    try:
        body = completion(list(range(1, 11)), 200)
        taken = [asyncio.create_task(post(session, server, {**body, "seed": i})) for i in range(5)]
        await wait_for_metrics(session, server, lambda v: v["num_waiting_for_kv"] == 4, each=check_consistent)
        status, headers, refused = await post(session, server, body)
        assert status == 503, refused
        assert refused["error"]["code"] == "kv_cache_full" and "--kv-cache-bytes" in refused["error"]["message"]
        assert int(headers["Retry-After"]) >= 1
        while not all(task.done() for task in taken):  # the bound holds while they run
            check_consistent(await metrics(session, server))
            await asyncio.wait(taken, timeout=0.05)
        for task in taken:
            status, _, answer = task.result()
            assert status == 200 and answer["usage"]["completion_tokens"] == 200
        status, _, answer = await post(session, server, completion(list(range(1, 11)), 5))
        assert status == 200 and answer["usage"]["completion_tokens"] == 5
    finally:
        server.stop()
