"""The engine in its own process under both APIs, and its death under a running server (killed,
as by the kernel's OOM killer).

Requests in flight end with a clean error naming the exit code, later ones are refused at once
(never left waiting), and /health turns 503 so that a supervisor restarts the server.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import requests
import torch

from lmql_backends.loader import load_model

from reliability_support import (
    MODEL, base_url, collect_legacy, legacy_forward_logits, new_client_id, openai_error, sse_payloads, start_server,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

PROMPT = [0, 464, 257, 1110]


def kill_engine_process(server) -> None:
    os.kill(server.state.engine._process.pid, signal.SIGKILL)
    assert wait_until(lambda: not server.state.engine.is_alive, 30)


def test_new_server_streams_end_with_an_error_event_and_health_turns_503():
    server = start_server()
    try:
        assert requests.get(base_url(server) + "/health", timeout=30).status_code == 200
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 900, "temperature": 0, "ignore_eos": True, "stream": True}
        response = requests.post(base_url(server) + "/v1/completions", json=body, stream=True, timeout=60)
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith(b"data:"))  # the stream is running
        kill_engine_process(server)
        payloads = sse_payloads("\n".join(line.decode() for line in lines))
        assert payloads[-1] == "[DONE]"
        error = json.loads(payloads[-2])["error"]
        assert error["code"] == "engine_error" and "exited unexpectedly (exit code -9)" in error["message"]
        later = requests.post(base_url(server) + "/v1/completions", json={**body, "stream": False}, timeout=30)
        assert later.status_code == 500 and "restart the server" in openai_error(later)["message"]
        health = requests.get(base_url(server) + "/health", timeout=30)
        assert health.status_code == 503 and health.json()["status"] == "engine stopped"
    finally:
        server.stop()


def test_legacy_server_with_an_engine_process_serves_exact_logits():
    server = start_server(legacy=True, engine_process=True)
    try:
        assert server.state.engine.is_alive and server.state.loaded.model is None
        logits = torch.tensor(legacy_forward_logits(server, PROMPT))
        expected = load_model(MODEL).model(torch.tensor([PROMPT])).logits[0, -1]
        assert torch.allclose(logits, expected, atol=1e-4)
    finally:
        server.stop()


def test_legacy_server_answers_an_error_result_for_each_waiting_sample():
    server = start_server(legacy=True, engine_process=True)
    try:
        client_id = new_client_id("crash")
        body = {"action": "forward", "client_id": client_id, "sample_id": 0, "input_ids": [PROMPT],
                "attention_mask": None, "model_identifier": MODEL}
        kill_engine_process(server)
        response = requests.post(base_url(server) + "/queue", data=json.dumps(body), timeout=30)
        assert response.status_code == 200, response.text
        [result] = collect_legacy(server, client_id, 1)
        assert "exited unexpectedly" in json.dumps(result)
    finally:
        server.stop()


def test_stopping_the_server_ends_its_engine_process():
    server = start_server()
    process = server.state.engine._process
    assert process.poll() is None
    server.stop()
    assert process.poll() == 0
