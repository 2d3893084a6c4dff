"""Helpers shared by the reliability tests: servers on loopback, error-format checks, references.

Imported as a plain module (the tests/reliability folder is on sys.path under pytest's default
import mode); it holds functions and hypothesis strategies only, no fixtures.
"""

from __future__ import annotations

import json
import time
import uuid

import requests
import torch
from hypothesis import strategies as st

from lmql_backends.engine import EngineConfig
from lmql_backends.loader import load_model
from lmql_backends.server.app import ServerHandle, serve

MODEL = "builtin:tiny"
HTTP_TIMEOUT = 30
OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}

# any JSON value (for fuzzing both APIs)
#: text UTF-8 cannot encode: a lone surrogate (JSON ``"\ud800"``) among other characters
unencodable_text = st.tuples(
    st.text(max_size=4), st.characters(categories=["Cs"]), st.text(max_size=4)
).map("".join)
json_leaves = (
    st.none() | st.booleans() | st.integers() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12) | unencodable_text
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6) | unencodable_text, inner, max_size=4),
    max_leaves=10,
)


def start_server(*, legacy: bool = False, engine: EngineConfig = EngineConfig(), **kwargs) -> ServerHandle:
    """The embedded model behind one API on a free loopback port."""
    return serve(MODEL, port=0, legacy=legacy, background=True, engine=engine, **kwargs)


def base_url(handle: ServerHandle) -> str:
    return f"http://{handle.endpoint}"


def new_client_id(prefix: str = "rel") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# ---- the error formats of the two APIs --------------------------------------------------------


def openai_error(response: requests.Response) -> dict:
    """The ``error`` object of a new-API error response; fails unless it is exactly that format."""
    assert 400 <= response.status_code < 600, response.status_code
    assert response.headers["Content-Type"].startswith("application/json"), response.headers["Content-Type"]
    error = response.json()["error"]
    assert set(error) == OPENAI_ERROR_KEYS, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str), error
    error["message"].encode("utf-8")  # no lone surrogate: whatever it echoes, any JSON client reads it
    return error


def legacy_error_text(response: requests.Response) -> str:
    """The text of a legacy-API error response; fails unless it is ``text/plain`` with a message."""
    assert 400 <= response.status_code < 600, response.status_code
    assert response.headers["Content-Type"].startswith("text/plain"), response.headers["Content-Type"]
    text = response.content.decode("utf-8")  # strict: whatever it echoes, the text is UTF-8
    assert text.strip(), "an empty error text"
    return text


def sse_payloads(text: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    return [line[len("data:"):].strip() for line in text.split("\n") if line.startswith("data:")]


# ---- a valid request and its independent reference ------------------------------------------


def greedy_reference(loaded, ids: list[int], num_tokens: int) -> list[int]:
    """Greedy continuation of `ids` computed straight from the model (no engine, no cache), loaded
    here: a server's engine process keeps its weights to itself."""
    ids, model = list(ids), load_model(loaded.name).model
    with torch.no_grad():
        for _ in range(num_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(torch.argmax(logits)))
    return ids[-num_tokens:]


def greedy_completion_ids(handle: ServerHandle, ids: list[int], num_tokens: int) -> list[int]:
    """Greedy token ids from the new API (``return_tokens_as_token_ids``)."""
    body = {
        "model": MODEL, "prompt": ids, "max_tokens": num_tokens, "temperature": 0, "logprobs": 0,
        "ignore_eos": True, "return_tokens_as_token_ids": True,
    }
    response = requests.post(base_url(handle) + "/v1/completions", json=body, timeout=HTTP_TIMEOUT)
    assert response.status_code == 200, response.text
    tokens = response.json()["choices"][0]["logprobs"]["tokens"]
    return [int(t.removeprefix("token_id:")) for t in tokens]


def legacy_forward_logits(handle: ServerHandle, ids: list[int]) -> list[float]:
    """One legacy forward of `ids`, collected by long-polling its own client id."""
    client_id = new_client_id("check")
    body = {"action": "forward", "client_id": client_id, "sample_id": 0, "input_ids": [ids],
            "attention_mask": None, "model_identifier": MODEL}
    response = requests.post(base_url(handle) + "/queue", data=json.dumps(body), timeout=HTTP_TIMEOUT)
    assert response.status_code == 200, response.text
    [result] = collect_legacy(handle, client_id, 1)
    return result["next_token_logits"][0]


def collect_legacy(
    handle: ServerHandle, client_id: str, count: int, seconds: float = 60, headers: dict | None = None
) -> list[dict]:
    """Long-poll `client_id` until `count` results arrived; fails after `seconds`."""
    results: list[dict] = []
    deadline = time.monotonic() + seconds
    url = f"{base_url(handle)}/results/{client_id}"
    while len(results) < count and time.monotonic() < deadline:
        response = requests.get(url, params={"wait": 2}, headers=headers, timeout=HTTP_TIMEOUT)
        assert response.status_code == 200, response.text
        results += response.json()
    assert len(results) == count, f"{len(results)} of {count} results arrived for {client_id}"
    return results


def wait_until(condition, seconds: float, interval: float = 0.02) -> bool:
    """Poll `condition` until it is true or `seconds` passed; return its last value."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return bool(condition())
        time.sleep(interval)
    return True
