"""Property-based fuzzing of the new API over real HTTP: 1,200+ malformed or random requests.

Whatever arrives (lone surrogates and other text UTF-8 cannot encode in any field included),
the server answers 2xx or a 4xx OpenAI error object whose message is valid UTF-8, never a 5xx,
and keeps serving: afterwards a greedy request gives exactly the model's own greedy tokens.
"""

from __future__ import annotations

import json

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reliability_support import (
    json_leaves, json_values, unencodable_text,
    MODEL, base_url, greedy_completion_ids, greedy_reference, openai_error, sse_payloads, start_server,
)

pytestmark = pytest.mark.timeout(300)

BODY_LIMIT = 16 * 1024
VOCAB = 2048  # the embedded model's vocabulary; the test below checks it
CONTEXT = 1024
NUM_STRUCTURED, NUM_RANDOM, NUM_RAW = 700, 300, 200
CHECK_PROMPT = [0, 464, 257, 1110]
FUZZ_SETTINGS = dict(
    deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ---- strategies -------------------------------------------------------------------------------

token_ids = st.integers(0, VOCAB - 1)
odd_ids = st.sampled_from([-1, VOCAB, VOCAB + 1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30])
id_lists = st.lists(token_ids | odd_ids, max_size=12)
too_long_ids = st.integers(CONTEXT - 4, CONTEXT + 200).map(lambda n: [1] * n)
too_long_text = st.integers(CONTEXT + 1, 2 * CONTEXT).map(lambda n: " a" * n)
surrogates = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)
prompts = st.one_of(
    st.text(max_size=40), st.just(""), surrogates, unencodable_text, st.lists(unencodable_text, max_size=3),
    too_long_text, id_lists, too_long_ids,
    st.lists(st.text(max_size=10), max_size=4), st.lists(id_lists, max_size=3), st.lists(json_leaves, max_size=4),
    json_leaves, json_values,
)

PARAMETERS = {
    "max_tokens": st.sampled_from([-1, 0, 1, 2, 3, CONTEXT, CONTEXT + 1, 2**31 + 1, 2**64, 10**30, 1.5, "3", True]),
    "temperature": st.sampled_from([0, 0.0, 0.7, 2, 2.0001, -0.1, 1e308, "1", True, []]),
    "top_p": st.sampled_from([0, 1e-9, 0.5, 1, 1.0001, -1, "0.5"]),
    "n": st.sampled_from([0, 1, 2, 16, 17, -1, 10**6, 2.0, "2"]),
    "seed": st.sampled_from([0, -1, 2**63, 2**64, 2**64 + 1, -(2**63) - 1, 10**40, "1", 1.5]),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3) | unencodable_text, max_size=6), json_values),
    "logprobs": st.sampled_from([0, 1, 5, 20, 21, -1, True, "5", 2**40]),
    "logit_bias": st.one_of(
        st.dictionaries(st.one_of(st.from_regex(r"\A-?\d{1,6}\Z"), st.text(max_size=4), st.just("9" * 5000)),
                        st.one_of(st.floats(-200, 200), json_leaves), max_size=3),
        json_values,
    ),
    "echo": st.one_of(st.booleans(), json_leaves),
    "stream": st.one_of(st.booleans(), st.sampled_from(["true", 1, None])),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans() | json_leaves}), json_values),
    "allowed_token_ids": st.one_of(id_lists, st.just([]), json_values),
    "return_tokens_as_token_ids": st.one_of(st.booleans(), json_leaves),
    "ignore_eos": st.one_of(st.booleans(), json_leaves),
    "presence_penalty": st.sampled_from([0, 0.0, 0.5, "x", None]),
    "frequency_penalty": st.sampled_from([0, 1, None]),
    "best_of": st.sampled_from([None, 1, 2, "x"]),
    "suffix": st.sampled_from([None, "", "x"]),
    "user": json_values,
}
models = st.one_of(st.sampled_from([MODEL] * 8 + ["gpt-3.5-turbo", "", None, 3, ["builtin:tiny"], "\ud800"]),
                   unencodable_text)
VALID = {  # cheap valid values: a fuzzed parameter is then the only thing wrong with a request
    "prompt": st.one_of(st.text(min_size=1, max_size=20), st.lists(token_ids, min_size=1, max_size=8)),
    "max_tokens": st.integers(1, 3),
    "temperature": st.sampled_from([0, 0.8]),
    "seed": st.integers(0, 2**32),
    "n": st.integers(1, 3),
    "logprobs": st.sampled_from([None, 0, 2]),
    "echo": st.booleans(),
    "stream": st.booleans(),
}


@st.composite
def structured_bodies(draw) -> dict:
    """A cheap valid request with 1-3 fuzzed parameters (model and prompt included)."""
    body = {"model": MODEL, **{name: draw(strategy) for name, strategy in VALID.items()}}
    names = st.sampled_from(sorted(PARAMETERS) + ["model", "prompt"])
    fuzzed = draw(st.lists(names, min_size=1, max_size=3, unique=True))
    for name in fuzzed:
        body[name] = draw(models if name == "model" else prompts if name == "prompt" else PARAMETERS[name])
    if body.get("ignore_eos") is True and body["max_tokens"] not in (1, 2, 3):
        body["max_tokens"] = 3  # keep valid requests cheap
    return body


random_objects = st.dictionaries(st.sampled_from(sorted(PARAMETERS) + ["model", "prompt"]) | st.text(max_size=6),
                                 json_values, max_size=8)


def oversized_body(extra: int) -> bytes:
    return b'{"model": "builtin:tiny", "prompt": "' + b"a" * (BODY_LIMIT + extra) + b'"}'


raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([
        b"", b"{", b"[]", b"null", b"1", b'"x"', b"{}", b"NaN", b'{"model": NaN}', b'{"a": 1e999999}',
        b"[" * 100_000, b'{"model": "builtin:tiny", "prompt": "\xff\xfe\x80"}', b'\xef\xbb\xbf{"model": 1}',
        b'{"model": "builtin:tiny", "prompt": "\\ud800"}',
        b'{"model": "builtin:tiny", "prompt": [1], "n": 1' + b"9" * 5000 + b"}",
        b'{"model": "builtin:tiny", "prompt": "a", "temperature": Infinity}',
        b'{"model": "builtin:tiny", "model": "x", "prompt": "a", "max_tokens": 1}',
    ]),
    st.binary(min_size=1, max_size=64).map(lambda b: b'{"model": "builtin:tiny", "prompt": "' + b + b'"}'),
    st.integers(1, 4096).map(oversized_body),
)
routes = st.sampled_from(
    [("POST", "/v1/completions")] * 12 + [("POST", "/completions")] * 3
    + [("GET", "/v1/completions"), ("PUT", "/v1/completions"), ("POST", "/v1/models"), ("GET", "/v1/nothing"),
       ("POST", "/v1/chat/completions"), ("GET", "/v1/models")]
)


# ---- the server and the checks ------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    handle = start_server(max_body_bytes=BODY_LIMIT)
    assert handle.state.loaded.vocab_size == VOCAB and handle.state.loaded.context_length == CONTEXT
    yield handle
    handle.stop()


def send(session: requests.Session, server, data: bytes, method: str = "POST", path: str = "/v1/completions"):
    headers = {"Content-Type": "application/json"}
    return session.request(method, base_url(server) + path, data=data, headers=headers, timeout=60)


def check_answer(response: requests.Response) -> None:
    """2xx with a well-formed answer, or a 4xx OpenAI error object; never a 5xx."""
    assert response.status_code < 500, response.text[:500]
    if response.status_code >= 400:
        openai_error(response)
    elif response.headers["Content-Type"].startswith("text/event-stream"):
        payloads = sse_payloads(response.text)
        assert payloads[-1] == "[DONE]" and not any('"error"' in p for p in payloads[:-1]), payloads[-3:]
    else:
        answer = response.json()
        assert answer["object"] in ("text_completion", "list"), answer


def encode(body) -> bytes:
    return json.dumps(body).encode()


@settings(max_examples=NUM_STRUCTURED, **FUZZ_SETTINGS)
@given(body=structured_bodies())
def test_structured_requests_get_answers_or_4xx(server, session, body):
    check_answer(send(session, server, encode(body)))


@settings(max_examples=NUM_RANDOM, **FUZZ_SETTINGS)
@given(body=st.one_of(random_objects, json_values), route=routes)
def test_random_json_on_any_route_gets_answers_or_4xx(server, session, body, route):
    check_answer(send(session, server, encode(body), *route))


@settings(max_examples=NUM_RAW, **FUZZ_SETTINGS)
@given(data=raw_bodies)
def test_raw_bytes_get_4xx(server, session, data):
    response = send(session, server, data)
    check_answer(response)
    if len(data) > BODY_LIMIT:
        assert response.status_code == 413 and openai_error(response)["code"] == "request_too_large"


def test_oversized_body_is_413_naming_the_limit_and_the_flag(server, session):
    response = send(session, server, b'{"model": "builtin:tiny", "prompt": "' + b"a" * BODY_LIMIT + b'"}')
    error = openai_error(response)
    assert response.status_code == 413 and error["code"] == "request_too_large"
    assert str(BODY_LIMIT) in error["message"] and "--max-body-bytes" in error["message"]


def test_after_the_fuzzing_the_server_still_answers_correctly(server, session):
    """Runs last in this module: nothing is stuck, and a greedy request is exactly right."""
    assert session.get(base_url(server) + "/health", timeout=10).json()["status"] == "ok"
    assert greedy_completion_ids(server, CHECK_PROMPT, 6) == greedy_reference(server.state.loaded, CHECK_PROMPT, 6)
    stats = server.state.engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
