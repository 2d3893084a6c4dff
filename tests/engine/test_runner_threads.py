"""The engine thread's torch thread count: given, or torch's default."""

from __future__ import annotations


import pytest
import torch

from lmql_backends.engine import Engine, EngineConfig, Request
from lmql_backends.errors import InvalidRequestError
from lmql_backends.loader import load_model


def test_without_a_count_the_engine_keeps_torchs_default(tiny_model):
    engine = Engine(load_model(tiny_model), EngineConfig()).start()
    try:
        list(engine.stream_sync(Request([0, 5, 6], max_tokens=1), timeout=60))
        assert engine.stats().num_threads == torch.get_num_threads()
    finally:
        engine.stop()


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
