"""Faults inside the server: a forward step or the tokenizer raises once.

Only the requests of that step fail, each with a clean error in its API's format (a 500
OpenAI error, a final SSE error event, or a legacy error result); the server keeps serving.
The model's own methods are wrapped, not replaced: every call but the failing one runs the
real model (or tokenizer).
"""

from __future__ import annotations

import asyncio
import functools
import json

import aiohttp
import pytest
import requests

from lmql_backends.engine import EngineConfig
from lmql_backends.server.openai import text as text_module
from reliability_support import (
    MODEL, base_url, collect_legacy, greedy_completion_ids, greedy_reference, legacy_error_text, legacy_forward_logits,
    new_client_id, openai_error, sse_payloads, start_server, wait_until,
)

pytestmark = pytest.mark.timeout(120)

PROMPT = [0, 464, 257, 1110]
FAULT = "injected fault"


class FailOnce:
    """Wraps a callable; the first call for which `applies(*args)` is true raises RuntimeError."""

    def __init__(self, function, applies=lambda *args, **kwargs: True):
        self.function = function
        self.applies = applies
        self.num_failures = 0

    def __call__(self, *args, **kwargs):
        if self.num_failures == 0 and self.applies(*args, **kwargs):
            self.num_failures += 1
            raise RuntimeError(FAULT)
        return self.function(*args, **kwargs)

    def __get__(self, instance, owner=None):
        """Set on a class (for ``__call__``), it binds like the method it wraps."""
        return self if instance is None else functools.partial(self, instance)


@pytest.fixture(scope="module")
def new_server():
    # faults are injected into the engine's runner, so the engine runs in a thread of this process
    handle = start_server(engine=EngineConfig(max_num_seqs=2), engine_process=False)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def legacy_server():
    handle = start_server(legacy=True, engine_process=False)
    yield handle
    handle.stop()


def completion(server, prompt, max_tokens: int = 4, **extra) -> requests.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return requests.post(base_url(server) + "/v1/completions", json=body, timeout=60)


def assert_serves_correctly(server) -> None:
    assert greedy_completion_ids(server, PROMPT, 4) == greedy_reference(server.state.loaded, PROMPT, 4)


def starts_with(marker: list[int]):
    """Applies to a prefill whose new ids start with `marker`."""
    return lambda ids, *args, **kwargs: list(ids[:len(marker)]) == marker


# ---- new API: forward faults ------------------------------------------------------------------


def test_a_failing_prefill_fails_only_its_request_with_a_500(new_server, monkeypatch):
    runner = new_server.state.engine.runner
    marker = [0, 1999, 1998]
    monkeypatch.setattr(runner, "prefill", FailOnce(runner.prefill, starts_with(marker)))
    with requests.Session() as session:
        doomed = session.post(base_url(new_server) + "/v1/completions", timeout=60,
                              json={"model": MODEL, "prompt": marker, "max_tokens": 2})
    error = openai_error(doomed)
    assert doomed.status_code == 500 and error["code"] == "engine_error" and FAULT in error["message"]
    assert runner.prefill.num_failures == 1
    assert_serves_correctly(new_server)


async def read_stream(session, url: str, body: dict, first_chunk: asyncio.Event | None = None) -> list[str]:
    async with session.post(url, json=body) as response:
        assert response.status == 200, await response.text()
        text = b""
        async for chunk in response.content.iter_any():
            text += chunk
            if first_chunk is not None and b"text_completion" in text:
                first_chunk.set()
        return sse_payloads(text.decode())


async def decode_fault_scenario(server, monkeypatch) -> tuple[list[list[str]], list[str]]:
    """Two streams decoding (max_num_seqs=2) and a third waiting; one decode step then fails."""
    engine, url = server.state.engine, base_url(server) + "/v1/completions"
    body = {"model": MODEL, "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        started = [asyncio.Event(), asyncio.Event()]
        running = [asyncio.create_task(read_stream(session, url, {**body, "prompt": [0, 7 + i]}, started[i]))
                   for i in range(2)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
        waiting = asyncio.create_task(read_stream(session, url, {**body, "prompt": [0, 9], "max_tokens": 3}))
        assert await asyncio.to_thread(wait_until, lambda: engine.stats().num_waiting == 1, 10)
        monkeypatch.setattr(engine.runner, "decode", FailOnce(engine.runner.decode))
        return await asyncio.gather(*running), await waiting


def test_a_failing_decode_step_fails_its_batch_only_with_sse_error_events(new_server, monkeypatch):
    failed_streams, waiting_stream = asyncio.run(decode_fault_scenario(new_server, monkeypatch))
    for payloads in failed_streams:
        assert payloads[-1] == "[DONE]"
        error = json.loads(payloads[-2])["error"]
        assert error["code"] == "engine_error" and FAULT in error["message"]
    assert waiting_stream[-1] == "[DONE]" and not any('"error"' in p for p in waiting_stream)
    finishes = [c["finish_reason"] for p in waiting_stream[:-1] for c in json.loads(p)["choices"]]
    assert finishes[-1] == "length"
    assert_serves_correctly(new_server)


# ---- new API: tokenizer faults ----------------------------------------------------------------


def test_a_failing_prompt_encode_is_a_clean_500(new_server, monkeypatch):
    tokenizer = new_server.state.loaded.tokenizer
    monkeypatch.setattr(tokenizer, "encode", FailOnce(tokenizer.encode))
    error = openai_error(response := completion(new_server, "Hello there"))
    assert response.status_code == 500 and error["type"] == "server_error" and FAULT in error["message"]
    monkeypatch.undo()
    assert completion(new_server, "Hello there").status_code == 200
    assert_serves_correctly(new_server)


def test_a_failing_detokenization_is_a_clean_500_or_final_error_event(new_server, monkeypatch):
    decode_ids = text_module.decode_ids  # every detokenization of the new API goes through it
    monkeypatch.setattr(text_module, "decode_ids", FailOnce(decode_ids))
    error = openai_error(response := completion(new_server, PROMPT))
    assert response.status_code == 500 and FAULT in error["message"]
    monkeypatch.setattr(text_module, "decode_ids", FailOnce(decode_ids))
    payloads = sse_payloads(completion(new_server, PROMPT, stream=True).text)
    assert payloads[-1] == "[DONE]" and FAULT in json.loads(payloads[-2])["error"]["message"]
    monkeypatch.undo()
    assert_serves_correctly(new_server)


# ---- legacy API -------------------------------------------------------------------------------


def post_queue(server, body: dict) -> requests.Response:
    return requests.post(base_url(server) + "/queue", data=json.dumps(body), timeout=60)


def test_a_failing_legacy_forward_is_an_error_result_for_that_sample_only(legacy_server, monkeypatch):
    runner = legacy_server.state.engine.runner
    marker = [0, 1997, 1996]
    monkeypatch.setattr(runner, "prefill", FailOnce(runner.prefill, starts_with(marker)))
    client_id = new_client_id("fault")
    for sample_id, ids in (("doomed", marker), ("fine", [0, 1995, 1994])):
        body = {"action": "forward", "client_id": client_id, "sample_id": sample_id, "input_ids": [ids],
                "attention_mask": None, "model_identifier": MODEL}
        assert post_queue(legacy_server, body).json() == {"sample_id": sample_id}
    results = {r["sample_id"]: r for r in collect_legacy(legacy_server, client_id, 2)}
    assert FAULT in results["doomed"]["error"] and "next_token_logits" not in results["doomed"]
    assert len(results["fine"]["next_token_logits"][0]) == legacy_server.state.loaded.vocab_size
    assert len(legacy_forward_logits(legacy_server, PROMPT)) == legacy_server.state.loaded.vocab_size


@pytest.mark.parametrize("action, method, field", [
    ("tokenize", "__call__", "input_ids"), ("detokenize", "decode", "text"),
])
def test_a_failing_legacy_tokenizer_call_is_an_error_result(legacy_server, monkeypatch, action, method, field):
    tokenizer = legacy_server.state.loaded.tokenizer
    owner = type(tokenizer) if method == "__call__" else tokenizer  # __call__ is looked up on the class
    monkeypatch.setattr(owner, method, FailOnce(getattr(owner, method)))
    client_id = new_client_id("tok")
    body = {"action": action, "client_id": client_id, "text": "Hello", "input_ids": [464, 257]}
    for sample_id in (1, 2):
        assert post_queue(legacy_server, {**body, "sample_id": sample_id}).json() == {"sample_id": sample_id}
    results = {r["sample_id"]: r for r in collect_legacy(legacy_server, client_id, 2)}
    assert FAULT in results[1]["error"] and field in results[2]


def test_the_legacy_server_still_answers_errors_as_text(legacy_server):
    response = post_queue(legacy_server, {"action": "forward", "client_id": "c", "sample_id": 1, "input_ids": [[]],
                                          "model_identifier": MODEL})
    assert response.status_code == 400 and "at least 1 token" in legacy_error_text(response)
