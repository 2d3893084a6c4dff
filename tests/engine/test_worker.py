"""The engine process's side of the wire (engine/worker.py), run in a thread over a real socket pair."""

from __future__ import annotations

import socket
import threading
from multiprocessing.connection import Connection

import pytest

from lmql_backends.engine import EngineConfig, ErrorOutput, PromptOutput, Request, TokenOutput
from lmql_backends.engine.wire import Channel
from lmql_backends.engine.worker import serve_requests, start_engine
from lmql_backends.errors import ModelLoadError
from lmql_backends.loader import LoadOptions

pytestmark = pytest.mark.timeout(120)

CONFIG = EngineConfig(num_threads=1, matmul="blas")

@pytest.fixture
def channels():
    """(the server's end, the worker's end) of one socket pair."""
    ours, theirs = socket.socketpair()
    server, worker = Channel(Connection(ours.detach())), Channel(Connection(theirs.detach()))
    yield server, worker
    server.close()
    worker.close()

def outputs_until_finished(server: Channel, request_id: str) -> list:
    """Every output of `request_id` the worker sends, up to the one with a finish_reason."""
    outputs = []
    while not outputs or outputs[-1].finish_reason is None:
        kind, items, _ = server.receive()
        assert kind == "outputs"
        outputs += [output for rid, output in items if rid == request_id]
    return outputs

def test_the_worker_says_loaded_then_ready_and_runs_what_it_is_sent(channels, tiny_model):
    server, worker = channels
    outbox = start_engine(worker, tiny_model, LoadOptions(), CONFIG)
    assert server.receive()[0] == "loaded" and server.receive()[0] == "ready"
    serving = threading.Thread(target=serve_requests, args=(worker, outbox))
    serving.start()
    request = Request([0, 464, 257], max_tokens=3)
    server.send("add", [request])
    outputs = outputs_until_finished(server, request.request_id)
    assert isinstance(outputs[0], PromptOutput) and outputs[0].num_prompt_tokens == 3
    assert [type(out) for out in outputs[1:]] == [TokenOutput] * 3 and outputs[-1].finish_reason == "length"
    server.send("stop")
    serving.join(timeout=60)
    assert not serving.is_alive() and not outbox.engine.is_alive

def test_an_abort_ends_a_request_and_the_worker_stops_when_the_server_is_gone(channels, tiny_model):
    server, worker = channels
    outbox = start_engine(worker, tiny_model, LoadOptions(), CONFIG)
    server.receive(), server.receive()
    serving = threading.Thread(target=serve_requests, args=(worker, outbox))
    serving.start()
    long = Request([0, 1], max_tokens=900)
    server.send("add", [long])
    assert server.receive()[0] == "outputs"  # it runs
    server.send("abort", long.request_id)
    while outbox.engine.scheduler.running or outbox.engine.scheduler.waiting:
        server.receive()  # the worker says when sequences came or went
    server.close()  # no "stop": the worker sees the closed socket and stops all the same
    serving.join(timeout=60)
    assert not serving.is_alive() and not outbox.engine.is_alive

def test_outputs_for_a_server_that_is_gone_are_dropped_without_killing_the_engine_thread(channels, tiny_model):
    server, worker = channels
    outbox = start_engine(worker, tiny_model, LoadOptions(), CONFIG)
    try:
        server.close()
        outbox.put("gone", ErrorOutput(RuntimeError("nobody reads this")))
        outbox.flush()  # the engine thread calls this after every step: a closed socket must not raise
    finally:
        outbox.engine.stop()

def test_a_model_that_does_not_load_is_reported_to_the_server(channels, tmp_path):
    server, worker = channels
    assert start_engine(worker, str(tmp_path / "no-such-model"), LoadOptions(), CONFIG) is None
    kind, error = server.receive()
    assert kind == "failed" and isinstance(error, ModelLoadError)
