"""The legacy API's WebSocket channel (extension 15): the same actions and results as /queue, one connection."""

from __future__ import annotations

import asyncio
import json
import random
import uuid

import aiohttp
import numpy
import pytest
import torch

from lmql_backends.legacy_frames import decode_logits_frame
from lmql_backends.server.legacy.extensions import RowHistory
from lmql_backends.server.legacy.jobs import LogitRows, Sample
from lmql_backends.server.legacy.socket import encode_logits_message

pytestmark = pytest.mark.timeout(120)

MODEL = "builtin:tiny"
SOCKET_PATH = "/queue/socket"


def new_client_id() -> str:
    return f"socket-{uuid.uuid4().hex[:8]}"


def forward_body(client_id: str, sample_id, input_ids, model: str = MODEL) -> dict:
    return {"action": "forward", "client_id": client_id, "sample_id": sample_id, "input_ids": input_ids,
            "attention_mask": None, "model_identifier": model}


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def channel(legacy_server, session):
    async with session.ws_connect(f"http://{legacy_server.endpoint}{SOCKET_PATH}") as socket:
        yield socket


async def post_queue(session, server, body: dict, wait: float | None = None) -> tuple[aiohttp.ClientResponse, dict]:
    params = {"wait": str(wait)} if wait is not None else None
    async with session.post(f"http://{server.endpoint}/queue", json=body, params=params) as response:
        return response, await response.json()


async def next_message(socket) -> aiohttp.WSMessage:
    return await asyncio.wait_for(socket.receive(), 30)


async def test_queue_answers_name_the_channel(legacy_server, session):
    response, _ = await post_queue(session, legacy_server, forward_body(new_client_id(), 0, [[0, 5]]))
    assert response.headers["X-Queue-Socket"] == SOCKET_PATH


@pytest.mark.parametrize("input_ids", [[[0, 17, 30]], [[0, 17, 30], [0, 4]], [0, 17, 30]])
async def test_forward_logits_arrive_binary_and_match_the_json_ones(legacy_server, session, channel, input_ids):
    client_id = new_client_id()
    await channel.send_str(json.dumps(forward_body(client_id, "s-1", input_ids)))
    message = await next_message(channel)
    assert message.type == aiohttp.WSMsgType.BINARY
    result = decode_logits_frame(message.data)
    _, answer = await post_queue(session, legacy_server, forward_body(client_id, 2, input_ids), wait=30)
    expected = numpy.asarray(answer["result"]["next_token_logits"], dtype=numpy.float32)
    assert result["sample_id"] == "s-1" and result["client_id"].endswith(f"-{client_id}")
    shape = (len(input_ids), 2048) if isinstance(input_ids[0], list) else (2048,)
    assert result["next_token_logits"].shape == expected.shape == shape
    # a prefix-cached or batched forward may round differently; the encoding itself is exact (below)
    numpy.testing.assert_allclose(result["next_token_logits"], expected, atol=1e-4)


def test_the_binary_message_holds_the_engine_logits_bit_for_bit():
    logits = torch.randn(2, 2048)
    logits[0, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    message = encode_logits_message(Sample("127.0.0.1-c", 9), "next_token_logits", LogitRows(tuple(logits), True))
    result = decode_logits_frame(message)
    assert result["sample_id"] == 9 and result["client_id"] == "127.0.0.1-c"
    assert result["next_token_logits"].tobytes() == logits.numpy().tobytes()


async def test_many_samples_in_flight_each_get_their_own_result(channel):
    client_id = new_client_id()
    rows = {sample_id: [0, 3 + sample_id, 9] for sample_id in range(12)}
    for sample_id, row in rows.items():
        await channel.send_bytes(json.dumps(forward_body(client_id, sample_id, [row])).encode())
    results = [decode_logits_frame((await next_message(channel)).data) for _ in rows]
    assert sorted(result["sample_id"] for result in results) == list(rows)
    by_id = {result["sample_id"]: result["next_token_logits"] for result in results}
    assert not numpy.array_equal(by_id[0], by_id[1])  # different rows, different logits


async def test_tokenize_and_detokenize_answer_with_the_results_object(channel):
    client_id = new_client_id()
    await channel.send_str(json.dumps({"action": "tokenize", "client_id": client_id, "sample_id": 1, "text": "Emma"}))
    tokenized = json.loads((await next_message(channel)).data)
    await channel.send_str(json.dumps({
        "action": "detokenize", "client_id": client_id, "sample_id": 2, "input_ids": tokenized["input_ids"],
    }))
    detokenized = json.loads((await next_message(channel)).data)
    assert tokenized["sample_id"] == 1 and tokenized["input_ids"]
    assert detokenized == {"client_id": detokenized["client_id"], "sample_id": 2, "text": "Emma"}


async def test_a_refused_action_answers_its_status_and_message(channel):
    await channel.send_str(json.dumps(forward_body(new_client_id(), 5, [[0, 1]], model="gpt2")))
    refusal = json.loads((await next_message(channel)).data)
    assert refusal == {"sample_id": 5, "status": 400, "error": "The inference API serves model builtin:tiny not gpt2."}


async def test_a_refusal_that_echoes_a_lone_surrogate_is_valid_utf8(channel):
    await channel.send_str(json.dumps({"action": "\ud800", "sample_id": "\udfff", "client_id": "c"}))
    refusal = json.loads((await next_message(channel)).data)
    assert refusal == {"sample_id": "\udfff", "status": 400, "error": "Unknown action: \\ud800"}
    refusal["error"].encode("utf-8")  # the sample_id is echoed as sent; the message is valid text


async def test_a_malformed_action_answers_bad_request_with_the_detail(channel):
    body = {**forward_body(new_client_id(), 6, [[0, 1]]), "attention_mask": [[1]]}
    await channel.send_str(json.dumps(body))
    refusal = json.loads((await next_message(channel)).data)
    assert (refusal["sample_id"], refusal["status"], refusal["error"]) == (6, 400, "Bad request.")
    assert "attention_mask" in refusal["detail"]


async def test_a_message_that_is_not_json_is_refused_without_a_sample_id(channel):
    await channel.send_str("{not json")
    refusal = json.loads((await next_message(channel)).data)
    assert (refusal["sample_id"], refusal["status"], refusal["error"]) == (None, 400, "Bad request.")
    assert "not valid JSON" in refusal["detail"]


async def test_results_of_a_dropped_channel_go_to_results(legacy_server, session):
    """A client that vanishes mid-work loses nothing: what was not sent on the channel waits at /results."""
    client_id, generator = new_client_id(), random.Random(3)
    rows = [[0] + [generator.randrange(1, 2048) for _ in range(1000)] for _ in range(6)]  # ~0.1 s of work
    socket = await session.ws_connect(f"http://{legacy_server.endpoint}{SOCKET_PATH}")
    for sample_id, row in enumerate(rows):
        await socket.send_str(json.dumps(forward_body(client_id, sample_id, [row])))
    socket._response.connection.transport.abort()  # gone, without a closing handshake
    collected: list[dict] = []
    async with asyncio.timeout(60):
        while len(collected) < len(rows):
            async with session.get(f"http://{legacy_server.endpoint}/results/{client_id}", params={"wait": "5"}) as r:
                collected += await r.json()
    assert sorted(result["sample_id"] for result in collected) == list(range(len(rows)))
    assert all(len(result["next_token_logits"][0]) == 2048 for result in collected)


async def test_the_api_key_is_checked_on_the_handshake(tiny_model):
    from lmql_backends.server.app import serve

    handle = await asyncio.to_thread(serve, tiny_model, port=0, legacy=True, background=True, api_key="s3cret")
    try:
        url = f"http://{handle.endpoint}{SOCKET_PATH}"
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await session.ws_connect(url)
            assert info.value.status == 401
            async with session.ws_connect(url, headers={"Authorization": "Bearer s3cret"}) as socket:
                await socket.send_str(json.dumps(forward_body(new_client_id(), 1, [[0, 2]])))
                assert (await next_message(socket)).type == aiohttp.WSMsgType.BINARY
    finally:
        await asyncio.to_thread(handle.stop)


async def test_shutdown_closes_open_channels(tiny_model):
    from lmql_backends.server.app import serve

    handle = await asyncio.to_thread(serve, tiny_model, port=0, legacy=True, background=True)
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"http://{handle.endpoint}{SOCKET_PATH}") as socket:
            stopping = asyncio.create_task(asyncio.to_thread(handle.stop))
            message = await next_message(socket)
            await stopping
    assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
    assert socket.close_code == aiohttp.WSCloseCode.GOING_AWAY


# ---- input_ids_after (extension 16): only the new ids of a sequence ----------------------------------


async def forward_over(channel, body: dict):
    await channel.send_str(json.dumps(body))
    message = await next_message(channel)
    return decode_logits_frame(message.data) if message.type == aiohttp.WSMsgType.BINARY else json.loads(message.data)


async def test_queue_answers_say_the_channel_takes_input_ids_after(legacy_server, session):
    response, _ = await post_queue(session, legacy_server, forward_body(new_client_id(), 0, [[0, 5]]))
    assert response.headers["X-Input-Ids-After"] == "1"


@pytest.mark.parametrize("new_ids", [[[11, 12, 13]], [11, 12, 13], [[]]])
async def test_new_ids_after_an_earlier_row_give_the_logits_of_the_whole_sequence(channel, new_ids):
    client_id, base = new_client_id(), [0, 17, 30, 5]
    await forward_over(channel, forward_body(client_id, 1, [base]))
    appended = await forward_over(channel, {**forward_body(client_id, 2, new_ids), "input_ids_after": 1})
    flat = new_ids[0] if new_ids and isinstance(new_ids[0], list) else new_ids
    whole = await forward_over(channel, forward_body(client_id, 3, [base + flat]))
    assert appended["sample_id"] == 2
    assert appended["next_token_logits"].shape == ((1, 2048) if isinstance(new_ids[0], list) else (2048,))
    numpy.testing.assert_allclose(appended["next_token_logits"].reshape(-1), whole["next_token_logits"][0], atol=1e-4)
    chained = await forward_over(channel, {**forward_body(client_id, 4, [[7]]), "input_ids_after": 2})
    again = await forward_over(channel, forward_body(client_id, 5, [base + flat + [7]]))
    numpy.testing.assert_allclose(chained["next_token_logits"], again["next_token_logits"], atol=1e-4)


@pytest.mark.parametrize("change, detail", [
    ({"input_ids_after": 99}, "input_ids_after names a sample this channel does not hold (99; it keeps"),
    ({"input_ids_after": [1]}, "input_ids_after names a sample this channel does not hold ([1]; it keeps"),
    ({"input_ids": [[5], [6]]}, "with input_ids_after, send one row of new token ids and a null attention_mask"),
    ({"attention_mask": [[1]]}, "attention_mask"),
    ({"action": "tokenize", "text": "Emma"}, "input_ids_after is only accepted on forward actions, not 'tokenize'"),
])
async def test_an_input_ids_after_the_channel_cannot_use_is_refused_naming_the_fix(channel, change, detail):
    client_id = new_client_id()
    await forward_over(channel, forward_body(client_id, 1, [[0, 17]]))
    refusal = await forward_over(channel, {**forward_body(client_id, 2, [[5]]), "input_ids_after": 1, **change})
    assert (refusal["sample_id"], refusal["status"], refusal["error"]) == (2, 400, "Bad request.")
    assert detail in refusal["detail"]


async def test_new_ids_are_checked_and_the_whole_sequence_must_fit_the_context(channel):
    client_id = new_client_id()
    await forward_over(channel, forward_body(client_id, 1, [[0] * 1000]))
    outside = await forward_over(channel, {**forward_body(client_id, 2, [[5, 4096]]), "input_ids_after": 1})
    assert outside["status"] == 400 and "contains token id 4096, outside the vocabulary" in outside["error"]
    too_long = await forward_over(channel, {**forward_body(client_id, 3, [[5] * 30]), "input_ids_after": 1})
    assert too_long["status"] == 400 and "has 1030 tokens, more than the model's context length" in too_long["error"]


async def test_a_refused_forward_is_no_base_and_old_rows_are_forgotten(legacy_server, session, monkeypatch):
    monkeypatch.setattr(RowHistory.__init__, "__defaults__", (2,))  # channels opened from now on keep 2 rows
    client_id = new_client_id()
    async with session.ws_connect(f"http://{legacy_server.endpoint}{SOCKET_PATH}") as channel:
        await forward_over(channel, forward_body(client_id, 1, [[0, 4096]]))  # refused: never a base
        for sample_id in (2, 3, 4):
            await forward_over(channel, forward_body(client_id, sample_id, [[0, sample_id]]))
        held = []
        for base in (1, 2, 3, 4):
            answer = await forward_over(channel, {**forward_body(client_id, 10 + base, [[9]]), "input_ids_after": base})
            held.append("status" not in answer)
    assert held == [False, False, True, True]


async def test_input_ids_after_is_refused_on_post_queue(legacy_server, session):
    body = {**forward_body(new_client_id(), 1, [[5]]), "input_ids_after": 0}
    async with session.post(f"http://{legacy_server.endpoint}/queue", json=body) as response:
        assert response.status == 400
        assert "input_ids_after is only accepted on the WebSocket channel" in response.headers["X-Error-Detail"]
