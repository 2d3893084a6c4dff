"""KV memory on real models: the per-token estimate equals what the runner's stores measure, and an
engine under kv_cache_bytes refuses what can never fit, queues what cannot fit yet, preempts what
outgrows the bound, and still gives every request its full answer."""

from __future__ import annotations

import threading

import pytest
import torch

from lmql_backends.engine import Engine, EngineConfig, ErrorOutput, Request, SamplingParams, TokenOutput
from lmql_backends.engine.kv_budget import kv_bytes_per_token
from lmql_backends.engine.runner import ModelRunner, kv_bytes
from lmql_backends.errors import InvalidRequestError, KVCacheLimitError
from lmql_backends.loader import load_model

pytestmark = pytest.mark.timeout(120)

STREAM_TIMEOUT = 60


@pytest.fixture(scope="module")
def tiny_loaded(tiny_model):
    return load_model(tiny_model)


def collect(engine: Engine, request: Request) -> list:
    return list(engine.stream_sync(request, timeout=STREAM_TIMEOUT))


def token_ids(outputs) -> list[int]:
    return [out.token_id for out in outputs if isinstance(out, TokenOutput)]


def run_together(engine: Engine, requests: list[Request]) -> list[list]:
    """Every request's outputs, the requests submitted from threads of their own at once."""
    results: list = [None] * len(requests)

    def run(i: int) -> None:
        try:
            results[i] = collect(engine, requests[i])
        except Exception as exc:  # the test reads it
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(STREAM_TIMEOUT)
    return results


# ---- the estimate ----------------------------------------------------------------------
@pytest.mark.parametrize("architecture, model_impl", [("tiny", "native"), ("gpt2", "native"), ("llama", "transformers")])
def test_bytes_per_token_from_the_config_equal_the_measured_kv(architecture, model_impl, request):
    name = request.getfixturevalue("tiny_model" if architecture == "tiny" else f"{architecture}_model_dir")
    model = load_model(name).model
    runner = ModelRunner(model, model_impl)
    for length in (1, 7, 40):
        _, kv = runner.prefill(list(range(3, 3 + length)), None, 0, False)
        assert kv_bytes([kv]) == length * kv_bytes_per_token(model)


def test_the_tiny_models_token_costs_its_layers_times_keys_and_values_times_heads_times_width(tiny_loaded):
    config = tiny_loaded.model.config  # 4 layers, 4 heads of 32 (n_embd 128), float32
    assert kv_bytes_per_token(tiny_loaded.model) == config.n_layer * 2 * config.n_head * (config.n_embd // config.n_head) * 4


def test_a_bad_bound_names_itself():
    for bad in (0, -5, 1.5, "1GB", True):
        with pytest.raises(InvalidRequestError, match="kv_cache_bytes"):
            EngineConfig(kv_cache_bytes=bad)


# ---- the bound ---------------------------------------------------------------------------
def bounded_engine(loaded, limit_tokens: int, checks: list, **config) -> Engine:
    """An engine bounded at `limit_tokens` tokens of KV that, after every step, records (everything it holds,
    the running sequences' KV, waiting-for-KV count) from a full measure."""
    bytes_per_token = kv_bytes_per_token(loaded.model)
    holder: dict = {}

    def after_step() -> None:
        engine = holder["engine"]
        memory = engine.kv_budget.measure(engine.scheduler.running)
        checks.append((memory.total_bytes, memory.used_bytes, engine.scheduler.num_held_back))

    engine = Engine(loaded, EngineConfig(kv_cache_bytes=limit_tokens * bytes_per_token, **config), after_step=after_step)
    holder["engine"] = engine
    return engine.start()


def test_a_request_that_can_never_fit_is_refused_at_once_naming_the_flag(tiny_loaded):
    engine = bounded_engine(tiny_loaded, 50, [])
    try:
        with pytest.raises(KVCacheLimitError, match="--kv-cache-bytes") as caught:
            collect(engine, Request(list(range(1, 41)), max_tokens=20))
        assert caught.value.param == "max_tokens"
        assert "40 tokens" in str(caught.value) and "max_tokens is 20" in str(caught.value)
        assert len(token_ids(collect(engine, Request(list(range(1, 31)), max_tokens=20)))) == 20  # 50 tokens fit
        assert engine.num_pending == 0
    finally:
        engine.stop()


def test_requests_that_do_not_fit_together_wait_and_all_finish_under_the_bound(tiny_loaded):
    prompts = [[5 + i, *range(20, 40)] for i in range(6)]  # 21 tokens + 30 generated: 51 each
    requests = [Request(p, 30, SamplingParams(1.0, 1.0, seed=i)) for i, p in enumerate(prompts)]
    free = Engine(tiny_loaded, EngineConfig(use_prefix_cache=False)).start()
    try:
        expected = [token_ids(collect(free, Request(p, 30, SamplingParams(1.0, 1.0, seed=i)))) for i, p in enumerate(prompts)]
    finally:
        free.stop()
    checks: list = []
    limit_tokens = 120  # two at a time
    engine = bounded_engine(tiny_loaded, limit_tokens, checks)
    try:
        results = run_together(engine, requests)
    finally:
        engine.stop()
    assert [token_ids(r) for r in results] == expected
    limit = limit_tokens * kv_bytes_per_token(tiny_loaded.model)
    assert all(total <= limit for total, _, _ in checks)
    assert any(waiting > 0 for _, _, waiting in checks), "no request ever waited for KV memory"


def test_sequences_whose_kv_outgrows_the_bound_are_preempted_and_still_finish(tiny_loaded):
    """The budget counts a cached past of 64+ tokens as shared by the forks that continue it; but a decode
    batch that mixes KVs copies the past into every row (forks that start in one step with one token left
    to compute, or an unrelated request in their batch), the KV outgrows the bound, and the newest running
    sequences are preempted, then recomputed: every request still gets exactly its unbounded answer."""
    prompt = [7 + i % 50 for i in range(151)]
    forks = [Request(prompt, 20, SamplingParams(1.0, 1.0, seed=i)) for i in range(4)]
    other = Request([3, 4, 5, 6, 8], 20, SamplingParams(1.0, 1.0, seed=9))
    free = Engine(tiny_loaded).start()
    try:
        expected = [token_ids(collect(free, Request(r.prompt_ids, 20, r.sampling))) for r in [*forks, other]]
    finally:
        free.stop()
    checks: list = []
    limit_tokens = 280
    engine = bounded_engine(tiny_loaded, limit_tokens, checks)
    try:
        collect(engine, Request(prompt, 1))  # the prompt in the prefix cache
        results = run_together(engine, [*forks, other])
        stats = engine.stats()
    finally:
        engine.stop()
    assert [token_ids(r) for r in results] == expected
    assert stats.num_preemptions > 0
    limit = limit_tokens * kv_bytes_per_token(tiny_loaded.model)
    assert all(total <= limit for total, _, _ in checks)


def test_forks_of_a_cached_prompt_hold_it_once_in_the_measure_and_the_stats(tiny_loaded):
    """Forks of a 120-token prompt whose first 100 tokens are cached: each computes its last 20 after the
    shared 100 (a fork with a single token to compute joins a decode batch, which may copy its past)."""
    prompt, num_shared = [9 + i % 40 for i in range(120)], 100
    bytes_per_token = kv_bytes_per_token(tiny_loaded.model)
    records: list = []
    holder: dict = {}

    def after_step() -> None:
        engine = holder["engine"]
        running = list(engine.scheduler.running)
        if len(running) == 8 and all(seq.num_generated > 0 for seq in running):
            tails = sum(seq.num_computed - num_shared for seq in running)
            records.append((engine.kv_budget.measure(running), tails))

    engine = holder["engine"] = Engine(tiny_loaded, EngineConfig(), after_step=after_step).start()
    try:
        collect(engine, Request(prompt[:num_shared], 1))  # the shared part in the prefix cache
        results = run_together(engine, [Request(prompt, 40, SamplingParams(1.0, 1.0, seed=i)) for i in range(8)])
        for _ in range(100):  # the engine thread measures again when the sequences are gone
            stats = engine.stats()
            if stats.num_running == 0 and stats.kv_used_bytes == 0:
                break
            threading.Event().wait(0.05)
    finally:
        engine.stop()
    assert all(len(token_ids(r)) == 40 for r in results)
    assert records, "the eight forks never ran together"
    for memory, tails in records:
        assert memory.shared_bytes == num_shared * bytes_per_token  # the cached part, counted once
        assert memory.used_bytes == (num_shared + tails) * bytes_per_token
        assert memory.private_bytes == tails * bytes_per_token
        assert memory.total_bytes >= memory.used_bytes
        assert memory.prefix_cache_bytes == num_shared * bytes_per_token
    assert stats.kv_bytes_per_token == bytes_per_token and stats.kv_limit_bytes == 0 and stats.kv_free_bytes == 0
    assert stats.kv_prefix_cache_bytes > 0 and stats.kv_total_bytes == stats.kv_prefix_cache_bytes
