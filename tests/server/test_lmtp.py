"""LMTP (LMQL 0.7.x's protocol) at ``/`` of serve-model: every command and error path, real WebSocket.

Replies are checked field by field against what LMQL 0.7.3's client reads (lmtp_client.py,
lmtp_dcmodel.py): ``TOKEN``/``MSG`` frames holding JSON lists of items with ``stream_id``.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from aiohttp import web

from lmql_backends.engine import EngineConfig
from lmql_backends.server import lmtp
from lmql_backends.server.app import serve

pytestmark = pytest.mark.timeout(300)

MODEL = "builtin:tiny"
VOCAB = 2048
CONTEXT = 1024
EOS = 0
KEY = "lmtp-test-key"
TRANSCRIPTS = Path(__file__).parent / "lmtp_transcripts"
REPO = Path(__file__).resolve().parents[2]
TOKEN_FIELDS = {"token", "stream_id", "logprob", "finish_reason", "top_logprobs"}
ERROR_FIELDS = {"stream_id", "error", "param", "code"}


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def ws(new_server, session):
    async with session.ws_connect(f"http://{new_server.endpoint}/") as socket_:
        yield socket_


@pytest.fixture(scope="module")
def small_server(tiny_model):
    """One running sequence and one queued: the third concurrent stream is over capacity."""
    handle = serve(tiny_model, port=0, background=True, engine=EngineConfig(max_num_seqs=1, max_queue=1))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def keyed_server(tiny_model):
    handle = serve(tiny_model, port=0, background=True, api_key=KEY, engine_process=False)
    yield handle
    handle.stop()


def frame(command: str, **payload) -> str:
    return f"{command} {json.dumps(payload)}"


def generate(stream_id: int, prompt: list[int], **kwargs) -> str:
    return frame("GENERATE", model=MODEL, prompt=prompt, stream_id=stream_id, **kwargs)


async def receive_items(ws, kind: str = "TOKEN") -> list[dict]:
    text = await asyncio.wait_for(ws.receive_str(), 60)
    command, _, payload = text.partition(" ")
    assert command == kind, text[:200]
    items = json.loads(payload)
    assert isinstance(items, list)
    return items


async def collect(ws, stream_ids) -> dict[int, list[dict]]:
    """Every item of `stream_ids` until each has a finish_reason or an error."""
    streams = {sid: [] for sid in stream_ids}
    open_ids = set(stream_ids)
    while open_ids:
        for item in await receive_items(ws):
            streams.setdefault(item["stream_id"], []).append(item)
            if item.get("error") is not None or item.get("finish_reason") is not None:
                open_ids.discard(item["stream_id"])
    return streams


async def one_stream(ws, text: str, stream_id: int) -> list[dict]:
    await ws.send_str(text)
    return (await collect(ws, [stream_id]))[stream_id]


async def metric(session, server, name: str) -> float:
    async with session.get(f"http://{server.endpoint}/metrics") as response:
        text = await response.text()
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(f"lmql_backends_{name} ")))


async def wait_idle(session, server, seconds: float = 60) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while await metric(session, server, "num_running") + await metric(session, server, "num_waiting") > 0:
        assert loop.time() < end, "the engine still runs streams"
        await asyncio.sleep(0.02)


def check_token_item(item: dict, stream_id: int) -> None:
    assert set(item) == TOKEN_FIELDS
    assert item["stream_id"] == stream_id
    assert isinstance(item["token"], int) and 0 <= item["token"] < VOCAB
    assert isinstance(item["logprob"], float) and item["logprob"] <= 0
    assert item["finish_reason"] in (None, "stop", "length")
    assert all(isinstance(k, str) and k.isdigit() and isinstance(v, float) for k, v in item["top_logprobs"].items())
    assert str(item["token"]) in item["top_logprobs"]
    assert item["top_logprobs"][str(item["token"])] == item["logprob"]


def check_error_item(item: dict, stream_id, param: str | None, code: str | None = None) -> None:
    assert set(item) == ERROR_FIELDS
    assert item["stream_id"] == stream_id
    assert isinstance(item["error"], str) and item["error"]
    assert item["param"] == param
    if code is not None:
        assert item["code"] == code


# ---- commands ------------------------------------------------------------------------------


async def test_model_info_answers_a_msg_with_the_stream_id(ws):
    await ws.send_str(frame("MODEL_INFO", stream_id=7, model=MODEL, data={"model": MODEL}))
    [item] = await receive_items(ws, "MSG")
    assert item["stream_id"] == 7
    info = item["model_info"]
    assert info["model"] == MODEL and info["vocab_size"] == VOCAB and info["context_length"] == CONTEXT


async def test_generate_streams_max_tokens_items_ending_with_length(ws):
    items = await one_stream(ws, generate(1, [0, 40, 41, 42], max_tokens=6), 1)
    assert len(items) == 6
    for item in items:
        check_token_item(item, 1)
    assert [i["finish_reason"] for i in items] == [None] * 5 + ["length"]


async def test_generate_is_greedy_and_equals_the_openai_api_on_the_same_engine(ws, new_server, session):
    prompt = [0, 100, 200, 300]
    items = await one_stream(ws, generate(2, prompt, max_tokens=8, temperature=0.0), 2)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 1,
            "return_tokens_as_token_ids": True}
    async with session.post(f"http://{new_server.endpoint}/v1/completions", json=body) as response:
        choice = (await response.json())["choices"][0]
    openai_ids = [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
    assert [i["token"] for i in items] == openai_ids
    for item, logprob in zip(items, choice["logprobs"]["token_logprobs"]):
        assert math.isclose(item["logprob"], logprob, abs_tol=1e-5)


async def test_defaults_are_lmql_servers(ws):
    """No max_tokens: 32 tokens; no top_logprobs: one entry (the sampled token)."""
    items = await one_stream(ws, generate(3, [0, 7, 8]), 3)
    assert len(items) == 32
    assert all(len(i["top_logprobs"]) == 1 for i in items)


async def test_top_logprobs_holds_the_k_best_and_the_sampled_token(ws):
    items = await one_stream(ws, generate(4, [0, 9, 10], max_tokens=4, top_logprobs=5), 4)
    for item in items:
        check_token_item(item, 4)
        top = item["top_logprobs"]
        assert len(top) == 5
        assert item["logprob"] == max(top.values())  # greedy: the sampled token is the best
    sampled = await one_stream(ws, generate(5, [0, 9, 10], max_tokens=8, top_logprobs=1, temperature=1.5, seed=3), 5)
    for item in sampled:  # sampling picks tokens that are not the best: they are added
        check_token_item(item, 5)
        assert 1 <= len(item["top_logprobs"]) <= 2


async def test_logit_bias_applies_at_every_step(ws):
    items = await one_stream(ws, generate(6, [0, 11], max_tokens=12, logit_bias={"5": 100, "6": 100}), 6)
    assert len(items) == 12 and {i["token"] for i in items} <= {5, 6}
    masked = await one_stream(ws, generate(7, [0, 11], max_tokens=12, logit_bias={"5": -100, "6": -100}), 7)
    assert not {i["token"] for i in masked} & {5, 6}


async def test_eos_ends_a_stream_with_stop(ws):
    items = await one_stream(ws, generate(8, [0, 12], max_tokens=10, logit_bias={str(EOS): 100}), 8)
    assert len(items) == 1 and items[0]["token"] == EOS and items[0]["finish_reason"] == "stop"


async def test_score_gives_each_scored_tokens_logprob(ws):
    prompt = [0, 100, 200]
    generated = await one_stream(ws, generate(9, prompt, max_tokens=3), 9)
    scored = [i["token"] for i in generated]
    items = await one_stream(ws, frame("SCORE", model=MODEL, prompt=prompt, scored=scored, stream_id=10), 10)
    assert [set(i) for i in items] == [{"token", "stream_id", "logprob", "finish_reason"}] * 3
    assert [i["token"] for i in items] == scored
    assert [i["finish_reason"] for i in items] == [None, None, "stop"]
    for score, gen in zip(items, generated):
        assert math.isclose(score["logprob"], gen["logprob"], abs_tol=1e-4)


async def test_streams_of_one_connection_interleave(ws):
    no_eos = {str(EOS): -100}
    await ws.send_str(generate(11, [0, 20], max_tokens=5, logit_bias=no_eos))
    await ws.send_str(generate(12, [0, 21], max_tokens=7, logit_bias=no_eos))
    await ws.send_str(frame("SCORE", model=MODEL, prompt=[0, 22], scored=[1, 2], stream_id=13))
    streams = await collect(ws, [11, 12, 13])
    assert [len(streams[s]) for s in (11, 12, 13)] == [5, 7, 2]


async def test_a_prompt_that_extends_an_earlier_one_reuses_its_kv_cache(ws, new_server, session):
    prompt = [0] + [(i * 37) % 2000 + 1 for i in range(300)]
    first = await one_stream(ws, generate(14, prompt, max_tokens=16, logit_bias={str(EOS): -100}), 14)
    assert len(first) == 16
    await wait_idle(session, new_server)
    before = await metric(session, new_server, "num_cached_prompt_tokens")
    extended = prompt + [i["token"] for i in first]
    await one_stream(ws, generate(15, extended, max_tokens=16), 15)
    cached = await metric(session, new_server, "num_cached_prompt_tokens") - before
    assert cached >= len(prompt) + 15  # everything but the last generated token, which was never run


# ---- errors ---------------------------------------------------------------------------------


BAD_FRAMES = [
    ("HELLO {\"stream_id\": 1}", 1, "command", None),
    ("GENERATE", None, "command", None),
    ("GENERATE {not json", None, "payload", None),
    ("GENERATE [1, 2]", None, "payload", None),
    (generate(21, [0, VOCAB]), 21, "prompt", None),
    (generate(22, [0, -1]), 22, "prompt", None),
    (generate(23, []), 23, "prompt", None),
    (generate(24, "hello"), 24, "prompt", None),
    (generate(25, [0] * CONTEXT), 25, "prompt", "context_length_exceeded"),
    (generate(26, [0, 1], logit_bias={"x": 1}), 26, "logit_bias", None),
    (generate(27, [0, 1], logit_bias={str(VOCAB): 1}), 27, "logit_bias", None),
    (generate(28, [0, 1], logit_bias={"3": "high"}), 28, "logit_bias", None),
    (generate(29, [0, 1], max_tokens=0), 29, "max_tokens", None),
    (generate(30, [0, 1], temperature=-1), 30, "temperature", None),
    (generate(31, [0, 1], top_logprobs=1000), 31, "top_logprobs", None),
    (generate(32, [0, 1], top_k=5), 32, "top_k", None),
    (generate(33, [0, 1], beams=5), 33, "beams", None),
    (frame("GENERATE", model=MODEL, prompt=[0, 1]), None, "stream_id", None),
    (frame("GENERATE", model=MODEL, prompt=[0, 1], stream_id="a"), "a", "stream_id", None),
    (frame("GENERATE", model="gpt2", prompt=[0, 1], stream_id=34), 34, "model", "model_not_found"),
    (frame("SCORE", model=MODEL, prompt=[0, 1], scored=[], stream_id=35), 35, "scored", None),
    (frame("SCORE", model=MODEL, prompt=[0, 1], scored=[VOCAB + 5], stream_id=36), 36, "scored", None),
    (frame("SCORE", model=MODEL, prompt=[0] * 1000, scored=[1] * 30, stream_id=37), 37, "scored",
     "context_length_exceeded"),
]


@pytest.mark.parametrize("text, stream_id, param, code", BAD_FRAMES)
async def test_a_bad_frame_gets_an_error_item_naming_the_field(ws, text, stream_id, param, code):
    await ws.send_str(text)
    [item] = await receive_items(ws)
    check_error_item(item, stream_id, param, code)
    assert len(await one_stream(ws, generate(99, [0, 1], max_tokens=2), 99)) == 2  # the connection still works


async def test_a_binary_frame_gets_an_error_item(ws):
    await ws.send_bytes(b"GENERATE {}")
    [item] = await receive_items(ws)
    check_error_item(item, None, "frame")
    assert len(await one_stream(ws, generate(98, [0, 1], max_tokens=2), 98)) == 2


async def test_a_running_stream_id_cannot_be_reused(ws):
    await ws.send_str(generate(40, [0, 1], max_tokens=200))
    await ws.send_str(generate(40, [0, 1], max_tokens=2))
    streams: dict[int, list[dict]] = {40: []}
    while not any(i.get("finish_reason") for i in streams[40]):
        for item in await receive_items(ws):
            streams[item["stream_id"]].append(item)
    errors = [i for i in streams[40] if "error" in i]
    assert len(errors) == 1 and errors[0]["param"] == "stream_id"
    assert len([i for i in streams[40] if "token" in i]) == 200


async def test_overload_is_an_error_item_per_stream_never_a_hang(small_server, session):
    async with session.ws_connect(f"http://{small_server.endpoint}/") as ws:
        for sid in range(1, 6):
            await ws.send_str(generate(sid, [0, sid], max_tokens=100))
        streams = await collect(ws, range(1, 6))
        refused = [sid for sid, items in streams.items() if items[-1].get("error")]
        finished = [sid for sid, items in streams.items() if items[-1].get("finish_reason") == "length"]
        assert refused and finished and len(refused) + len(finished) == 5
        for sid in refused:
            check_error_item(streams[sid][-1], sid, None, "queue_full")
        assert len(await one_stream(ws, generate(9, [0, 1], max_tokens=2), 9)) == 2


async def test_closing_the_connection_cancels_its_streams(new_server, session):
    await wait_idle(session, new_server)
    before = await metric(session, new_server, "num_generated_tokens")
    async with session.ws_connect(f"http://{new_server.endpoint}/") as ws:
        for sid in range(1, 5):
            await ws.send_str(generate(sid, [0, sid], max_tokens=1000))
        await receive_items(ws)  # the streams run
    await wait_idle(session, new_server)
    assert await metric(session, new_server, "num_generated_tokens") - before < 4 * 1000 / 2


@pytest.fixture
async def low_limit_endpoint(new_server):
    """The LMTP endpoint over new_server's engine, with a 64 KiB limit of unread replies."""
    app = web.Application()
    lmtp.add_routes(app, new_server.state, max_unsent=2**16)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    await runner.cleanup()


async def test_a_client_that_stops_reading_loses_its_streams(new_server, low_limit_endpoint, session):
    """Replies pile up unread (the client does not read): the server cancels the streams long
    before they finish, and says why once the client reads again."""
    await wait_idle(session, new_server)
    before = await metric(session, new_server, "num_generated_tokens")
    num_streams = 8
    async with session.ws_connect(f"http://{low_limit_endpoint}/") as ws:
        ws.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        for sid in range(num_streams):
            await ws.send_str(generate(sid, [0, sid + 1], max_tokens=1000, top_logprobs=100,
                                       logit_bias={str(EOS): -100}))
        await wait_idle(session, new_server, 150)  # without reading a single reply
        generated = await metric(session, new_server, "num_generated_tokens") - before
        assert generated < num_streams * 1000 * 0.9
        streams = await collect(ws, range(num_streams))
        errors = [items[-1] for items in streams.values() if items[-1].get("error")]
        assert errors and all("unread" in e["error"] for e in errors)


async def test_get_without_websocket_is_a_clear_400(new_server, session):
    async with session.get(f"http://{new_server.endpoint}/") as response:
        assert response.status == 400
        assert "WebSocket" in (await response.json())["error"]["message"]


# ---- the API key -----------------------------------------------------------------------------


async def test_the_api_key_covers_the_websocket(keyed_server, session):
    base = f"http://{keyed_server.endpoint}/"
    for url, headers in ((base, {}), (base + "?api_key=wrong", {}), (base, {"Authorization": "Bearer wrong"})):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url, headers=headers)
        assert refused.value.status == 401
    for url, headers in ((base + f"?api_key={KEY}", {}), (base, {"Authorization": f"Bearer {KEY}"})):
        async with session.ws_connect(url, headers=headers) as ws:
            assert len(await one_stream(ws, generate(1, [0, 1], max_tokens=2), 1)) == 2


async def test_the_query_key_opens_only_the_lmtp_path(keyed_server, session):
    async with session.get(f"http://{keyed_server.endpoint}/v1/models?api_key={KEY}") as response:
        assert response.status == 401


# ---- golden transcripts ---------------------------------------------------------------------


def close(expected, actual) -> bool:
    """Equal, with floats to 1e-4 (the transcripts were recorded on another machine's BLAS)."""
    if isinstance(expected, float) and isinstance(actual, float):
        return math.isclose(expected, actual, abs_tol=1e-4)
    if isinstance(expected, dict) and isinstance(actual, dict):
        return expected.keys() == actual.keys() and all(close(expected[k], actual[k]) for k in expected)
    if isinstance(expected, list) and isinstance(actual, list):
        return len(expected) == len(actual) and all(map(close, expected, actual))
    return type(expected) is type(actual) and expected == actual


@pytest.mark.parametrize("path", sorted(TRANSCRIPTS.glob("*.json")), ids=lambda p: p.stem)
async def test_golden_transcript(new_server, session, path):
    """Each exchange: a frame sent, then the frames received (kind and items) until its streams end."""
    transcript = json.loads(path.read_text())
    async with session.ws_connect(f"http://{new_server.endpoint}/") as ws:
        for exchange in transcript["exchanges"]:
            await ws.send_str(exchange["send"])
            received = []
            while len(received) < len(exchange["receive"]):
                kind, _, payload = (await asyncio.wait_for(ws.receive_str(), 60)).partition(" ")
                received += [[kind, item] for item in json.loads(payload)]
            assert close(exchange["receive"], received), f"{path.name}: {exchange['send'][:80]}"


# ---- the real LMQL 0.7.3 client (opt-in) -------------------------------------------------------


@pytest.mark.timeout(1800)
@pytest.mark.skipif(not os.environ.get("LMQL_073_VENV"), reason="set LMQL_073_VENV to a venv with lmql==0.7.3")
def test_lmql_073_client_gets_the_answers_of_lmql_073s_own_server():
    """benchmarks/lmql_073.py runs LMQL 0.7.3's client against its own server and ours; exit 1 if answers differ."""
    command = [sys.executable, str(REPO / "benchmarks" / "lmql_073.py"), "--quick", "--model", "tiny",
               "--venv", os.environ["LMQL_073_VENV"]]
    out = subprocess.run(command, capture_output=True, text=True, timeout=1700)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "answers equal" in out.stdout and "DIFFER" not in out.stdout
