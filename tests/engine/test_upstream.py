"""`serve-model --upstream`: our server as the front of a real upstream (our own serve-model on
the embedded model, started here on loopback), over real HTTP.

The front's answers must be the upstream's answers; its errors the upstream's errors mapped to
ours; a client that goes away must cancel the upstream request.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import hypothesis
import hypothesis.strategies as st
import openai
import pytest
import torch

from lmql_backends import errors, model, run_sync
from lmql_backends.engine import Request, SamplingParams
from lmql_backends.engine.sampling import apply_processors, make_bias_processor
from lmql_backends.sampling import make_mask_processor
from lmql_backends.engine.upstream import (
    UpstreamConfig, UpstreamEngine, sse_events, top_entries, upstream_error, upstream_masks,
)
from lmql_backends.server.app import serve

pytestmark = pytest.mark.timeout(300)

MODEL = "builtin:tiny"
PROMPT = "It is a truth universally acknowledged, that a single man"
VOCAB_SIZE = 2048


# ---- servers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream():
    """Our own server as the upstream, able to return the whole distribution (the legacy API's need)."""
    handle = serve(MODEL, port=0, background=True, max_logprobs=-1)
    yield handle
    handle.stop()


def url_of(handle) -> str:
    return f"http://{handle.endpoint}"


@pytest.fixture(scope="module")
def front(upstream):
    handle = serve(MODEL, port=0, background=True, upstream=url_of(upstream), max_logprobs=-1)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def legacy_front(upstream):
    handle = serve(MODEL, port=0, background=True, legacy=True, upstream=url_of(upstream))
    yield handle
    handle.stop()


def sdk(handle) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url_of(handle)}/v1", api_key="x", max_retries=0, timeout=60)


async def post(handle, body: dict) -> tuple[int, dict, dict]:
    """POST /v1/completions; the status, the JSON answer and the headers."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        async with session.post(f"{url_of(handle)}/v1/completions", json=body) as response:
            return response.status, await response.json(content_type=None), dict(response.headers)


def wait_until(condition, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


EXTENSIONS = ("ignore_eos", "allowed_token_ids", "return_tokens_as_token_ids")


def complete(handle, body: dict):
    """The SDK's completions.create, with vLLM's extensions in its extra_body."""
    extra = {k: v for k, v in body.items() if k in EXTENSIONS}
    standard = {k: v for k, v in body.items() if k not in EXTENSIONS}
    return sdk(handle).completions.create(model=MODEL, extra_body=extra or None, **standard)


def choice_json(answer) -> list[dict]:
    return [c.model_dump() for c in answer.choices]


def assert_same_choices(front_choices: list[dict], upstream_choices: list[dict]) -> None:
    """Same text, tokens and alternatives; logprobs equal up to float rounding (the upstream's
    prefix cache may compute a repeated prompt in another order)."""
    assert [c["text"] for c in front_choices] == [c["text"] for c in upstream_choices]
    for ours, theirs in zip(front_choices, upstream_choices):
        assert ours["finish_reason"] == theirs["finish_reason"]
        if theirs["logprobs"] is None:
            assert ours["logprobs"] is None
            continue
        assert ours["logprobs"]["tokens"] == theirs["logprobs"]["tokens"]
        assert ours["logprobs"]["text_offset"] == theirs["logprobs"]["text_offset"]
        for a, b in zip(ours["logprobs"]["token_logprobs"], theirs["logprobs"]["token_logprobs"]):
            assert (a is None and b is None) or a == pytest.approx(b, abs=1e-4)
        for a, b in zip(ours["logprobs"]["top_logprobs"], theirs["logprobs"]["top_logprobs"]):
            assert (a is None and b is None) or (set(a) == set(b) and list(a.values()) == pytest.approx(list(b.values()), abs=1e-4))


# ---- the new API through the front -----------------------------------------------------------

SAME_ANSWER_BODIES = {
    "greedy-logprobs": dict(prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3),
    "token-ids": dict(prompt=[5, 6, 7, 8], max_tokens=6, temperature=0, logprobs=1),
    "seeded-n2": dict(prompt=PROMPT, max_tokens=10, temperature=1.1, top_p=0.9, seed=7, n=2),
    "echo-scoring": dict(prompt=PROMPT, max_tokens=0, echo=True, logprobs=2),
    "echo-and-generate": dict(prompt=PROMPT, max_tokens=4, echo=True, logprobs=2, temperature=0),
    "stop-string": dict(prompt=PROMPT, max_tokens=30, temperature=0, stop=[","]),
    "ignore-eos": dict(prompt=PROMPT, max_tokens=20, temperature=0, ignore_eos=True),
    "two-prompts": dict(prompt=[PROMPT, "Once upon a time"], max_tokens=5, temperature=0),
}


@pytest.mark.parametrize("body", SAME_ANSWER_BODIES.values(), ids=SAME_ANSWER_BODIES.keys())
def test_a_completion_through_the_front_is_the_upstreams(front, upstream, body):
    ours = complete(front, body)
    theirs = complete(upstream, body)
    assert_same_choices(choice_json(ours), choice_json(theirs))
    assert ours.usage == theirs.usage


def test_a_streamed_completion_through_the_front_is_the_upstreams(front, upstream):
    body = dict(prompt=PROMPT, max_tokens=16, temperature=0, logprobs=2, stream=True,
                stream_options={"include_usage": True})
    ours = list(complete(front, body))
    theirs = list(complete(upstream, body))
    assert "".join(c.choices[0].text for c in ours if c.choices) == "".join(c.choices[0].text for c in theirs if c.choices)
    tokens = [t for c in ours if c.choices for t in c.choices[0].logprobs.tokens]
    assert tokens == [t for c in theirs if c.choices for t in c.choices[0].logprobs.tokens]
    assert len(tokens) == 16
    assert ours[-1].usage == theirs[-1].usage


def test_allowed_token_ids_are_a_hard_mask_on_the_upstream(front, upstream):
    body = dict(prompt=PROMPT, max_tokens=8, temperature=1.0, seed=3, logprobs=2, allowed_token_ids=[11, 12, 13],
                return_tokens_as_token_ids=True)
    ours = complete(front, body)
    theirs = complete(upstream, body)
    assert set(ours.choices[0].logprobs.tokens) <= {"token_id:11", "token_id:12", "token_id:13"}
    assert all(set(top) <= {"token_id:11", "token_id:12", "token_id:13"} for top in ours.choices[0].logprobs.top_logprobs)
    assert_same_choices(choice_json(ours), choice_json(theirs))


def test_logit_bias_reaches_the_upstream(front, upstream):
    body = dict(prompt=PROMPT, max_tokens=3, temperature=0, logit_bias={"42": 100}, logprobs=0,
                return_tokens_as_token_ids=True)
    ours = complete(front, body)
    assert ours.choices[0].logprobs.tokens == ["token_id:42"] * 3


def test_the_front_answers_to_its_model_name_and_reports_the_upstreams_shape(front):
    models = sdk(front).models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["vocab_size"] == VOCAB_SIZE
    assert models[0].model_extra["max_model_len"] == 1024


# ---- the runtime through the front -----------------------------------------------------------

RUNTIME_QUERIES = [
    'argmax "Say:[X]" where STOPS_AT(X, ".") and len(TOKENS(X)) < 8',
    'argmax "Pick:[X]" where X in [" yes", " no", " maybe"]',
    'sample(n=2, seed=5, temperature=1.2) "Hello[X]" where len(TOKENS(X)) < 6',
    'beam(n=2) "Once[X]" where len(TOKENS(X)) < 4',
    'argmax "Rate:[X]" distribution X in [" good", " bad"]',
]


@pytest.mark.parametrize("query", RUNTIME_QUERIES)
def test_the_runtime_gets_the_same_answers_from_the_front_as_from_the_upstream(front, upstream, query):
    def variables(handle):
        results = run_sync(query, model=model(MODEL, endpoint=handle.endpoint))
        return [(r.prompt, r.variables) for r in (results if isinstance(results, list) else [results])]

    ours, theirs = variables(front), variables(upstream)
    assert [prompt for prompt, _ in ours] == [prompt for prompt, _ in theirs]
    for (_, a), (_, b) in zip(ours, theirs):
        assert a.keys() == b.keys()
        for name in a:
            if isinstance(a[name], list):  # a distribution: (option, probability) pairs
                assert [o for o, _ in a[name]] == [o for o, _ in b[name]]
                assert [p for _, p in a[name]] == pytest.approx([p for _, p in b[name]], abs=1e-5)
            else:
                assert a[name] == b[name]


# ---- the legacy API through the front --------------------------------------------------------


def test_every_conformance_query_agrees_in_process_and_through_both_fronts(front, legacy_front, capsys):
    """The built-in table through the new-API front and the legacy front (its full distributions
    come from the upstream's logprobs=vocab_size)."""
    from lmql_backends.conformance import BUILTIN_CASES, ConformanceOptions, run_command

    assert run_command(ConformanceOptions(MODEL, front.endpoint, legacy_front.endpoint, ())) == 0
    assert f"all {len(BUILTIN_CASES)} queries agree on in-process, new, legacy" in capsys.readouterr().out


def test_a_legacy_front_refuses_to_start_over_an_upstream_without_the_full_distribution():
    upstream = serve(MODEL, port=0, background=True)  # logprobs capped at 20 (the default)
    try:
        with pytest.raises(errors.UpstreamError, match=r"full next-token distribution.*--max-logprobs -1"):
            serve(MODEL, port=0, background=True, legacy=True, upstream=url_of(upstream))
    finally:
        upstream.stop()


# ---- cancellation ----------------------------------------------------------------------------


def long_body(handle, stream: bool) -> dict:
    max_tokens = handle.state.loaded.context_length - 20
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 1.0,
            "seed": 1, "stream": stream}


async def test_a_client_leaving_a_stream_cancels_the_upstream_request(front, upstream):
    upstream_engine = upstream.state.engine
    body = long_body(front, stream=True)
    before = upstream_engine.stats().num_generated_tokens
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"{url_of(front)}/v1/completions", json=body)
        frames = 0
        while frames < 3:
            line = await asyncio.wait_for(response.content.readline(), 30)
            frames += line.startswith(b"data: ")
        response.close()  # drop the connection mid-stream
    assert await asyncio.to_thread(wait_until, lambda: front.state.engine.num_pending == 0)
    assert await asyncio.to_thread(wait_until, lambda: upstream_engine.num_pending == 0)
    assert upstream_engine.stats().num_generated_tokens - before < body["max_tokens"]


async def test_a_client_leaving_a_json_request_cancels_the_upstream_request(front, upstream):
    upstream_engine = upstream.state.engine
    body = long_body(front, stream=False)
    before = upstream_engine.stats().num_generated_tokens
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(session.post(f"{url_of(front)}/v1/completions", json=body))
        assert await asyncio.to_thread(wait_until, lambda: upstream_engine.stats().num_running > 0)
        request.cancel()  # closes the connection before the answer
        with pytest.raises(asyncio.CancelledError):
            await request
    assert await asyncio.to_thread(wait_until, lambda: upstream_engine.num_pending == 0)
    assert upstream_engine.stats().num_generated_tokens - before < body["max_tokens"]


def test_an_aborted_engine_request_sends_nothing_more(front, upstream):
    engine = front.state.engine
    request = Request(list(range(1, 20)), max_tokens=500, sampling=SamplingParams(1.0, seed=1),
                      stop_token_ids=frozenset())
    outputs = []
    engine.submit(request, outputs.append)
    assert wait_until(lambda: len(outputs) >= 3)
    engine.abort(request.request_id)
    num_seen = len(outputs)
    assert engine.num_pending == 0
    assert wait_until(lambda: upstream.state.engine.num_pending == 0)
    assert len(outputs) <= num_seen + 1  # at most one was already on its way
    assert all(out.finish_reason is None for out in outputs)


# ---- the upstream's errors -------------------------------------------------------------------


async def test_an_upstream_refusal_is_the_clients_400_with_its_message(front):
    # the front takes logprobs up to the vocabulary size; the upstream caps it at its --max-logprobs
    capped = serve(MODEL, port=0, background=True)
    strict_front = serve(MODEL, port=0, background=True, upstream=url_of(capped), max_logprobs=-1)
    try:
        status, body, _ = await post(strict_front, {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "logprobs": 50})
    finally:
        strict_front.stop()
        capped.stop()
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert url_of(capped) in body["error"]["message"]
    assert "logprobs" in body["error"]["message"]


async def test_the_front_checks_requests_itself_before_the_upstream_sees_them(front, upstream):
    before = upstream.state.engine.stats().num_prompt_tokens
    status, body, _ = await post(front, {"model": MODEL, "prompt": [VOCAB_SIZE + 5], "max_tokens": 2})
    assert status == 400 and "outside the vocabulary" in body["error"]["message"]
    status, body, _ = await post(front, {"model": MODEL, "prompt": PROMPT, "max_tokens": 5000})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert upstream.state.engine.stats().num_prompt_tokens == before


async def test_an_overloaded_upstream_is_a_429_with_retry_after():
    from lmql_backends.engine import EngineConfig

    small = serve(MODEL, port=0, background=True, engine=EngineConfig(max_num_seqs=1, max_queue=0))
    roomy_front = serve(MODEL, port=0, background=True, upstream=url_of(small))
    try:
        async with aiohttp.ClientSession() as session:
            busy = await session.post(f"{url_of(roomy_front)}/v1/completions", json=long_body(small, stream=True))
            assert busy.status == 200
            status, body, headers = await post(roomy_front, {"model": MODEL, "prompt": PROMPT, "max_tokens": 2})
            busy.close()
    finally:
        roomy_front.stop()
        small.stop()
    assert status == 429
    assert body["error"]["type"] == "rate_limit_error"
    assert url_of(small) in body["error"]["message"]
    assert int(headers["Retry-After"]) >= 1


async def test_an_upstream_that_went_down_is_a_503_naming_its_address():
    gone = serve(MODEL, port=0, background=True)
    orphan = serve(MODEL, port=0, background=True, upstream=url_of(gone))
    try:
        address = url_of(gone)
        gone.stop()
        status, body, _ = await post(orphan, {"model": MODEL, "prompt": PROMPT, "max_tokens": 2})
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url_of(orphan)}/v1/completions",
                                    json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "stream": True}) as response:
                stream_status = response.status
        assert orphan.state.engine.num_pending == 0
    finally:
        orphan.stop()
    assert status == stream_status == 503
    assert body["error"]["code"] == "upstream_unavailable"
    assert address in body["error"]["message"] and "start it" in body["error"]["message"]


def test_a_front_cannot_start_without_its_upstream(unused_port):
    with pytest.raises(errors.UpstreamUnavailableError, match=f"127.0.0.1:{unused_port}"):
        UpstreamEngine(MODEL, UpstreamConfig(f"127.0.0.1:{unused_port}"))


def test_a_front_without_the_upstreams_key_says_how_to_give_it():
    keyed = serve(MODEL, port=0, background=True, api_key="secret")
    try:
        with pytest.raises(errors.UpstreamError, match="--upstream-api-key"):
            UpstreamEngine(MODEL, UpstreamConfig(url_of(keyed)))
        engine = UpstreamEngine(MODEL, UpstreamConfig(url_of(keyed), api_key="secret"))
        outputs = list(engine.stream_sync(Request([1, 2, 3], max_tokens=2), timeout=60))
        engine.stop()
    finally:
        keyed.stop()
    assert len(outputs) == 3 and outputs[-1].finish_reason == "length"


def test_a_front_names_the_upstreams_models_when_it_does_not_serve_ours(upstream):
    with pytest.raises(errors.UpstreamError, match=r"serves 'builtin:tiny'.*--upstream-model"):
        UpstreamEngine(MODEL, UpstreamConfig(url_of(upstream), model="other-model"))


@pytest.fixture
def unused_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("status, body, error, http_status", [
    (400, {"error": {"message": "bad", "type": "invalid_request_error", "param": "x"}}, errors.InvalidRequestError, 400),
    (422, {"object": "error", "message": "bad", "type": "BadRequestError"}, errors.InvalidRequestError, 400),
    (400, {"error": {"message": "long", "code": "context_length_exceeded"}}, errors.ContextLengthError, 400),
    (401, {"error": {"message": "no key"}}, errors.UpstreamError, 502),
    (404, {"detail": "Not Found"}, errors.UpstreamError, 502),
    (413, {"message": "too big"}, errors.RequestTooLargeError, 413),
    (429, {"error": {"message": "full"}}, errors.OverloadedError, 429),
    (500, {"error": {"message": "boom"}}, errors.UpstreamError, 502),
    (503, {"error": {"message": "stopping"}}, errors.UpstreamUnavailableError, 503),
])
def test_every_upstream_status_maps_to_ours_and_names_the_upstream(status, body, error, http_status):
    from lmql_backends.server.errors import classify

    mapped = upstream_error(status, body, {"Retry-After": "3"}, "http://up:9")
    assert type(mapped) is error
    assert classify(mapped)[0] == http_status
    assert "http://up:9" in str(mapped)


# ---- the engine's pieces ---------------------------------------------------------------------


@hypothesis.given(
    masks=st.lists(st.lists(st.booleans(), min_size=8, max_size=8), max_size=3),
    bias=st.dictionaries(st.integers(0, 7), st.floats(-100, 100), max_size=4),
    logits=st.lists(st.floats(-20, 20), min_size=8, max_size=8),
)
def test_the_upstream_fields_do_what_the_processors_do(masks, bias, logits):
    processors = [make_bias_processor(bias)] if bias else []
    processors += [make_mask_processor(torch.tensor(mask)) for mask in masks]
    expected = apply_processors(processors, [], torch.tensor(logits))
    if torch.isneginf(expected).all():
        with pytest.raises(errors.ConstraintError):
            upstream_masks(processors, 8)
        return
    fields = upstream_masks(processors, 8)
    actual = torch.tensor(logits)
    for token_id, value in fields.get("logit_bias", {}).items():
        actual[int(token_id)] += value
    if "allowed_token_ids" in fields:
        allowed = torch.zeros(8, dtype=torch.bool)
        allowed[fields["allowed_token_ids"]] = True
        actual = actual.masked_fill(~allowed, float("-inf"))
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected))
    finite = ~torch.isneginf(expected)
    assert torch.allclose(actual[finite], expected[finite])


def test_a_processor_the_upstream_cannot_run_is_refused_by_name(front):
    request = Request([1, 2, 3], max_tokens=2, processors=(lambda ids, logits: logits,))
    with pytest.raises(errors.InvalidRequestError, match="cannot run there"):
        front.state.engine.check_upstream_can_run(request)


def test_raw_logits_over_an_upstream_are_refused_with_generation_or_a_mask(front):
    mask = make_mask_processor(torch.ones(VOCAB_SIZE, dtype=torch.bool))
    for request in (Request([1, 2], max_tokens=1, return_logits=True), Request([1, 2], return_logits=True, processors=(mask,))):
        with pytest.raises(errors.InvalidRequestError, match="max_tokens=0 and no processors"):
            front.state.engine.check_upstream_can_run(request)
    outputs = list(front.state.engine.stream_sync(Request([1, 2], return_logits=True), timeout=60))
    assert len(outputs) == 1 and outputs[0].logits.shape == (VOCAB_SIZE,)
    assert float(torch.logsumexp(outputs[0].logits, 0)) == pytest.approx(0.0, abs=1e-4)  # log-probabilities


def test_alternatives_come_most_likely_first_in_the_upstreams_order_of_ties():
    assert top_entries({"token_id:3": -2.0, "token_id:1": -0.5, "token_id:2": -2.0}) == ((1, -0.5), (3, -2.0), (2, -2.0))
    with pytest.raises(errors.UpstreamError, match="return_tokens_as_token_ids"):
        top_entries({" the": -1.0})


async def test_server_sent_events_of_any_size_and_split_anywhere():
    events = [{"n": i, "pad": "x" * (i * 7000)} for i in range(3)]
    raw = b"".join(b"data: " + json.dumps(e).encode() + b"\r\n\r\n" for e in events) + b"data: [DONE]\n\n"

    async def chunks(size: int):
        for start in range(0, len(raw), size):
            yield raw[start:start + size]

    for size in (1, 7, 9999, len(raw)):
        assert [e async for e in sse_events(chunks(size))] == events


# ---- configuration ---------------------------------------------------------------------------


def test_serve_model_names_an_unreachable_upstream_and_exits_2(unused_port):
    import subprocess
    import sys

    command = [sys.executable, "-m", "lmql_backends.cli", "serve-model", MODEL, "--port", "0",
               "--upstream", f"127.0.0.1:{unused_port}/v1"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert f"error: cannot reach the upstream at http://127.0.0.1:{unused_port} " in out.stderr


@pytest.mark.parametrize("value", [-2, 1.5, True, "20"])
def test_max_logprobs_is_an_integer_or_minus_one(value):
    from lmql_backends.server.state import ServerConfig

    with pytest.raises(errors.InvalidRequestError, match="max_logprobs"):
        ServerConfig(max_logprobs=value)


def test_an_upstream_url_is_normalised_and_must_be_given():
    assert UpstreamConfig("host:8000/v1/").base_url == "http://host:8000"
    assert UpstreamConfig("https://h.example/v1").base_url == "https://h.example"
    with pytest.raises(errors.InvalidRequestError, match="http://host:8000"):
        UpstreamConfig(" ")
