"""The engine in a process of its own: same outputs as the engine thread, aborts, statistics,
load errors, shutdown, and a crash of the engine process (nothing waits forever)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import torch

from lmql_backends.engine import Engine, EngineConfig, PromptOutput, Request, SamplingParams, TokenOutput
from lmql_backends.engine.process import EngineProcess
from lmql_backends.engine.sampling import make_bias_processor
from lmql_backends.sampling import make_mask_processor
from lmql_backends.errors import (
    EngineError, InvalidRequestError, ModelLoadError, OverloadedError, RequestCancelledError,
)
from lmql_backends.loader import LoadOptions, load_model

pytestmark = pytest.mark.timeout(180)

TIMEOUT = 60


@pytest.fixture(scope="module")
def engine_process(tiny_model):
    engine = EngineProcess(tiny_model, LoadOptions(), EngineConfig(num_threads=1, matmul="blas"))
    engine.wait_loaded()
    assert engine.wait_ready(TIMEOUT)
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def engine_thread(tiny_model):
    engine = Engine(load_model(tiny_model), EngineConfig(num_threads=1, matmul="blas")).start()
    yield engine
    engine.stop()


def collect(engine, request: Request) -> list:
    return list(engine.stream_sync(request, timeout=TIMEOUT))


def make_request(**kwargs) -> Request:
    return Request(**{"prompt_ids": [5, 17, 99, 3], "max_tokens": 12, **kwargs})


def token_ids(outputs) -> list[int]:
    return [out.token_id for out in outputs if isinstance(out, TokenOutput)]


def test_model_facts_match_the_loaded_model(engine_process, tiny_model):
    here, there = load_model(tiny_model), engine_process.loaded
    assert there.model is None  # the weights live in the engine process only
    assert (there.vocab_size, there.context_length, there.eos_token_id) == (here.vocab_size, here.context_length, here.eos_token_id)
    assert there.tokenizer("Hello")["input_ids"] == here.tokenizer("Hello")["input_ids"]
    assert "vocab 2048" in engine_process.description


@pytest.mark.parametrize("kwargs", [
    {},
    {"sampling": SamplingParams(temperature=0.8, seed=7, num_top_logprobs=3)},
    {"processors": (make_bias_processor({11: 5.0, 12: -3.0}), make_mask_processor(torch.arange(2048) % 3 == 0))},
    {"max_tokens": 0, "return_logits": True, "score_from": 1},
])
def test_same_outputs_as_the_engine_thread(engine_process, engine_thread, kwargs):
    ours, theirs = collect(engine_process, make_request(**kwargs)), collect(engine_thread, make_request(**kwargs))
    assert [type(o) for o in ours] == [type(o) for o in theirs]
    assert token_ids(ours) == token_ids(theirs)
    for a, b in zip(ours, theirs):
        if isinstance(a, TokenOutput):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5) and a.finish_reason == b.finish_reason
            assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]
        elif a.logits is not None:
            assert torch.allclose(a.logits, b.logits, atol=1e-5)
            assert a.prompt_logprobs == pytest.approx(b.prompt_logprobs, abs=1e-5)
    if "processors" in kwargs:
        assert all(t % 3 == 0 for t in token_ids(ours))


def test_concurrent_streams_each_get_their_own_tokens(engine_process, engine_thread):
    async def run_all(engine):
        requests = [make_request(prompt_ids=[5, 17 + i, 99], max_tokens=10) for i in range(6)]
        return await asyncio.gather(*(collect_async(engine, r) for r in requests))

    assert asyncio.run(run_all(engine_process)) == asyncio.run(run_all(engine_thread))


async def collect_async(engine, request: Request) -> list[int]:
    return token_ids([out async for out in engine.stream(request)])


def test_a_constraint_error_in_the_engine_process_reaches_the_consumer(engine_process):
    nothing = make_mask_processor(torch.zeros(2048, dtype=torch.bool))
    outputs = []
    with pytest.raises(Exception, match="no token is allowed"):
        for out in engine_process.stream_sync(make_request(processors=(nothing,)), timeout=TIMEOUT):
            outputs.append(out)
    assert isinstance(outputs[0], PromptOutput)


def test_abort_frees_the_slot_and_the_stream_ends(engine_process):
    stream = engine_process.stream_sync(make_request(max_tokens=500), timeout=TIMEOUT)
    next(stream), next(stream)
    assert engine_process.num_pending == 1
    stream.close()  # the consumer goes away: the request is aborted
    assert engine_process.num_pending == 0
    assert token_ids(collect(engine_process, make_request())) != []  # the engine goes on serving


def test_statistics_come_back_with_the_outputs(engine_process):
    before = engine_process.stats().num_generated_tokens
    collect(engine_process, make_request(max_tokens=7))
    stats = engine_process.stats()
    assert stats.num_generated_tokens == before + 7
    assert stats.num_running == 0 and stats.num_threads == 1


def test_capacity_is_checked_in_the_server_process(tiny_model):
    engine = EngineProcess(tiny_model, LoadOptions(), EngineConfig(num_threads=1, matmul="blas", max_num_seqs=1, max_queue=0))
    try:
        engine.wait_loaded()
        engine.submit(make_request(max_tokens=200), lambda out: None)
        with pytest.raises(OverloadedError, match="at capacity"):
            engine.submit(make_request(), lambda out: None)
    finally:
        engine.stop()


def test_a_load_error_is_raised_with_the_loaders_message(tmp_path):
    engine = EngineProcess(str(tmp_path / "no-such-model"), LoadOptions(), EngineConfig())
    with pytest.raises(ModelLoadError, match="no-such-model"):
        engine.wait_loaded()
    assert engine._process.poll() is not None  # the engine process is gone too


def test_stop_cancels_what_runs_and_ends_the_process(tiny_model):
    engine = EngineProcess(tiny_model, LoadOptions(), EngineConfig(num_threads=1, matmul="blas"))
    engine.wait_loaded()
    stream = engine.stream_sync(make_request(max_tokens=1000), timeout=TIMEOUT)
    next(stream)
    engine.stop()
    with pytest.raises(RequestCancelledError):
        list(stream)
    assert engine._process.returncode == 0
    with pytest.raises(RequestCancelledError):
        engine.submit(make_request(), lambda out: None)


def test_a_crash_of_the_engine_process_fails_requests_instead_of_hanging(tiny_model):
    engine = EngineProcess(tiny_model, LoadOptions(), EngineConfig(num_threads=1, matmul="blas"))
    engine.wait_loaded()
    stream = engine.stream_sync(make_request(max_tokens=1000), timeout=TIMEOUT)
    next(stream)
    os.kill(engine._process.pid, signal.SIGKILL)
    with pytest.raises(EngineError, match=r"exited unexpectedly \(exit code -9\)"):
        list(stream)
    with pytest.raises(EngineError, match="restart the server"):
        engine.submit(make_request(), lambda out: None)
    assert engine.num_pending == 0
    engine.stop()



def test_a_load_option_that_cannot_cross_is_a_clear_error(tiny_model):
    options = LoadOptions.make(some_option=lambda: None)  # a lambda does not pickle
    with pytest.raises(InvalidRequestError, match="cannot be sent to the engine process.*engine_process=False"):
        EngineProcess(tiny_model, options, EngineConfig())


def test_a_failing_consumer_is_aborted_and_the_others_go_on(engine_process):
    def broken(output):
        raise RuntimeError("consumer bug")

    engine_process.submit(make_request(max_tokens=200), broken)
    assert token_ids(collect(engine_process, make_request(max_tokens=5))) != []
    assert engine_process.is_alive and engine_process.num_pending == 0


def test_statistics_before_the_engine_is_ready_are_zeros(tiny_model):
    engine = EngineProcess(tiny_model, LoadOptions(), EngineConfig(num_threads=1, matmul="blas"))
    try:
        stats = engine.stats()  # /metrics may ask before the engine process has tuned itself
        assert stats.num_generated_tokens == 0 and stats.num_threads == 0
    finally:
        engine.stop()


def test_requests_submitted_together_start_in_one_step(engine_process):
    async def four_choices():
        requests = [make_request(prompt_ids=[5, 17, 99, 3 + i], max_tokens=20) for i in range(4)]
        return await asyncio.gather(*(collect_async(engine_process, r) for r in requests))

    assert [len(tokens) for tokens in asyncio.run(four_choices())] == [20] * 4
    assert engine_process.stats().last_batch_size == 4  # admitted together, so they also end together


def test_a_request_aborted_before_it_was_sent_never_reaches_the_engine(engine_process):
    async def submit_both_abort_one():
        outputs = []
        kept, dropped = make_request(max_tokens=30), make_request(max_tokens=30)
        engine_process.submit(kept, outputs.append)
        engine_process.submit(dropped, outputs.append)
        engine_process.abort(dropped.request_id)  # the same event-loop iteration: not sent yet
        assert engine_process.num_pending == 1
        for _ in range(600):  # bounded: at most ~30 s
            if outputs and outputs[-1].finish_reason is not None:
                break
            await asyncio.sleep(0.05)
        return outputs

    before = engine_process.stats().num_generated_tokens
    outputs = asyncio.run(submit_both_abort_one())
    assert len(token_ids(outputs)) == 30 and outputs[-1].finish_reason == "length"
    assert engine_process.stats().num_generated_tokens - before == 30  # the dropped one generated nothing


def test_the_server_process_alone_decides_capacity(tiny_model):
    # a freed slot is free at once: the engine process must not refuse with a count that has not
    # yet seen the abort sent just before (the server's 429 came from its own count only)
    engine = EngineProcess(tiny_model, LoadOptions(), EngineConfig(num_threads=1, matmul="blas", max_num_seqs=1, max_queue=0))
    try:
        engine.wait_loaded()
        for _ in range(5):
            first = make_request(max_tokens=500)
            engine.submit(first, lambda out: None)
            engine.abort(first.request_id)
        assert token_ids(collect(engine, make_request(max_tokens=3))) != []
    finally:
        engine.stop()
