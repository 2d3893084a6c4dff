"""Every protocol of `serve-model --upstream` over a real upstream (our own serve-model, started
here on loopback): LMTP at ``/``, ``/v1/chat/completions`` and the playground's ``POST /v1/queries``.

For each: the front's answers are the upstream's own, streaming works, a client that goes away
cancels the upstream request, an upstream that is down is a 503 naming its address, and an
upstream's refusal (4xx) stays the client's error, never a 500.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest

from lmql_backends.server.app import serve
from lmql_backends.server.playground.queries import RUNNING
from tests.server.test_playground import wait_until

pytestmark = pytest.mark.timeout(300)

MODEL = "builtin:tiny"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello to the world."}]
CHOICE_QUERY = 'argmax "a [X]" where X in ["b", "c"]'
ANSWER_QUERY = ('argmax "Q: What is the capital of France?\\nA: [ANSWER]" '
                'where STOPS_AT(ANSWER, "\\n") and len(TOKENS(ANSWER)) < 12')
LONG_QUERY = 'argmax "Once upon a time[STORY]" where len(TOKENS(STORY)) < 900'


# ---- servers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream():
    """Able to return the full distribution, which the playground reads at each step."""
    handle = serve(MODEL, port=0, background=True, max_logprobs=-1)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def front(upstream):
    handle = serve(MODEL, port=0, background=True, upstream=url_of(upstream))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def chat_upstream(chat_model_dir):
    handle = serve(chat_model_dir, port=0, background=True)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def chat_front(chat_model_dir, chat_upstream):
    handle = serve(chat_model_dir, port=0, background=True, upstream=url_of(chat_upstream))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def orphan():
    """A front whose upstream was stopped after the front started: (the front, the upstream's address)."""
    gone = serve(MODEL, port=0, background=True, max_logprobs=-1)
    handle = serve(MODEL, port=0, background=True, upstream=url_of(gone))
    gone.stop()
    yield handle, url_of(gone)
    handle.stop()


@pytest.fixture
async def session():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


def url_of(handle) -> str:
    return f"http://{handle.endpoint}"


def sdk(handle) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url_of(handle)}/v1", api_key="x", max_retries=0, timeout=60)


def generated(handle) -> int:
    return handle.state.engine.stats().num_generated_tokens


# ---- LMTP ----------------------------------------------------------------------------------


def frame(command: str, **payload) -> str:
    return f"{command} {json.dumps(payload)}"


async def lmtp_items(ws, kind: str = "TOKEN") -> list[dict]:
    text = await asyncio.wait_for(ws.receive_str(), 60)
    command, _, payload = text.partition(" ")
    assert command == kind, text[:300]
    return json.loads(payload)


async def lmtp_streams(session, handle, frames: list[str], stream_ids) -> dict[int, list[dict]]:
    """Send `frames` on one connection; every item of `stream_ids` until each finished or failed."""
    streams = {sid: [] for sid in stream_ids}
    open_ids = set(stream_ids)
    async with session.ws_connect(f"{url_of(handle)}/") as ws:
        for text in frames:
            await ws.send_str(text)
        while open_ids:
            for item in await lmtp_items(ws):
                streams[item["stream_id"]].append(item)
                if item.get("error") is not None or item.get("finish_reason") is not None:
                    open_ids.discard(item["stream_id"])
    return streams


def assert_same_items(ours: list[dict], theirs: list[dict]) -> None:
    assert [i["token"] for i in ours] == [i["token"] for i in theirs]
    assert [i["finish_reason"] for i in ours] == [i["finish_reason"] for i in theirs]
    assert [i["logprob"] for i in ours] == pytest.approx([i["logprob"] for i in theirs], abs=1e-4)
    for a, b in zip(ours, theirs):
        if "top_logprobs" in b:
            assert set(a["top_logprobs"]) == set(b["top_logprobs"])
            assert list(a["top_logprobs"].values()) == pytest.approx(list(b["top_logprobs"].values()), abs=1e-4)


LMTP_FRAMES = {
    "greedy-top5": lambda sid: frame("GENERATE", model=MODEL, prompt=[0, 100, 200], stream_id=sid, max_tokens=8,
                                     temperature=0.0, top_logprobs=5),
    "logit-bias": lambda sid: frame("GENERATE", model=MODEL, prompt=[0, 11], stream_id=sid, max_tokens=6,
                                    temperature=0.0, logit_bias={"5": 100, "6": 100}),
    "eos-stops": lambda sid: frame("GENERATE", model=MODEL, prompt=[0, 12], stream_id=sid, max_tokens=10,
                                   logit_bias={"0": 100}),
    "score": lambda sid: frame("SCORE", model=MODEL, prompt=[0, 100, 200], scored=[7, 8, 9], stream_id=sid),
}


@pytest.mark.parametrize("make_frame", LMTP_FRAMES.values(), ids=LMTP_FRAMES.keys())
async def test_lmtp_through_the_front_answers_as_the_upstream(session, front, upstream, make_frame):
    ours = (await lmtp_streams(session, front, [make_frame(1)], [1]))[1]
    theirs = (await lmtp_streams(session, upstream, [make_frame(1)], [1]))[1]
    assert ours and all(item.get("error") is None for item in ours)
    assert_same_items(ours, theirs)


async def test_lmtp_model_info_through_the_front_is_the_upstreams(session, front, upstream):
    infos = []
    for handle in (front, upstream):
        async with session.ws_connect(f"{url_of(handle)}/") as ws:
            await ws.send_str(frame("MODEL_INFO", stream_id=3, model=MODEL, data={"model": MODEL}))
            [item] = await lmtp_items(ws, "MSG")
            infos.append(item)
    assert infos[0] == infos[1] and infos[0]["model_info"]["vocab_size"] == 2048


async def test_lmtp_streams_of_one_connection_interleave_through_the_front(session, front):
    no_eos = {"0": -100}
    frames = [frame("GENERATE", model=MODEL, prompt=[0, 20 + sid], stream_id=sid, max_tokens=5 + sid,
                    logit_bias=no_eos) for sid in (1, 2)]
    streams = await lmtp_streams(session, front, frames, [1, 2])
    assert [len(streams[1]), len(streams[2])] == [6, 7]


async def test_closing_an_lmtp_connection_cancels_its_upstream_requests(session, front, upstream):
    before = generated(upstream)
    async with session.ws_connect(f"{url_of(front)}/") as ws:
        for sid in range(1, 4):
            await ws.send_str(frame("GENERATE", model=MODEL, prompt=[0, sid], stream_id=sid, max_tokens=1000,
                                    logit_bias={"0": -100}))
        await lmtp_items(ws)  # the streams run
    await wait_until(lambda: front.state.engine.num_pending == 0 and upstream.state.engine.num_pending == 0)
    assert generated(upstream) - before < 3 * 1000 / 2


async def test_lmtp_over_a_down_upstream_is_an_error_item_naming_it(session, orphan):
    handle, address = orphan
    streams = await lmtp_streams(
        session, handle, [frame("GENERATE", model=MODEL, prompt=[0, 1], stream_id=4, max_tokens=2)], [4])
    [item] = streams[4]
    assert item["code"] == "upstream_unavailable" and address in item["error"]


async def test_an_upstream_refusal_over_lmtp_is_the_clients_error_item(session):
    capped = serve(MODEL, port=0, background=True)  # its --max-logprobs is below what the front takes
    strict_front = serve(MODEL, port=0, background=True, upstream=url_of(capped), max_logprobs=-1)
    try:
        streams = await lmtp_streams(session, strict_front, [frame(
            "GENERATE", model=MODEL, prompt=[0, 1], stream_id=5, max_tokens=2, top_logprobs=50)], [5])
    finally:
        strict_front.stop()
        capped.stop()
    [item] = streams[5]
    assert url_of(capped) in item["error"] and "logprobs" in item["error"]
    assert item["code"] != "internal_error"


# ---- chat ----------------------------------------------------------------------------------


CHAT_BODIES = {
    "greedy": dict(max_tokens=8, temperature=0),
    "logprobs": dict(max_tokens=6, temperature=0, logprobs=True, top_logprobs=3),
    "seeded-n2": dict(max_tokens=6, temperature=1.0, seed=5, n=2),
    "stop": dict(max_tokens=20, temperature=0, stop=["o"]),
}


@pytest.mark.parametrize("body", CHAT_BODIES.values(), ids=CHAT_BODIES.keys())
def test_chat_through_the_front_answers_as_the_upstream(chat_front, chat_upstream, chat_model_dir, body):
    ours, theirs = (sdk(h).chat.completions.create(model=chat_model_dir, messages=MESSAGES, **body)
                    for h in (chat_front, chat_upstream))
    assert [c.message.content for c in ours.choices] == [c.message.content for c in theirs.choices]
    assert [c.finish_reason for c in ours.choices] == [c.finish_reason for c in theirs.choices]
    assert ours.usage == theirs.usage
    for a, b in zip(ours.choices, theirs.choices):
        if b.logprobs is None:
            assert a.logprobs is None
            continue
        assert [t.token for t in a.logprobs.content] == [t.token for t in b.logprobs.content]
        assert [t.logprob for t in a.logprobs.content] == pytest.approx([t.logprob for t in b.logprobs.content],
                                                                        abs=1e-4)


def test_streamed_chat_through_the_front_is_the_upstreams_answer(chat_front, chat_upstream, chat_model_dir):
    def streamed(handle) -> tuple[str, int]:
        chunks = list(sdk(handle).chat.completions.create(
            model=chat_model_dir, messages=MESSAGES, max_tokens=12, temperature=0, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, sum(1 for c in chunks if c.choices and c.choices[0].delta.content)

    (text, num_deltas), (expected, _) = streamed(chat_front), streamed(chat_upstream)
    assert text == expected and num_deltas > 1  # several deltas: it streams, not one block at the end


async def test_a_client_leaving_a_chat_stream_cancels_the_upstream_request(session, chat_front, chat_upstream,
                                                                           chat_model_dir):
    before = generated(chat_upstream)
    body = {"model": chat_model_dir, "messages": MESSAGES, "stream": True, "ignore_eos": True, "temperature": 1.0}
    max_tokens = chat_front.state.loaded.context_length - 40  # the rest of the context
    response = await session.post(f"{url_of(chat_front)}/v1/chat/completions", json=body)
    assert response.status == 200, await response.text()
    frames = 0
    while frames < 3:
        line = await asyncio.wait_for(response.content.readline(), 30)
        frames += line.startswith(b"data: ")
    response.close()
    await wait_until(lambda: chat_front.state.engine.num_pending == 0 and chat_upstream.state.engine.num_pending == 0)
    assert generated(chat_upstream) - before < max_tokens // 2


async def test_chat_over_a_down_upstream_is_a_503_naming_it(session, chat_model_dir):
    gone = serve(chat_model_dir, port=0, background=True)
    handle = serve(chat_model_dir, port=0, background=True, upstream=url_of(gone))
    address = url_of(gone)
    gone.stop()
    try:
        for stream in (False, True):
            body = {"model": chat_model_dir, "messages": MESSAGES, "max_tokens": 2, "stream": stream}
            async with session.post(f"{url_of(handle)}/v1/chat/completions", json=body) as response:
                status, answer = response.status, await response.json(content_type=None)
            assert status == 503, answer
            assert answer["error"]["code"] == "upstream_unavailable" and address in answer["error"]["message"]
    finally:
        handle.stop()


async def test_an_upstream_refusal_of_a_chat_is_the_clients_400(session, chat_model_dir):
    capped = serve(chat_model_dir, port=0, background=True, max_logprobs=2)
    strict_front = serve(chat_model_dir, port=0, background=True, upstream=url_of(capped), max_logprobs=-1)
    try:
        body = {"model": chat_model_dir, "messages": MESSAGES, "max_tokens": 2, "logprobs": True, "top_logprobs": 5}
        async with session.post(f"{url_of(strict_front)}/v1/chat/completions", json=body) as response:
            status, answer = response.status, await response.json()
    finally:
        strict_front.stop()
        capped.stop()
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error" and url_of(capped) in answer["error"]["message"]


# ---- the playground ------------------------------------------------------------------------


async def query_events(session, handle, body: dict) -> tuple[int, list[tuple[str, dict]]]:
    """POST /v1/queries: the status and the (type, data) events of its SSE answer."""
    async with session.post(f"{url_of(handle)}/v1/queries", json=body) as response:
        text = await response.text()
        if response.status != 200:
            return response.status, [("answer", json.loads(text))]
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            kind, data = block.split("\n", 1)
            events.append((kind.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return 200, events


def of_kind(events, kind: str) -> list[dict]:
    return [data for k, data in events if k == kind]


@pytest.mark.parametrize("query", [CHOICE_QUERY, ANSWER_QUERY], ids=["choice", "stops-at"])
async def test_a_playground_query_through_the_front_runs_as_on_the_upstream(session, front, upstream, query):
    (status, ours), (_, theirs) = [await query_events(session, h, {"query": query}) for h in (front, upstream)]
    assert status == 200 and [k for k, _ in ours][-2:] == ["result", "done"]
    result, expected = of_kind(ours, "result")[0], of_kind(theirs, "result")[0]
    assert result["variables"] == expected["variables"] and result["prompt"] == expected["prompt"]
    assert result["logprob"] == pytest.approx(expected["logprob"], abs=1e-3)
    tokens, expected_tokens = of_kind(ours, "token"), of_kind(theirs, "token")
    assert [t["text"] for t in tokens] == [t["text"] for t in expected_tokens] and tokens


async def test_leaving_a_playground_query_cancels_its_upstream_requests(session, front, upstream):
    running = front._runner.app[RUNNING]
    before = generated(upstream)
    async with session.post(f"{url_of(front)}/v1/queries", json={"query": LONG_QUERY}) as response:
        assert response.status == 200
        seen = 0
        async for line in response.content:
            seen += line.startswith(b"event: token")
            if seen == 3:
                break
    await wait_until(lambda: not running and front.state.engine.num_pending == 0
                     and upstream.state.engine.num_pending == 0)
    assert generated(upstream) - before < 900


async def test_a_playground_query_over_a_down_upstream_is_an_error_naming_it(session, orphan):
    handle, address = orphan
    status, events = await query_events(session, handle, {"query": CHOICE_QUERY})
    assert status == 200 and [k for k, _ in events][-2:] == ["error", "done"]
    error = of_kind(events, "error")[0]
    assert error["status"] == 503 and address in error["message"]


async def test_a_playground_query_over_an_upstream_without_the_full_distribution_names_the_flag(session):
    capped = serve(MODEL, port=0, background=True)
    capped_front = serve(MODEL, port=0, background=True, upstream=url_of(capped))
    try:
        status, events = await query_events(session, capped_front, {"query": CHOICE_QUERY})
    finally:
        capped_front.stop()
        capped.stop()
    assert status == 200 and [k for k, _ in events][-2:] == ["error", "done"]
    error = of_kind(events, "error")[0]
    assert error["status"] == 400 and "--max-logprobs -1" in error["message"] and url_of(capped) in error["message"]
