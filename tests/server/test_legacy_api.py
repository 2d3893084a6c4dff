"""The legacy LMQL 0.0.6.x API over raw HTTP: /queue actions, /results delivery, errors, extensions."""

from __future__ import annotations

import concurrent.futures
import json
import time
import uuid

import pytest
import requests
import torch

from lmql_backends.legacy_json import load_json
from lmql_backends.loader import load_model
from lmql_backends.server.legacy.api import LEGACY, format_floats
from lmql_backends.server.legacy.store import ResultLimits, ResultStore

pytestmark = pytest.mark.timeout(120)

MODEL = "builtin:tiny"
HTTP_TIMEOUT = 30


# ---- helpers ------------------------------------------------------------------------------------


def base_url(server) -> str:
    return f"http://{server.endpoint}"


def new_client_id(prefix: str = "test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def post_queue(server, body) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(base_url(server) + "/queue", data=data, timeout=HTTP_TIMEOUT)


def forward_body(client_id, sample_id, input_ids, attention_mask=None, model=MODEL) -> dict:
    return {
        "action": "forward", "client_id": client_id, "sample_id": sample_id, "input_ids": input_ids,
        "attention_mask": attention_mask, "model_identifier": model,
    }


def get_results(server, client_id, wait: float | None = None) -> requests.Response:
    params = {"wait": wait} if wait is not None else None
    return requests.get(f"{base_url(server)}/results/{client_id}", params=params, timeout=HTTP_TIMEOUT)


def collect(server, client_id, count: int) -> list[dict]:
    """Long-poll until `count` results of `client_id` arrived (fails if they never do)."""
    results = []
    for _ in range(50):
        results += get_results(server, client_id, wait=5).json()
        if len(results) >= count:
            return results
    raise AssertionError(f"only {len(results)} of {count} results arrived")


def accepted(response: requests.Response, sample_id) -> None:
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"sample_id": sample_id}


def rejected(response: requests.Response) -> str:
    assert response.status_code == 400
    assert response.headers["Content-Type"] == "text/plain"
    return response.text


def reference_logits(server, ids: list[int]) -> torch.Tensor:
    """A plain transformers full forward of `ids` on the served model."""
    model = load_model(server.state.loaded.name).model  # the server's engine process keeps its own copy
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -1].float()


def prompt_ids(server, text: str) -> list[int]:
    loaded = server.state.loaded
    return [loaded.bos_token_id, *loaded.tokenizer(text)["input_ids"]]


def assert_close(values, expected: torch.Tensor) -> None:
    got = torch.tensor(values, dtype=torch.float32)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def forward_once(server, ids, attention_mask=None) -> list:
    client_id = new_client_id()
    accepted(post_queue(server, forward_body(client_id, 0, ids, attention_mask)), 0)
    [result] = collect(server, client_id, 1)
    return result["next_token_logits"]


# ---- forward --------------------------------------------------------------------------------------


def test_forward_2d_returns_last_position_logits_of_a_full_forward(legacy_server):
    ids = prompt_ids(legacy_server, "It is a truth universally acknowledged")
    client_id = new_client_id()
    accepted(post_queue(legacy_server, forward_body(client_id, 7, [ids])), 7)
    [result] = collect(legacy_server, client_id, 1)
    assert result["client_id"] == f"127.0.0.1-{client_id}"
    assert result["sample_id"] == 7
    logits = result["next_token_logits"]
    assert len(logits) == 1 and len(logits[0]) == legacy_server.state.loaded.vocab_size
    assert_close(logits[0], reference_logits(legacy_server, ids))


def test_forward_1d_returns_a_flat_vector(legacy_server):
    ids = prompt_ids(legacy_server, "Emma Woodhouse, handsome, clever")
    logits = forward_once(legacy_server, ids)
    assert isinstance(logits[0], float)
    assert_close(logits, reference_logits(legacy_server, ids))


def test_per_token_resends_hit_the_prefix_cache(legacy_server):
    engine = legacy_server.state.engine
    ids = prompt_ids(legacy_server, "Mr. Darcy walked towards the window and said nothing at all")
    forward_once(legacy_server, [ids])
    before = engine.stats().num_cached_prompt_tokens
    for step in range(3):  # the real client re-sends the whole sequence plus one token each step
        ids = ids + [int(torch.tensor(forward_once(legacy_server, [ids])[0]).argmax())]
    grown = engine.stats().num_cached_prompt_tokens - before
    assert grown >= 3 * (len(ids) - 3)
    assert_close(forward_once(legacy_server, [ids])[0], reference_logits(legacy_server, ids))


def test_rows_with_left_and_right_padding_equal_unpadded_forwards(legacy_server):
    a = prompt_ids(legacy_server, "Miss Bennet")
    b = prompt_ids(legacy_server, "Sir Walter Elliot of Kellynch Hall")
    width = max(len(a), len(b)) + 2
    left = [0] * (width - len(a)) + a
    right = b + [0] * (width - len(b))
    mask = [[0] * (width - len(a)) + [1] * len(a), [1] * len(b) + [0] * (width - len(b))]
    logits = forward_once(legacy_server, [left, right], mask)
    assert len(logits) == 2
    assert_close(logits[0], reference_logits(legacy_server, a))
    assert_close(logits[1], reference_logits(legacy_server, b))


def test_several_outstanding_samples_including_the_same_ids_twice(legacy_server):
    client_id = new_client_id()
    prompts = {f"s{i}": prompt_ids(legacy_server, text) for i, text in enumerate(["Anne", "Anne", "Fanny Price"])}
    for sample_id, ids in prompts.items():
        accepted(post_queue(legacy_server, forward_body(client_id, sample_id, [ids])), sample_id)
    results = {r["sample_id"]: r["next_token_logits"][0] for r in collect(legacy_server, client_id, 3)}
    assert sorted(results) == sorted(prompts)
    for sample_id, ids in prompts.items():
        assert_close(results[sample_id], reference_logits(legacy_server, ids))
    assert_close(results["s0"], torch.tensor(results["s1"]))


def test_any_json_sample_id_is_echoed_as_sent(legacy_server):
    client_id = new_client_id()
    sample_id = {"query": [1, "two", None], "n": 2.5}
    accepted(post_queue(legacy_server, forward_body(client_id, sample_id, [[0]])), sample_id)
    assert collect(legacy_server, client_id, 1)[0]["sample_id"] == sample_id


# ---- tokenize / detokenize -------------------------------------------------------------------------


def tokenize_result(server, action: str, **fields) -> dict:
    client_id = new_client_id()
    accepted(post_queue(server, {"action": action, "client_id": client_id, "sample_id": 1, **fields}), 1)
    [result] = collect(server, client_id, 1)
    assert result["client_id"] == f"127.0.0.1-{client_id}" and result["sample_id"] == 1
    return result


def test_tokenize_text_and_the_bos_eos_markers(legacy_server):
    loaded = legacy_server.state.loaded
    text = "She was the youngest of the two daughters"
    assert tokenize_result(legacy_server, "tokenize", text=text)["input_ids"] == loaded.tokenizer(text)["input_ids"]
    assert tokenize_result(legacy_server, "tokenize", text="<BOS>")["input_ids"] == [loaded.bos_token_id]
    assert tokenize_result(legacy_server, "tokenize", text="<EOS>")["input_ids"] == [loaded.eos_token_id]


def test_detokenize_keeps_special_tokens(legacy_server):
    loaded = legacy_server.state.loaded
    ids = [loaded.bos_token_id, *loaded.tokenizer(" a fine morning")["input_ids"], loaded.eos_token_id]
    text = tokenize_result(legacy_server, "detokenize", input_ids=ids)["text"]
    assert text == loaded.tokenizer.decode(ids)
    assert text.startswith("<|endoftext|>") and text.endswith("<|endoftext|>")


# ---- errors ----------------------------------------------------------------------------------------


def test_wrong_model_identifier_names_both_models(legacy_server):
    text = rejected(post_queue(legacy_server, forward_body("c", 1, [[0]], model="gpt2")))
    assert text == "The inference API serves model builtin:tiny not gpt2."


def test_unknown_action(legacy_server):
    assert rejected(post_queue(legacy_server, {"action": "embed", "sample_id": 1, "client_id": "c"})) == (
        "Unknown action: embed"
    )


@pytest.mark.parametrize("body, echoed", [
    ({"action": "\ud800", "sample_id": 1, "client_id": "c"}, "Unknown action: \\ud800"),
    (forward_body("c", 1, [[0]], model="gpt\udfff2"), "not gpt\\udfff2."),
])
def test_errors_that_echo_text_utf8_cannot_encode_are_400_in_utf8(legacy_server, body, echoed):
    """A lone surrogate (JSON "\\ud800") in a field an error echoes is escaped in the text, never a 500."""
    response = post_queue(legacy_server, json.dumps(body))
    assert response.status_code == 400 and response.headers["Content-Type"].startswith("text/plain")
    assert response.content.decode("utf-8").endswith(echoed)


@pytest.mark.parametrize("body", [
    b"{not json",
    b"[1, 2]",
    {"sample_id": 1, "client_id": "c"},
    {"action": "forward", "client_id": "c", "input_ids": [[0]], "model_identifier": MODEL},
    {"action": "forward", "sample_id": 1, "client_id": "c", "model_identifier": MODEL},
    {"action": "forward", "sample_id": 1, "client_id": "c", "input_ids": [[0]]},
    {"action": "forward", "sample_id": 1, "input_ids": [[0]], "model_identifier": MODEL},
    {"action": "forward", "sample_id": 1, "client_id": "c", "input_ids": [["a"]], "model_identifier": MODEL},
    {"action": "forward", "sample_id": 1, "client_id": "c", "input_ids": [[0, 1]], "attention_mask": [[1]],
     "model_identifier": MODEL},
    {"action": "tokenize", "sample_id": 1, "client_id": "c", "text": 5},
    {"action": "detokenize", "sample_id": 1, "client_id": "c", "input_ids": [[1]]},
], ids=["bad-json", "not-object", "no-action", "no-sample-id", "no-input-ids", "no-model", "no-client-id",
        "non-int-ids", "mask-shape", "text-not-string", "nested-detokenize"])
def test_malformed_requests_answer_bad_request_with_a_detail_header(legacy_server, body):
    response = post_queue(legacy_server, body)
    assert rejected(response) == "Bad request."
    assert len(response.headers["X-Error-Detail"]) > 10


def test_invalid_values_are_named_and_the_server_keeps_serving(legacy_server):
    limit = legacy_server.state.loaded.context_length
    vocab = legacy_server.state.loaded.vocab_size
    too_long = rejected(post_queue(legacy_server, forward_body("c", 1, [[0] * (limit + 1)])))
    assert f"{limit + 1} tokens" in too_long and f"context length of {limit}" in too_long
    assert "at least 1 token" in rejected(post_queue(legacy_server, forward_body("c", 1, [[]])))
    assert "at least 1 token" in rejected(post_queue(legacy_server, forward_body("c", 1, [])))
    out_of_vocab = rejected(post_queue(legacy_server, forward_body("c", 1, [[0, vocab]])))
    assert f"token id {vocab}" in out_of_vocab and f"[0, {vocab})" in out_of_vocab
    assert len(forward_once(legacy_server, [[0]])[0]) == vocab


def test_an_oversized_body_is_refused_and_the_server_keeps_serving(legacy_server):
    too_big = b'{"action": "tokenize", "sample_id": 1, "client_id": "c", "text": "' + b"a" * (9 * 2**20) + b'"}'
    assert post_queue(legacy_server, too_big).status_code == 413
    assert len(forward_once(legacy_server, [[0]])[0]) == legacy_server.state.loaded.vocab_size


def test_engine_failure_after_acceptance_is_delivered_as_an_error_result(tiny_model):
    from lmql_backends.server.app import serve

    handle = serve(tiny_model, port=0, legacy=True, background=True)
    try:
        handle.state.engine.stop()
        client_id = new_client_id()
        accepted(post_queue(handle, forward_body(client_id, "doomed", [[0, 1]])), "doomed")
        [result] = collect(handle, client_id, 1)
        assert result == {"client_id": f"127.0.0.1-{client_id}", "sample_id": "doomed",
                          "error": "the engine is shutting down"}
        assert tokenize_result(handle, "tokenize", text="<EOS>")["input_ids"] == [handle.state.loaded.eos_token_id]
    finally:
        handle.stop()


def test_unknown_paths_are_404(legacy_server):
    assert requests.get(base_url(legacy_server) + "/nothing", timeout=HTTP_TIMEOUT).status_code == 404
    assert requests.get(base_url(legacy_server) + "/queue", timeout=HTTP_TIMEOUT).status_code == 404
    assert requests.post(base_url(legacy_server) + "/results/c", timeout=HTTP_TIMEOUT).status_code == 404


# ---- /results delivery -------------------------------------------------------------------------------


def test_results_are_delivered_exactly_once(legacy_server):
    client_id = new_client_id()
    accepted(post_queue(legacy_server, forward_body(client_id, 1, [[0]])), 1)
    assert len(collect(legacy_server, client_id, 1)) == 1
    response = get_results(legacy_server, client_id)
    assert response.status_code == 200 and response.json() == []


def test_results_are_isolated_per_client_id_even_with_colons(legacy_server):
    first, second = "lmql:1:" + uuid.uuid4().hex[:6], "lmql:2:" + uuid.uuid4().hex[:6]
    accepted(post_queue(legacy_server, forward_body(first, "a", [[0]])), "a")
    accepted(post_queue(legacy_server, forward_body(second, "b", [[0, 1]])), "b")
    [result_b] = collect(legacy_server, second, 1)
    [result_a] = collect(legacy_server, first, 1)
    assert (result_a["sample_id"], result_a["client_id"]) == ("a", f"127.0.0.1-{first}")
    assert (result_b["sample_id"], result_b["client_id"]) == ("b", f"127.0.0.1-{second}")


def test_unknown_client_gets_an_empty_list(legacy_server):
    response = get_results(legacy_server, new_client_id("nobody"))
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == []


def wait_for(condition, seconds: float) -> bool:
    """Whether `condition()` holds within `seconds` (checked every few milliseconds)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def is_long_polling(server, client_id: str) -> bool:
    """Whether a GET /results of `client_id` is waiting in the server's result store now."""
    clients = server.app[LEGACY].store.clients.items()
    return any(key.endswith(f"-{client_id}") and entry.num_waiters > 0 for key, entry in list(clients))


def test_long_poll_returns_as_soon_as_a_result_is_ready(legacy_server):
    client_id = new_client_id()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # wait=30, but the HTTP timeout is 10 s: only an early answer passes
        waiting = pool.submit(requests.get, f"{base_url(legacy_server)}/results/{client_id}?wait=30", timeout=10)
        assert wait_for(lambda: is_long_polling(legacy_server, client_id), seconds=10)
        accepted(post_queue(legacy_server, forward_body(client_id, "fast", [[0, 1, 2]])), "fast")
        response = waiting.result()
    assert response.headers["X-Long-Poll"] == "1"
    assert [r["sample_id"] for r in response.json()] == ["fast"]  # the waiting GET got it


def test_long_poll_times_out_with_an_empty_list(legacy_server):
    response = get_results(legacy_server, new_client_id(), wait=0.2)
    assert response.status_code == 200 and response.json() == []
    assert response.headers["X-Long-Poll"] == "1"


def test_bad_wait_value_is_rejected(legacy_server):
    assert rejected(get_results(legacy_server, "c", wait="soon")) == "Bad request."
    assert "wait" in get_results(legacy_server, "c", wait=-1).headers["X-Error-Detail"]


def test_a_queue_answer_is_the_sample_id_alone_and_the_result_goes_to_results(legacy_server):
    """As the original server: a query string on /queue changes nothing, the result is collected once."""
    ids = prompt_ids(legacy_server, "Captain Wentworth")
    client_id = new_client_id()
    response = requests.post(base_url(legacy_server) + "/queue", params={"wait": 10},
                             data=json.dumps(forward_body(client_id, "plain", [ids])), timeout=HTTP_TIMEOUT)
    assert response.status_code == 200 and response.json() == {"sample_id": "plain"}
    assert not [name for name in response.headers if name.lower().startswith("x-")]
    [result] = collect(legacy_server, client_id, 1)
    assert result["sample_id"] == "plain" and result["client_id"] == f"127.0.0.1-{client_id}"
    assert_close(result["next_token_logits"][0], reference_logits(legacy_server, ids))
    assert get_results(legacy_server, client_id, wait=0.3).json() == []  # not delivered twice


# ---- the result store and the float encoding (no server needed) ---------------------------------------


def test_store_drops_results_nobody_collects():
    store = ResultStore(ResultLimits(max_age_seconds=600, max_results_per_client=3))
    for i in range(5):
        store.put("ip-a", f'{{"n": {i}}}'.encode())
    assert store.take_all("ip-a") == [b'{"n": 2}', b'{"n": 3}', b'{"n": 4}']
    store.put("ip-b", b"{}")
    store.sweep(time.monotonic() + 601)
    assert store.take_all("ip-b") == [] and store.clients == {}
    assert store.num_dropped == 3


def test_logits_encoding_round_trips_float32_exactly():
    torch.manual_seed(0)
    values = torch.cat([torch.randn(1000) * 30, torch.tensor([0.0, -0.0, 1e-30, -3.4e38, 1.17549435e-38])])
    decoded = torch.tensor(json.loads(format_floats(values)), dtype=torch.float32)
    assert torch.equal(decoded, values)
    assert json.loads(format_floats(torch.tensor([1.0, float("-inf")]))) == [1.0, float("-inf")]


@pytest.mark.parametrize("body", [
    b'{"sample_id": 1, "input_ids": [[0, 5, 7]], "client_id": "c"}',  # the fast path
    b'{"sample_id": 123456789012345678901234567890, "input_ids": [-9223372036854775809]}',  # beyond 64 bits
    b'[18446744073709551616, 184467440737095516, 1e5, "12345678901234567890"]',  # 20 digits; 18 digits; a string
    b'{"sample_id": NaN, "x": Infinity}', b'["\\ud800"]', b'{"a": 1, "a": 2}',  # what orjson refuses, duplicates
])
def test_bodies_are_read_exactly_as_json_reads_them(body):
    got, expected = load_json(body), json.loads(body)
    assert repr(got) == repr(expected) and type(got) is type(expected)


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b"[1, 2"])
def test_invalid_bodies_fail_as_json_fails(body):
    with pytest.raises(ValueError):
        load_json(body)
