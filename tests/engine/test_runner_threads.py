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


def test_an_automatic_one_thread_engine_still_attends_over_long_pasts_on_torchs_default(tiny_model, two_threads):
    engine = Engine(load_model(tiny_model), EngineConfig()).start()
    try:
        list(engine.stream_sync(Request([0, 5, 6], max_tokens=1), timeout=60))
        assert engine.num_threads == 1
        assert engine.runner.forward.long_attention_threads == 2
    finally:
        engine.stop()


def test_a_given_thread_count_also_holds_for_long_attention(tiny_model, two_threads):
    engine = Engine(load_model(tiny_model), EngineConfig(num_threads=1)).start()
    try:
        list(engine.stream_sync(Request([0, 5, 6], max_tokens=1), timeout=60))
        assert engine.runner.forward.long_attention_threads == 1
    finally:
        engine.stop()


def test_long_attention_on_more_threads_gives_the_same_logits_and_restores_the_count(tiny_model, monkeypatch):
    from lmql_backends.engine import native_gpt2

    runner = ModelRunner(load_model(tiny_model).model)
    seen_counts = []
    sdpa = native_gpt2.F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        seen_counts.append(torch.get_num_threads())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(native_gpt2.F, "scaled_dot_product_attention", counting_sdpa)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ids = [(7 * i) % 2000 + 1 for i in range(native_gpt2.LONG_ATTENTION_COLUMNS + 3)]
        _, past = runner.prefill(ids, None, 0, all_logits=False)
        one_thread, _ = runner.decode([5], [past.prefix(past.length)], [past.length])
        runner.use_threads_for_long_attention(2)
        seen_counts.clear()
        two_threads, _ = runner.decode([5], [past.prefix(past.length)], [past.length])
        assert seen_counts == [2] * runner.num_layers and torch.get_num_threads() == 1
        short_past = runner.prefill(ids[:20], None, 0, all_logits=False)[1]
        seen_counts.clear()
        runner.decode([5], [short_past], [20])
        assert seen_counts == [1] * runner.num_layers  # short pasts stay on the step's own count
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(two_threads, one_thread, rtol=0, atol=1e-5)
