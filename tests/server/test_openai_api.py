"""The new OpenAI-compatible API, driven over real HTTP on loopback.

The official `openai` SDK checks that the wire format is what OpenAI clients expect; raw
aiohttp covers the extensions, every error case and client disconnects.
"""

from __future__ import annotations

import asyncio
import json
import math

import aiohttp
import openai
import pytest

from lmql_backends.client.inprocess import InProcessClient
from lmql_backends.engine import SamplingParams
from lmql_backends.server.openai.text import IncrementalDecoder, StopMatcher

pytestmark = pytest.mark.timeout(120)

MODEL = "builtin:tiny"
PROMPT = "It is a truth universally acknowledged, that a single man"


# ---- helpers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdk(new_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{new_server.endpoint}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def inprocess() -> InProcessClient:
    return InProcessClient(MODEL)


@pytest.fixture(scope="module")
def tokenizer(new_server):
    return new_server.state.loaded.tokenizer


@pytest.fixture
def url(new_server) -> str:
    return f"http://{new_server.endpoint}/v1/completions"


async def post(url: str, body, *, raw: str | bytes | None = None) -> tuple[int, dict]:
    """POST a JSON body (or raw text) and return the status and the decoded JSON answer."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        data = raw if raw is not None else json.dumps(body)
        async with session.post(url, data=data, headers={"Content-Type": "application/json"}) as response:
            return response.status, await response.json(content_type=None)


async def post_stream(url: str, body: dict) -> list[dict]:
    """POST a streaming request; return every SSE payload (the last one is "[DONE]")."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        async with session.post(url, json={**body, "stream": True}) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            text = await response.text()
    frames = [f for f in text.split("\n\n") if f]
    assert all(f.startswith("data: ") for f in frames)
    payloads = [f[len("data: "):] for f in frames]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]] + ["[DONE]"]


def token_ids(logprobs: dict) -> list[int]:
    """The ids of tokens reported as "token_id:N"."""
    assert all(t.startswith("token_id:") for t in logprobs["tokens"])
    return [int(t.split(":")[1]) for t in logprobs["tokens"]]


def greedy(sdk, prompt, max_tokens=24, **kwargs):
    return sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, **kwargs)


# ---- the SDK: the OpenAI wire format ---------------------------------------------------


def test_completion_object_has_the_openai_shape(sdk):
    result = greedy(sdk, PROMPT, max_tokens=10)
    assert result.object == "text_completion" and result.id.startswith("cmpl-")
    assert result.model == MODEL and result.created > 0
    [choice] = result.choices
    assert choice.index == 0 and choice.logprobs is None
    assert choice.finish_reason in ("length", "stop") and choice.text
    assert result.usage.prompt_tokens == len(sdk_tokenize(sdk, PROMPT))
    assert 1 <= result.usage.completion_tokens <= 10
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def sdk_tokenize(sdk, text: str) -> list[int]:
    result = sdk.completions.create(
        model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=0,
        extra_body={"return_tokens_as_token_ids": True},
    )
    return token_ids(result.choices[0].logprobs.model_dump())


def test_string_prompt_is_tokenized_without_special_tokens(sdk, tokenizer):
    assert sdk_tokenize(sdk, PROMPT) == tokenizer.encode(PROMPT, add_special_tokens=False)


def test_streaming_gives_the_same_text_and_a_usage_chunk(sdk):
    expected = greedy(sdk, PROMPT)
    chunks = list(greedy(sdk, PROMPT, stream=True, stream_options={"include_usage": True}))
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in text_chunks) == expected.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == expected.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == expected.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_stream_without_include_usage_has_no_usage_chunk(url):
    payloads = asyncio.run(post_stream(url, {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "temperature": 0}))
    assert all(p["choices"] for p in payloads[:-1])
    assert all("usage" not in p for p in payloads[:-1])


def test_greedy_equals_inprocess_greedy(sdk, inprocess, tokenizer):
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    result = greedy(sdk, ids, max_tokens=20, logprobs=0, extra_body={"return_tokens_as_token_ids": True})
    logprobs = result.choices[0].logprobs
    expected = asyncio.run(inprocess.generate(ids, None, 20, SamplingParams()))
    assert token_ids(logprobs.model_dump()) == [c.token_id for c in expected]
    assert logprobs.token_logprobs == pytest.approx([c.logprob for c in expected], abs=1e-4)
    assert result.choices[0].text == tokenizer.decode([c.token_id for c in expected], skip_special_tokens=True)


def test_logprobs_are_the_top_k_of_the_sampled_distribution(sdk):
    k = 5
    result = greedy(sdk, PROMPT, max_tokens=12, logprobs=k)
    lp = result.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 12
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert k <= len(top) <= k + 1
        assert all(v <= 0 for v in top.values())
        assert top[token] == logprob == max(top.values())  # greedy takes the most likely token
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-6


def test_sampled_token_logprob_is_in_its_top_logprobs(sdk):
    result = sdk.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.3, seed=5, logprobs=20, top_p=0.95,
    )
    lp = result.choices[0].logprobs
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and top[token] == logprob
        assert 1 <= len(top) <= 21  # top_p may leave fewer than 20 tokens
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-6


def test_text_offsets_point_into_the_text(sdk):
    result = greedy(sdk, PROMPT, max_tokens=12, logprobs=0, echo=True)
    choice = result.choices[0]
    offsets = choice.logprobs.text_offset
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert choice.text.startswith(PROMPT)
    assert all(o <= len(choice.text) for o in offsets)
    num_prompt = len(sdk_tokenize(sdk, PROMPT))
    assert offsets[num_prompt] == len(PROMPT)  # the first generated token starts after the echo


def test_echo_scoring_matches_inprocess_score(sdk, inprocess, tokenizer):
    result = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    choice = result.choices[0]
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert result.usage.completion_tokens == 0 and result.usage.prompt_tokens == len(ids)
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = asyncio.run(inprocess.score(ids, 1))
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs[1:])


def test_echo_with_generation_prepends_the_prompt(sdk):
    plain = greedy(sdk, PROMPT, max_tokens=6).choices[0].text
    echoed = greedy(sdk, PROMPT, max_tokens=6, echo=True).choices[0].text
    assert echoed == PROMPT + plain


def test_logit_bias_of_100_forces_a_token(sdk, tokenizer):
    forced = tokenizer.encode(" Emma", add_special_tokens=False)[0]
    result = sdk.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, temperature=1.0, seed=3, logit_bias={str(forced): 100},
    )
    assert result.choices[0].text == tokenizer.decode([forced] * 5)


def test_same_seed_same_text_and_seeds_differ(sdk):
    def sample(seed):
        result = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=seed)
        return result.choices[0].text

    assert sample(42) == sample(42)
    assert len({sample(seed) for seed in range(5)}) > 1


def test_n_choices_use_consecutive_seeds(sdk):
    result = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=100, n=3)
    assert [c.index for c in result.choices] == [0, 1, 2]
    for i, choice in enumerate(result.choices):
        single = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=100 + i)
        assert choice.text == single.choices[0].text


def test_choices_run_concurrently_and_batch(sdk, new_server):
    result = sdk.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=50, temperature=1.0, seed=1, n=4, extra_body={"ignore_eos": True},
    )
    assert [c.finish_reason for c in result.choices] == ["length"] * 4
    assert new_server.state.engine.stats().last_batch_size >= 2  # decoded together, not one after another


def test_several_prompts_give_choices_in_prompt_order(sdk):
    prompts = [PROMPT, "Emma Woodhouse, handsome, clever, and rich"]
    result = greedy(sdk, prompts, max_tokens=6, n=2)
    texts = [c.text for c in result.choices]
    singles = [greedy(sdk, p, max_tokens=6).choices[0].text for p in prompts]
    assert texts == [singles[0], singles[0], singles[1], singles[1]]
    assert [c.index for c in result.choices] == [0, 1, 2, 3]


def test_stop_string_ends_the_text_before_it(sdk):
    full = greedy(sdk, PROMPT, max_tokens=30, extra_body={"ignore_eos": True}).choices[0].text
    stop = full[8:11]
    assert stop.strip(), f"pick a stop string that is not only whitespace: {full!r}"
    result = greedy(sdk, PROMPT, max_tokens=30, stop=[stop, "@@@"], extra_body={"ignore_eos": True})
    assert result.choices[0].text == full[:full.index(stop)]
    assert result.choices[0].finish_reason == "stop"
    streamed = greedy(sdk, PROMPT, max_tokens=30, stop=stop, stream=True, extra_body={"ignore_eos": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == full[:full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


# ---- extensions and /v1/models (raw HTTP) -----------------------------------------------


async def test_allowed_token_ids_restrict_every_token(url, tokenizer):
    allowed = sorted({tokenizer.encode(w, add_special_tokens=False)[0] for w in [" the", " and", " of", ",", " Emma"]})
    body = {
        "model": MODEL, "prompt": PROMPT, "max_tokens": 20, "temperature": 1.0, "seed": 9, "logprobs": len(allowed),
        "allowed_token_ids": allowed, "return_tokens_as_token_ids": True, "ignore_eos": True,
    }
    status, answer = await post(url, body)
    assert status == 200
    logprobs = answer["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == 20 and set(token_ids(logprobs)) <= set(allowed)
    for top in logprobs["top_logprobs"]:
        assert {int(k.split(":")[1]) for k in top} <= set(allowed)
        # the whole allowed set is listed and its probabilities were renormalised
        assert sum(math.exp(v) for v in top.values()) == pytest.approx(1.0, abs=1e-4)


async def test_return_tokens_as_token_ids_names_every_token_by_id(url, tokenizer):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 2,
            "return_tokens_as_token_ids": True, "ignore_eos": True}
    status, answer = await post(url, body)
    choice = answer["choices"][0]
    ids = token_ids(choice["logprobs"])
    assert status == 200 and tokenizer.decode(ids) == choice["text"]
    assert all(key.startswith("token_id:") for top in choice["logprobs"]["top_logprobs"] for key in top)


async def test_eos_stops_generation_unless_ignore_eos(url, new_server):
    eos = new_server.state.loaded.eos_token_id
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 0,
            "logit_bias": {str(eos): 100}, "return_tokens_as_token_ids": True}
    status, answer = await post(url, body)
    choice = answer["choices"][0]
    assert status == 200 and token_ids(choice["logprobs"]) == [eos]
    assert choice["finish_reason"] == "stop" and choice["text"] == ""
    status, answer = await post(url, {**body, "ignore_eos": True})
    assert token_ids(answer["choices"][0]["logprobs"]) == [eos] * 5
    assert answer["choices"][0]["finish_reason"] == "length"


async def test_models_lists_the_served_name_with_its_limits(new_server):
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{new_server.endpoint}/v1/models") as response:
            body = await response.json()
    loaded = new_server.state.loaded
    assert response.status == 200 and body["object"] == "list"
    [model] = body["data"]
    assert model["id"] == MODEL and model["object"] == "model"
    assert model["max_model_len"] == loaded.context_length and model["vocab_size"] == loaded.vocab_size


async def test_completions_alias_without_v1(new_server):
    status, answer = await post(f"http://{new_server.endpoint}/completions",
                                {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "temperature": 0})
    assert status == 200 and answer["object"] == "text_completion"


async def test_multibyte_characters_survive_echo_and_streaming(url, tokenizer):
    text = "café naïve — 日本語 😀"
    ids = tokenizer.encode(text, add_special_tokens=False)
    status, answer = await post(url, {"model": MODEL, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0})
    assert status == 200 and answer["choices"][0]["text"] == text
    offsets = answer["choices"][0]["logprobs"]["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] < len(text)
    payloads = await post_stream(url, {"model": MODEL, "prompt": ids, "max_tokens": 3, "echo": True, "temperature": 0})
    streamed = "".join(p["choices"][0]["text"] for p in payloads[:-1])
    assert streamed.startswith(text) and "\ufffd" not in streamed[:len(text)]


def test_incremental_decoder_never_splits_a_character(tokenizer):
    text = "naïve 日本語 😀😀 end"
    ids = tokenizer.encode(text, add_special_tokens=False)
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(t) for t in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stop_matcher_holds_back_a_possible_stop_start():
    matcher = StopMatcher(("END",))
    assert matcher.add("abc E") == "abc "
    assert matcher.add("N") == ""
    assert matcher.add("X") == "ENX"
    assert matcher.add("yyEN") == "yy"
    assert matcher.add("Dzz") == "" and matcher.is_stopped


# ---- errors ------------------------------------------------------------------------------

OK = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}

BAD_REQUESTS = [
    # (body changes, status, param, words the message must contain)
    ({"model": "gpt-4"}, 404, "model", ["gpt-4", MODEL]),
    ({"model": None}, 400, "model", ["model", MODEL]),
    ({"prompt": None}, 400, "prompt", ["prompt"]),
    ({"prompt": 123}, 400, "prompt", ["prompt", "number"]),
    ({"prompt": []}, 400, "prompt", ["empty array"]),
    ({"prompt": ""}, 400, "prompt", ["empty"]),
    ({"prompt": ["a", 1]}, 400, "prompt", ["item 1", "number 1"]),
    ({"prompt": [5, 6.0]}, 400, "prompt", ["item 1", "6.0"]),
    ({"prompt": [True]}, 400, "prompt", ["item 0", "boolean"]),
    ({"prompt": ["x"] * 300, "n": 2}, 400, "prompt", ["600 choices"]),
    ({"prompt": [[1, 2], [3, "x"]]}, 400, "prompt", ["integers"]),
    ({"prompt": [5, 10**7]}, 400, "prompt", ["10000000", "vocabulary"]),
    ({"prompt": [[5], [-1]]}, 400, "prompt", ["-1", "vocabulary"]),
    ({"max_tokens": -1}, 400, "max_tokens", ["-1"]),
    ({"max_tokens": "5"}, 400, "max_tokens", ["integer", "'5'"]),
    ({"max_tokens": 2.5}, 400, "max_tokens", ["integer", "2.5"]),
    ({"max_tokens": 0}, 400, "max_tokens", ["echo"]),
    ({"max_tokens": 10**6}, 400, "max_tokens", ["1000000", "context length"]),
    ({"temperature": -0.1}, 400, "temperature", ["-0.1"]),
    ({"temperature": 2.5}, 400, "temperature", ["2.5"]),
    ({"temperature": "hot"}, 400, "temperature", ["number", "hot"]),
    ({"top_p": 0}, 400, "top_p", ["top_p", "0"]),
    ({"top_p": 1.5}, 400, "top_p", ["1.5"]),
    ({"n": 0}, 400, "n", ["'n'", "0"]),
    ({"n": 17}, 400, "n", ["17"]),
    ({"n": True}, 400, "n", ["integer", "True"]),
    ({"seed": "x"}, 400, "seed", ["integer", "'x'"]),
    ({"logprobs": 21}, 400, "logprobs", ["21"]),
    ({"logprobs": -1}, 400, "logprobs", ["-1"]),
    ({"logprobs": True}, 400, "logprobs", ["integer"]),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", ["at most 4", "5"]),
    ({"stop": 7}, 400, "stop", ["string"]),
    ({"stop": [""]}, 400, "stop", ["empty"]),
    ({"logit_bias": {"abc": 1}}, 400, "logit_bias", ["'abc'"]),
    ({"logit_bias": {"99999999": 1}}, 400, "logit_bias", ["99999999", "vocabulary"]),
    ({"logit_bias": {"5": 101}}, 400, "logit_bias", ["101"]),
    ({"logit_bias": {"5": "x"}}, 400, "logit_bias", ["'x'"]),
    ({"logit_bias": [1]}, 400, "logit_bias", ["object"]),
    ({"echo": "yes"}, 400, "echo", ["'yes'"]),
    ({"stream": 1}, 400, "stream", ["true or false"]),
    ({"stream_options": "x"}, 400, "stream_options", ["object"]),
    ({"allowed_token_ids": [10**7]}, 400, "allowed_token_ids", ["10000000", "vocabulary"]),
    ({"allowed_token_ids": []}, 400, "allowed_token_ids", ["non-empty"]),
    ({"allowed_token_ids": "1"}, 400, "allowed_token_ids", ["array"]),
    ({"ignore_eos": "no"}, 400, "ignore_eos", ["'no'"]),
    ({"return_tokens_as_token_ids": 0}, 400, "return_tokens_as_token_ids", ["true or false"]),
    ({"presence_penalty": 0.5}, 400, "presence_penalty", ["not supported"]),
    ({"best_of": 3}, 400, "best_of", ["best_of"]),
    ({"suffix": "x"}, 400, "suffix", ["suffix"]),
]


@pytest.mark.parametrize("changes,status,param,words", BAD_REQUESTS, ids=[str(b[0])[:60] for b in BAD_REQUESTS])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_bad_values_are_openai_errors_naming_the_value(url, changes, status, param, words, stream):
    body = {**OK, **({"stream": True} if stream else {}), **changes}
    got_status, answer = await post(url, body)
    assert got_status == status, answer
    error = answer["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert all(w in error["message"] for w in words), error["message"]


async def test_context_length_error_has_its_code(url):
    status, answer = await post(url, {**OK, "max_tokens": 10**6})
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("raw,words", [
    ("{not json", ["not valid JSON"]), ("[1, 2]", ["JSON object", "array"]), ("\"text\"", ["JSON object", "string"]),
    ("", ["not valid JSON"]), (b'{"prompt": "\xff\xfe"}', ["not valid JSON"]), ("[" * 100_000, ["not valid JSON"]),
    ('{"model": "builtin:tiny", "prompt": "a\\ud800"}', ["surrogate"]),
    ('{"model": "builtin:tiny", "prompt": "a", "temperature": NaN}', ["temperature", "nan"]),
], ids=["broken", "array", "string", "empty", "not-utf8", "too-deep", "surrogate", "nan"])
async def test_bodies_that_are_not_json_objects_are_400(url, raw, words):
    status, answer = await post(url, None, raw=raw)
    assert status == 400
    assert all(w in answer["error"]["message"] for w in words)


async def test_server_still_answers_after_errors(url, sdk):
    for changes, *_ in BAD_REQUESTS[:10]:
        await post(url, {**OK, **changes})
    status, answer = await post(url, {**OK, "temperature": 0})
    assert status == 200 and answer["choices"][0]["text"] == greedy(sdk, PROMPT, max_tokens=2).choices[0].text


async def test_engine_failure_mid_stream_is_a_final_error_frame(tiny_model):
    from lmql_backends.server.app import serve

    handle = await asyncio.to_thread(serve, tiny_model, port=0, background=True)
    url = f"http://{handle.endpoint}/v1/completions"
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True, "stream": True}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            async with session.post(url, json=body) as response:
                assert response.status == 200
                await response.content.readline()  # the stream has started
                await asyncio.to_thread(handle.state.engine.stop)
                frames = [f for f in (await response.text()).split("\n\n") if f]
        assert frames[-1] == "data: [DONE]"
        error = json.loads(frames[-2][len("data: "):])["error"]
        assert error["code"] == "request_cancelled" and "stopped" in error["message"]
        status, answer = await post(url, {**OK, "temperature": 0})  # a stopped engine: a JSON error, not a hang
        assert status == 503 and answer["error"]["type"] == "server_error"
    finally:
        await asyncio.to_thread(handle.stop)


@pytest.mark.parametrize("body, param", [
    ({"model": "gpt\ud800", "prompt": "a"}, "model"),
    ({"model": MODEL, "prompt": "a", "logit_bias": {"\udfff": 1}}, "logit_bias"),
])
async def test_errors_that_echo_text_utf8_cannot_encode_are_valid_utf8(url, body, param):
    """A lone surrogate (JSON "\\ud800") in a value an error message echoes is escaped, never a 500."""
    status, answer = await post(url, body)
    message = answer["error"]["message"]
    assert 400 <= status < 500 and answer["error"]["param"] == param
    assert message.encode("utf-8") and "\\u" in message


def test_sdk_raises_not_found_for_a_wrong_model_name(sdk):
    with pytest.raises(openai.NotFoundError) as info:
        sdk.completions.create(model="davinci", prompt="x", max_tokens=1)
    assert "davinci" in str(info.value) and MODEL in str(info.value)


# ---- disconnects -----------------------------------------------------------------------------


async def test_client_disconnect_cancels_the_generation(url, new_server):
    engine = new_server.state.engine
    context = new_server.state.loaded.context_length
    max_tokens = context - 20
    before = engine.stats().num_generated_tokens
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 1.0,
            "seed": 1, "stream": True}
    async with aiohttp.ClientSession() as session:
        response = await session.post(url, json=body)
        frames = 0
        while frames < 3:
            line = await asyncio.wait_for(response.content.readline(), 30)
            frames += line.startswith(b"data: ")
        response.close()  # drop the connection mid-stream
    assert await is_idle_soon(engine)
    assert engine.stats().num_generated_tokens - before < max_tokens


async def test_client_leaving_a_json_request_cancels_it(url, new_server):
    engine = new_server.state.engine
    max_tokens = new_server.state.loaded.context_length - 20
    before = engine.stats().num_generated_tokens
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 1.0}
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(session.post(url, json=body))
        for _ in range(300):  # bounded: until the engine runs it
            if engine.stats().num_running:
                break
            await asyncio.sleep(0.01)
        request.cancel()  # closes the connection before the answer
        with pytest.raises(asyncio.CancelledError):
            await request
    assert await is_idle_soon(engine)
    assert engine.stats().num_generated_tokens - before < max_tokens


async def is_idle_soon(engine) -> bool:
    """Whether the engine (in its process: as its statistics say) runs and queues nothing within ~10 s."""
    for _ in range(100):
        stats = engine.stats()
        if stats.num_running == stats.num_waiting == 0:
            return True
        await asyncio.sleep(0.1)
    return False


def test_the_port_opens_once_the_engine_process_has_tuned_itself(new_server):
    engine = new_server.state.engine
    assert engine.wait_ready(timeout=0) and engine.stats().num_threads >= 1


def test_the_port_opens_once_the_engine_has_tuned_itself(tiny_model):
    from lmql_backends.server.app import serve

    handle = serve(tiny_model, port=0, background=True, engine_process=False)  # to look at its runner
    try:
        engine = handle.state.engine
        assert engine.wait_ready(timeout=0)  # threads and kernels chosen before serving
        assert engine.num_threads is not None
        assert all(linear.kernels for linear in engine.runner.forward.linears)  # matmul "auto" timed them
    finally:
        handle.stop()
