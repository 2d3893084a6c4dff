"""The engine thread's torch thread count: given, or chosen from the model's decode speed."""

from __future__ import annotations


import pytest
import torch

from lmql_backends.engine import Engine, EngineConfig, Request
from lmql_backends.engine import runner as runner_module
from lmql_backends.engine.runner import ModelRunner, choose_num_threads
from lmql_backends.errors import InvalidRequestError
from lmql_backends.loader import load_model


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def test_a_fast_decoding_model_runs_on_one_thread(tiny_model, two_threads):
    assert choose_num_threads(ModelRunner(load_model(tiny_model).model)) == 1


def test_a_slow_decoding_model_keeps_torchs_default(tiny_model, two_threads, monkeypatch):
    monkeypatch.setattr(runner_module, "SINGLE_THREAD_BELOW_SECONDS", 0.0)  # every model counts as slow
    assert choose_num_threads(ModelRunner(load_model(tiny_model).model)) == 2


def test_a_given_thread_count_is_used_and_shown_in_the_stats(tiny_model):
    engine = Engine(load_model(tiny_model), EngineConfig(num_threads=3)).start()
    try:
        list(engine.stream_sync(Request([0, 5, 6], max_tokens=1), timeout=60))
        assert engine.num_threads == 3 and engine.stats().num_threads == 3
    finally:
        engine.stop()


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2"])
def test_a_bad_thread_count_is_refused_naming_the_value(bad):
    with pytest.raises(InvalidRequestError, match=f"num_threads must be an integer >= 1 or None, got {bad!r}"):
        EngineConfig(num_threads=bad)
