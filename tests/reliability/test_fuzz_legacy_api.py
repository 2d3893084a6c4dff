"""Property-based fuzzing of the legacy API over real HTTP: 800+ malformed or random requests.

Every answer is ``200`` (accepted) or a 4xx ``text/plain`` text in UTF-8, never a 5xx, whatever
the request holds (lone surrogates and other text UTF-8 cannot encode in any field); every accepted
sample gets exactly one result (its value or an error result), and afterwards a forward
returns exactly the model's own logits.
"""

from __future__ import annotations

import collections
import json

import pytest
import requests
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmql_backends.loader import load_model
from reliability_support import (
    json_leaves, json_values, unencodable_text,
    MODEL, base_url, collect_legacy, legacy_error_text, legacy_forward_logits, new_client_id, start_server,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)

BODY_LIMIT = 16 * 1024
VOCAB = 2048
CONTEXT = 1024
NUM_ACTIONS, NUM_RANDOM, NUM_RAW, NUM_POLLS = 450, 150, 120, 80
FUZZ_SETTINGS = dict(
    deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ACCEPTED_FIELDS = {"forward": "next_token_logits", "tokenize": "input_ids", "detokenize": "text"}

# ---- strategies -------------------------------------------------------------------------------

token_ids = st.integers(0, VOCAB - 1)
odd_ids = st.sampled_from([-1, VOCAB, 2**31, 2**64, -(2**63) - 1, True, 1.0, "1", None])
rows = st.lists(token_ids, min_size=1, max_size=10)
input_ids = st.one_of(
    rows, st.lists(rows, min_size=1, max_size=3), st.just([]), st.just([[]]),
    st.lists(st.lists(token_ids | odd_ids, max_size=5), max_size=3),
    st.integers(CONTEXT - 2, CONTEXT + 40).map(lambda n: [[1] * n]), json_values,
)
mask_values = st.sampled_from([0, 1, 2, True, -1, None])
masks = st.one_of(st.none(), st.lists(st.lists(mask_values, max_size=6), max_size=3), json_values)
FIELDS = {
    "action": st.one_of(
        st.sampled_from(["forward", "tokenize", "detokenize", "Forward", "", "score", "\ud800"]), json_leaves,
    ),
    "input_ids": input_ids,
    "attention_mask": masks,
    "model_identifier": st.one_of(st.sampled_from([MODEL, "gpt2", "", "\udfff"]), unencodable_text, json_leaves),
    "text": st.one_of(st.text(max_size=30), st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3),
                      st.sampled_from(["<BOS>", "<EOS>", ""]), json_values),
    "sample_id": json_values,
    "client_id": st.one_of(json_values.filter(lambda v: isinstance(v, (list, dict, float, bool)) or v is None)),
}


@st.composite
def action_bodies(draw) -> dict:
    """A valid action with 1-3 fuzzed fields (or a dropped one)."""
    action = draw(st.sampled_from(["forward", "tokenize", "detokenize"]))
    body = {"action": action, "sample_id": draw(json_values), "client_id": None}
    body.update({"forward": {"input_ids": [draw(rows)], "attention_mask": None, "model_identifier": MODEL},
                 "tokenize": {"text": draw(st.text(max_size=20))},
                 "detokenize": {"input_ids": draw(rows)}}[action])
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=3, unique=True)):
        if draw(st.booleans()) and name != "client_id":
            body.pop(name, None)
        else:
            body[name] = draw(FIELDS[name])
    return body


random_objects = st.dictionaries(st.sampled_from(sorted(FIELDS)) | st.text(max_size=6), json_values, max_size=7)
raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([
        b"", b"{", b"[]", b"null", b'"x"', b"NaN", b"[" * 100_000, b'{"action": "forward", "sample_id": 1e999999}',
        b'{"action": "tokenize", "sample_id": 1, "client_id": "c", "text": "\xff\xfe"}',
        b'{"action": "tokenize", "sample_id": 1, "client_id": "c", "text": "\\udc80"}',
        b'{"action": "\\ud800", "sample_id": 1}', b'{"action": "forward", "sample_id": "\\udfff"}',
        b'{"action": "forward", "sample_id": 1, "client_id": 1, "input_ids": [[1]], "model_identifier": "\\ud800"}',
        b'{"action": "forward", "sample_id": 1, "input_ids": [[1' + b"0" * 5000 + b"]]}",
    ]),
    st.integers(1, 4096).map(lambda extra: b'{"action": "tokenize", "text": "' + b"a" * (BODY_LIMIT + extra) + b'"}'),
)
routes = st.sampled_from([("POST", "/queue")] * 6 + [("GET", "/queue"), ("PUT", "/queue"), ("POST", "/results/x"),
                                                    ("GET", "/nothing"), ("DELETE", "/results/x")])
wait_values = st.one_of(
    st.sampled_from(["", "x", "-1", "nan", "NaN", "-inf", "0", "0.001", "-0", "1e-9", "0x10", "1,5", "\u0661"]),
    st.text(max_size=6).filter(lambda text: not is_long_wait(text)),
)


def is_long_wait(text: str) -> bool:
    try:
        return float(text) > 0.05
    except ValueError:
        return False


# ---- the server, the ledger of accepted samples and the checks ----------------------------------


@pytest.fixture(scope="module")
def server():
    handle = start_server(legacy=True, max_body_bytes=BODY_LIMIT)
    assert handle.state.loaded.vocab_size == VOCAB and handle.state.loaded.context_length == CONTEXT
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def ledger() -> dict[str, collections.Counter]:
    """client id -> how many times each sample id (as canonical JSON) was accepted."""
    return collections.defaultdict(collections.Counter)


@pytest.fixture(scope="module")
def client_id() -> str:
    return new_client_id("fuzz")


def canonical(value) -> str:
    return json.dumps(value, sort_keys=True)


def post(session, server, data: bytes, method: str = "POST", path: str = "/queue") -> requests.Response:
    return session.request(method, base_url(server) + path, data=data, timeout=60)


def check_answer(response: requests.Response, body, ledger, client_id: str) -> None:
    """200 with the echoed sample_id (recorded in the ledger), or a 4xx text; never a 5xx."""
    assert response.status_code < 500, response.text[:500]
    if response.status_code >= 400:
        legacy_error_text(response)
        return
    assert response.headers["Content-Type"].startswith("application/json")
    sample_id = response.json()["sample_id"]
    assert isinstance(body, dict) and canonical(sample_id) == canonical(body["sample_id"])
    ledger[client_id][canonical(sample_id)] += 1


@settings(max_examples=NUM_ACTIONS, **FUZZ_SETTINGS)
@given(body=action_bodies())
def test_fuzzed_actions_are_accepted_or_4xx(server, session, ledger, client_id, body):
    if body["client_id"] is None:
        body["client_id"] = client_id
    check_answer(post(session, server, json.dumps(body).encode()), body, ledger, client_id)


@settings(max_examples=NUM_RANDOM, **FUZZ_SETTINGS)
@given(body=st.one_of(random_objects, json_values), route=routes)
def test_random_json_on_any_route_is_accepted_or_4xx(server, session, ledger, client_id, body, route):
    if isinstance(body, dict) and is_usable_client_id(body.get("client_id")):
        body["client_id"] = client_id  # an accepted sample's results must be collectable
    check_answer(post(session, server, json.dumps(body).encode(), *route), body, ledger, client_id)


def is_usable_client_id(value) -> bool:
    return isinstance(value, (str, int)) and not isinstance(value, bool)


@settings(max_examples=NUM_RAW, **FUZZ_SETTINGS)
@given(data=raw_bodies)
def test_raw_bytes_are_4xx(server, session, data):
    response = post(session, server, data)
    assert 400 <= response.status_code < 500, response.text[:300]
    legacy_error_text(response)
    if len(data) > BODY_LIMIT:
        assert response.status_code == 413 and "--max-body-bytes" in response.text


@settings(max_examples=NUM_POLLS, **FUZZ_SETTINGS)
@given(wait=wait_values)
def test_results_with_any_wait_value_answer_a_list_or_400(server, session, wait):
    response = session.get(f"{base_url(server)}/results/{new_client_id('poll')}", params={"wait": wait}, timeout=60)
    if response.status_code == 200:
        assert response.json() == []
    else:
        assert response.status_code == 400 and legacy_error_text(response) == "Bad request."


def test_every_accepted_sample_got_exactly_one_result(server, ledger):
    """Runs after the fuzzing: nothing accepted was lost or duplicated."""
    assert ledger, "the fuzzing accepted no sample at all"
    for client_id, expected in ledger.items():
        results = collect_legacy(server, client_id, sum(expected.values()))
        assert collections.Counter(canonical(r["sample_id"]) for r in results) == expected
        for result in results:
            assert len(set(result) & {*ACCEPTED_FIELDS.values(), "error"}) == 1, result


def test_after_the_fuzzing_a_forward_is_exactly_right(server):
    ids = [0, 464, 257, 1110]
    with torch.no_grad():
        expected = load_model(MODEL).model(torch.tensor([ids])).logits[0, -1]
    logits = torch.tensor(legacy_forward_logits(server, ids))
    assert torch.allclose(logits, expected, atol=1e-4)
    engine = server.state.engine
    assert wait_until(lambda: engine.stats().num_running + engine.stats().num_waiting == 0, seconds=10)
