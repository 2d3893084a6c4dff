"""Engine tests on real models: exactness against a no-cache transformers reference, the legacy
per-token pattern, echo scoring, processors, seeded sampling, aborts, errors, faults, stats.

The reference is a plain full forward of the whole sequence for every token (no KV cache), so
agreement proves the prefix cache, the in-place KV stores and batched decoding are exact.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
import torch

from lmql_backends.engine import (
    Engine, EngineConfig, ErrorOutput, PromptOutput, Request, SamplingParams, TokenOutput,
    make_bias_processor, make_mask_processor,
)
from lmql_backends.engine import runner
from lmql_backends.engine.engine import check_request
from lmql_backends.sampling import draw_token, seeded_uniform, top_p_filter
from lmql_backends.errors import ContextLengthError, EngineError, InvalidRequestError
from lmql_backends.loader import load_model

pytestmark = pytest.mark.timeout(120)

TOLERANCE = 1e-4
STREAM_TIMEOUT = 60
PROMPT_LENGTHS = (1, 3, 9, 17, 33, 50)


# ---- the reference: a full forward per token, no cache ---------------------------------
@torch.inference_mode()
def reference_logits(model, ids: list[int]) -> torch.Tensor:
    """Next-token logits after every position of `ids` ([len(ids), V]), without any cache."""
    return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()


def reference_greedy(model, ids: list[int], num_tokens: int) -> tuple[list[int], list[float]]:
    ids, tokens, logprobs = list(ids), [], []
    for _ in range(num_tokens):
        row = torch.log_softmax(reference_logits(model, ids)[-1], dim=-1)
        token = int(torch.argmax(row))
        tokens.append(token)
        logprobs.append(float(row[token]))
        ids.append(token)
    return tokens, logprobs


def reference_sample(model, ids: list[int], num_tokens: int, params: SamplingParams) -> list[int]:
    ids, tokens = list(ids), []
    for _ in range(num_tokens):
        logprobs = torch.log_softmax(reference_logits(model, ids)[-1] / params.temperature, dim=-1)
        token = draw_token(top_p_filter(logprobs, params.top_p), seeded_uniform(params.seed, len(ids)))
        tokens.append(token)
        ids.append(token)
    return tokens


def make_prompt(length: int, seed: int, vocab_size: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab_size) for _ in range(length)]


# ---- fixtures -------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one torch thread is faster than two on shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=["tiny", "gpt2", "llama"])
def loaded(request):
    """The embedded model and random GPT-2 and Llama models built from configs."""
    if request.param == "tiny":
        return load_model(request.getfixturevalue("tiny_model"))
    return load_model(request.getfixturevalue(f"{request.param}_model_dir"))


@pytest.fixture
def tiny_loaded(tiny_model):
    return load_model(tiny_model)


@pytest.fixture
def make_engine():
    engines = []

    def make(loaded_model, **config) -> Engine:
        engine = Engine(loaded_model, EngineConfig(**config)).start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


@pytest.fixture
def decode_batch_sizes(monkeypatch):
    """Record the batch size of every batched decode step (the model still runs)."""
    sizes: list[int] = []

    def watch(engine: Engine) -> list[int]:
        original = engine.runner.decode

        def recording_decode(tokens, pasts, past_lens):
            sizes.append(len(tokens))
            return original(tokens, pasts, past_lens)

        monkeypatch.setattr(engine.runner, "decode", recording_decode)
        return sizes

    return watch



# ---- helpers --------------------------------------------------------------------------
def collect(engine: Engine, request: Request) -> list:
    return list(engine.stream_sync(request, timeout=STREAM_TIMEOUT))


def generated(outputs) -> tuple[list[int], list[float]]:
    tokens = [out for out in outputs if isinstance(out, TokenOutput)]
    return [out.token_id for out in tokens], [out.logprob for out in tokens]


def prompt_output(outputs) -> PromptOutput:
    first = outputs[0]
    assert isinstance(first, PromptOutput)
    return first


def run_in_threads(function, arguments: list) -> list:
    """Call `function` on every argument concurrently; return the results in order."""
    results: list = [None] * len(arguments)
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            results[index] = function(arguments[index])
        except BaseException as exc:  # re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(arguments))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(STREAM_TIMEOUT)
    if errors:
        raise errors[0]
    return results


def assert_close(actual: list[float], expected: list[float]) -> None:
    assert len(actual) == len(expected)
    assert max((abs(a - b) for a, b in zip(actual, expected)), default=0.0) < TOLERANCE


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the engine did not reach the expected state"
        time.sleep(0.01)


# ---- exactness ------------------------------------------------------------------------
@pytest.mark.parametrize("use_prefix_cache", [True, False], ids=["cache", "no-cache"])
def test_single_greedy_request_matches_the_reference(loaded, make_engine, use_prefix_cache):
    engine = make_engine(loaded, use_prefix_cache=use_prefix_cache)
    prompt = make_prompt(13, seed=1, vocab_size=loaded.vocab_size)
    expected_tokens, expected_logprobs = reference_greedy(loaded.model, prompt, 12)
    for _ in range(2):  # the second run hits the prefix cache when it is on
        outputs = collect(engine, Request(prompt, max_tokens=12))
        tokens, logprobs = generated(outputs)
        assert tokens == expected_tokens
        assert_close(logprobs, expected_logprobs)
        assert outputs[-1].finish_reason == "length"
    assert prompt_output(outputs).num_cached_tokens == (12 if use_prefix_cache else 0)


@pytest.mark.parametrize("use_prefix_cache", [True, False], ids=["cache", "no-cache"])
def test_concurrent_greedy_requests_batch_and_match_the_reference(
    loaded, make_engine, decode_batch_sizes, use_prefix_cache
):
    engine = make_engine(loaded, use_prefix_cache=use_prefix_cache)
    sizes = decode_batch_sizes(engine)
    prompts = [make_prompt(n, seed=10 + n, vocab_size=loaded.vocab_size) for n in PROMPT_LENGTHS]
    max_tokens = [6 + i for i in range(len(prompts))]  # they finish at different steps
    expected = [reference_greedy(loaded.model, p, n) for p, n in zip(prompts, max_tokens)]
    for _ in range(2):
        results = run_in_threads(lambda i: generated(collect(engine, Request(prompts[i], max_tokens[i]))), list(range(6)))
        for (tokens, logprobs), (expected_tokens, expected_logprobs) in zip(results, expected):
            assert tokens == expected_tokens
            assert_close(logprobs, expected_logprobs)
    assert max(sizes) > 1, "concurrent requests never shared a decode step"


async def test_asyncio_streams_match_the_reference(tiny_loaded, make_engine, decode_batch_sizes):
    engine = make_engine(tiny_loaded)
    sizes = decode_batch_sizes(engine)
    prompts = [make_prompt(n, seed=20 + n, vocab_size=tiny_loaded.vocab_size) for n in PROMPT_LENGTHS]

    async def run(prompt):
        return generated([out async for out in engine.stream(Request(prompt, max_tokens=10))])

    results = await asyncio.wait_for(asyncio.gather(*(run(p) for p in prompts)), STREAM_TIMEOUT)
    for prompt, (tokens, logprobs) in zip(prompts, results):
        expected_tokens, expected_logprobs = reference_greedy(tiny_loaded.model, prompt, 10)
        assert tokens == expected_tokens
        assert_close(logprobs, expected_logprobs)
    assert max(sizes) > 1


@pytest.mark.parametrize("use_prefix_cache", [True, False], ids=["cache", "no-cache"])
def test_prompts_arriving_together_prefill_in_one_batch_and_match_the_reference(tiny_loaded, monkeypatch,
                                                                               use_prefix_cache):
    engine = Engine(tiny_loaded, EngineConfig(use_prefix_cache=use_prefix_cache))
    batches: list[int] = []
    original = engine.runner.prefill_batch

    def recording(prompts):
        batches.append(len(prompts))
        return original(prompts)

    monkeypatch.setattr(engine.runner, "prefill_batch", recording)
    prompts = [[1, *make_prompt(n, seed=30 + n, vocab_size=tiny_loaded.vocab_size)] for n in (9, 12, 7, 11)]
    if use_prefix_cache:  # a cached one-token prefix (e.g. BOS) does not keep a prompt out of the batch
        engine.cache.insert([1, 2], engine.runner.prefill([1, 2], None, 0, False)[1])
    outputs = [[] for _ in prompts]
    for prompt, out in zip(prompts, outputs):  # queued before the engine's first step
        engine.submit(Request(prompt, max_tokens=6), out.append)
    engine.start()
    try:
        wait_until(lambda: all(o and o[-1].finish_reason for o in outputs))
    finally:
        engine.stop()
    assert batches == [4]
    for prompt, out in zip(prompts, outputs):
        assert prompt_output(out).num_cached_tokens == 0  # computed in the batch, not copied
        expected_tokens, expected_logprobs = reference_greedy(tiny_loaded.model, prompt, 6)
        tokens, logprobs = generated(out)
        assert tokens == expected_tokens
        assert_close(logprobs, expected_logprobs)


def test_requests_branching_from_one_cached_prefix_do_not_share_kv(loaded, make_engine):
    """Several requests extend the same cached prefix at once; each must see only its own tokens."""
    engine = make_engine(loaded)
    prefix = make_prompt(20, seed=3, vocab_size=loaded.vocab_size)
    collect(engine, Request(prefix))
    prompts = [prefix + [t] for t in (5, 6, 7, 8)] + [prefix[:11] + [9]]
    results = run_in_threads(lambda p: collect(engine, Request(p, max_tokens=6)), prompts)
    for prompt, outputs in zip(prompts, results):
        expected_tokens, expected_logprobs = reference_greedy(loaded.model, prompt, 6)
        tokens, logprobs = generated(outputs)
        assert tokens == expected_tokens
        assert_close(logprobs, expected_logprobs)
        assert prompt_output(outputs).num_cached_tokens >= 11


def test_a_branch_never_overwrites_the_cached_kv_of_another(loaded, make_engine):
    """Branch b reuses the prefix of cached branch a; continuing a afterwards must still be exact."""
    engine = make_engine(loaded)
    prefix = make_prompt(20, seed=31, vocab_size=loaded.vocab_size)
    branch_a, branch_b = prefix + [11, 12], prefix + [13]
    for ids in (prefix, branch_a, branch_b, prefix + [14, 15, 16], branch_a + [17]):
        out = legacy_forward(engine, ids)
        assert torch.allclose(out.logits, reference_logits(loaded.model, ids)[-1], atol=TOLERANCE, rtol=0)
    assert out.num_cached_tokens == len(branch_a)
    tokens, logprobs = generated(collect(engine, Request(branch_b, max_tokens=5)))
    expected_tokens, expected_logprobs = reference_greedy(loaded.model, branch_b, 5)
    assert tokens == expected_tokens
    assert_close(logprobs, expected_logprobs)


# ---- the legacy per-token pattern -----------------------------------------------------
def legacy_forward(engine: Engine, ids: list[int]) -> PromptOutput:
    outputs = collect(engine, Request(list(ids), return_logits=True))
    assert len(outputs) == 1 and outputs[0].finish_reason == "length"
    return outputs[0]


def run_legacy_client(engine: Engine, model, prompt: list[int], num_tokens: int) -> list[int]:
    """Each token is a separate request carrying the whole sequence; returns num_cached per request."""
    ids, cached = list(prompt), []
    for _ in range(num_tokens):
        out = legacy_forward(engine, ids)
        assert torch.allclose(out.logits, reference_logits(model, ids)[-1], atol=TOLERANCE, rtol=0)
        cached.append(out.num_cached_tokens)
        ids.append(int(torch.argmax(out.logits)))
    return cached


def test_legacy_requests_compute_only_the_new_token(loaded, make_engine):
    engine = make_engine(loaded)
    prompt = make_prompt(21, seed=4, vocab_size=loaded.vocab_size)
    cached = run_legacy_client(engine, loaded.model, prompt, 10)
    assert cached == [0] + [len(prompt) + i - 1 for i in range(1, 10)]
    assert engine.stats().num_prompt_tokens == len(prompt) + 9


def test_legacy_requests_from_several_clients_batch_together(loaded, make_engine, decode_batch_sizes):
    engine = make_engine(loaded)
    sizes = decode_batch_sizes(engine)
    prompts = [make_prompt(5 + 4 * i, seed=40 + i, vocab_size=loaded.vocab_size) for i in range(4)]
    results = run_in_threads(lambda p: run_legacy_client(engine, loaded.model, p, 8), prompts)
    for prompt, cached in zip(prompts, results):
        assert cached[1:] == [len(prompt) + i - 1 for i in range(1, 8)]
    assert max(sizes) > 1, "legacy forwards of different clients never shared a step"


def test_legacy_logits_without_the_cache_are_exact(tiny_loaded, make_engine):
    engine = make_engine(tiny_loaded, use_prefix_cache=False)
    cached = run_legacy_client(engine, tiny_loaded.model, make_prompt(9, seed=5, vocab_size=2048), 4)
    assert cached == [0, 0, 0, 0]


# ---- echo scoring ---------------------------------------------------------------------
@pytest.mark.parametrize("score_from", [1, 4, 29])
def test_scoring_matches_the_reference(loaded, make_engine, score_from):
    engine = make_engine(loaded)
    ids = make_prompt(30, seed=6, vocab_size=loaded.vocab_size)
    expected_rows = torch.log_softmax(reference_logits(loaded.model, ids), dim=-1)
    expected = [float(expected_rows[i - 1, ids[i]]) for i in range(score_from, len(ids))]
    collect(engine, Request(ids, max_tokens=2))  # the whole sequence is now cached
    outputs = collect(engine, Request(ids, score_from=score_from, sampling=SamplingParams(num_top_logprobs=3)))
    out = prompt_output(outputs)
    assert_close(out.prompt_logprobs, expected)
    assert out.num_cached_tokens <= score_from - 1
    for i, top in zip(range(score_from, len(ids)), out.prompt_top_logprobs):
        assert top[0][0] == int(torch.argmax(expected_rows[i - 1]))
        assert abs(top[0][1] - float(expected_rows[i - 1].max())) < TOLERANCE


def test_scoring_and_generation_in_one_request(tiny_loaded, make_engine):
    engine = make_engine(tiny_loaded)
    ids = make_prompt(12, seed=7, vocab_size=tiny_loaded.vocab_size)
    outputs = collect(engine, Request(ids, max_tokens=3, score_from=2))
    rows = torch.log_softmax(reference_logits(tiny_loaded.model, ids), dim=-1)
    assert_close(prompt_output(outputs).prompt_logprobs, [float(rows[i - 1, ids[i]]) for i in range(2, 12)])
    assert generated(outputs)[0] == reference_greedy(tiny_loaded.model, ids, 3)[0]


# ---- processors -----------------------------------------------------------------------
def test_mask_restricts_generated_tokens_and_renormalises(loaded, make_engine):
    engine = make_engine(loaded)
    allowed_ids = list(range(100, 140))
    mask = torch.zeros(loaded.vocab_size, dtype=torch.bool)
    mask[allowed_ids] = True
    prompt = make_prompt(8, seed=8, vocab_size=loaded.vocab_size)
    outputs = collect(engine, Request(prompt, max_tokens=6, processors=(make_mask_processor(mask),)))
    tokens, logprobs = generated(outputs)
    ids = list(prompt)
    for token, logprob in zip(tokens, logprobs):
        masked = reference_logits(loaded.model, ids)[-1].masked_fill(~mask, float("-inf"))
        expected = torch.log_softmax(masked, dim=-1)
        assert token in allowed_ids and token == int(torch.argmax(expected))
        assert abs(logprob - float(expected[token])) < TOLERANCE
        ids.append(token)


def test_mask_shorter_than_the_logits_never_allows_padding_rows(tiny_loaded, make_engine):
    engine = make_engine(tiny_loaded)
    mask = torch.ones(50, dtype=torch.bool)  # tokens 50.. are outside the mask
    outputs = collect(engine, Request([1, 2, 3], max_tokens=5, processors=(make_mask_processor(mask),)))
    assert all(token < 50 for token in generated(outputs)[0])


def test_bias_forces_a_token(tiny_loaded, make_engine):
    engine = make_engine(tiny_loaded)
    request = Request([5, 6, 7], max_tokens=4, processors=(make_bias_processor({42: 1000.0}),))
    tokens, logprobs = generated(collect(engine, request))
    assert tokens == [42] * 4
    assert all(abs(lp) < 1e-4 for lp in logprobs)


def test_processors_see_the_ids_so_far(tiny_loaded, make_engine):
    engine = make_engine(tiny_loaded)
    seen: list[int] = []

    def force_length(ids, logits):
        seen.append(len(ids))
        return make_bias_processor({len(ids): 1000.0})(ids, logits)

    tokens, _ = generated(collect(engine, Request([1, 2, 3], max_tokens=4, processors=(force_length,))))
    assert seen == [3, 4, 5, 6] and tokens == [3, 4, 5, 6]


def test_stop_token_ends_generation(tiny_loaded, make_engine):
    engine = make_engine(tiny_loaded)
    prompt = make_prompt(10, seed=9, vocab_size=tiny_loaded.vocab_size)
    expected, _ = reference_greedy(tiny_loaded.model, prompt, 5)
    outputs = collect(engine, Request(prompt, max_tokens=20, stop_token_ids=frozenset({expected[2]})))
    tokens, _ = generated(outputs)
    assert tokens == expected[:expected.index(expected[2]) + 1]
    assert outputs[-1].finish_reason == "stop"


# ---- seeded sampling ------------------------------------------------------------------
def test_seeded_sampling_is_reproducible_and_matches_the_reference(loaded, make_engine):
    engine = make_engine(loaded)
    prompt = make_prompt(7, seed=11, vocab_size=loaded.vocab_size)
    params = SamplingParams(temperature=1.3, top_p=0.95, seed=2024)
    first, _ = generated(collect(engine, Request(prompt, max_tokens=10, sampling=params)))
    second, _ = generated(collect(engine, Request(prompt, max_tokens=10, sampling=params)))
    assert first == second == reference_sample(loaded.model, prompt, 10, params)
    other, _ = generated(collect(engine, Request(prompt, max_tokens=10, sampling=SamplingParams(1.3, 0.95, seed=7))))
    assert other != first


def test_seeded_sampling_does_not_depend_on_the_batch(tiny_loaded, make_engine, decode_batch_sizes):
    engine = make_engine(tiny_loaded)
    sizes = decode_batch_sizes(engine)
    prompts = [make_prompt(4 + 5 * i, seed=50 + i, vocab_size=tiny_loaded.vocab_size) for i in range(5)]
    params = [SamplingParams(temperature=1.0, seed=100 + i) for i in range(5)]
    alone = [generated(collect(engine, Request(p, max_tokens=8, sampling=s)))[0] for p, s in zip(prompts, params)]
    together = run_in_threads(
        lambda i: generated(collect(engine, Request(prompts[i], max_tokens=8, sampling=params[i])))[0], list(range(5))
    )
    assert together == alone
    assert max(sizes) > 1


def test_a_batch_mixing_greedy_masked_and_sampled_requests_gives_what_each_gets_alone(
    tiny_loaded, make_engine, decode_batch_sizes
):
    engine = make_engine(tiny_loaded)
    sizes = decode_batch_sizes(engine)
    mask = torch.zeros(tiny_loaded.vocab_size, dtype=torch.bool)
    mask[200:260] = True
    settings = [
        {}, {"sampling": SamplingParams(num_top_logprobs=3)}, {"processors": (make_mask_processor(mask),)},
        {"sampling": SamplingParams(temperature=0.8, seed=7)}, {},
    ]
    prompts = [make_prompt(5 + 3 * i, seed=70 + i, vocab_size=tiny_loaded.vocab_size) for i in range(len(settings))]

    def run(i: int):
        tokens = [o for o in collect(engine, Request(prompts[i], 10, **settings[i])) if isinstance(o, TokenOutput)]
        return [o.token_id for o in tokens], [o.logprob for o in tokens], [[t for t, _ in o.top_logprobs] for o in tokens]

    alone = [run(i) for i in range(len(settings))]
    together = run_in_threads(run, list(range(len(settings))))
    for (tokens, logprobs, tops), (tokens_alone, logprobs_alone, tops_alone) in zip(together, alone):
        assert (tokens, tops) == (tokens_alone, tops_alone)
        assert_close(logprobs, logprobs_alone)  # a batch's padding changes float rounding only
    assert all(200 <= token < 260 for token in alone[2][0]) and all(len(top) == 3 for top in alone[1][2])
    assert max(sizes) > 1


# ---- aborts ---------------------------------------------------------------------------
def test_closing_a_sync_stream_aborts_the_request(tiny_loaded, make_engine):
    engine = make_engine(tiny_loaded)
    prompt = make_prompt(10, seed=12, vocab_size=tiny_loaded.vocab_size)
    stream = engine.stream_sync(Request(prompt, max_tokens=500), timeout=STREAM_TIMEOUT)
    assert isinstance(next(stream), PromptOutput)
    assert isinstance(next(stream), TokenOutput)
    stream.close()
    wait_until(lambda: not engine.scheduler.running and not engine.scheduler.waiting)
    assert engine.cache.num_tokens == 0 and not engine.cache.entries
    assert engine.stats().num_generated_tokens < 500
    tokens, _ = generated(collect(engine, Request(prompt, max_tokens=3)))  # still serving
    assert tokens == reference_greedy(tiny_loaded.model, prompt, 3)[0]


async def test_leaving_an_async_stream_aborts_the_request(tiny_loaded, make_engine):
    engine = make_engine(tiny_loaded)
    stream = engine.stream(Request([1, 2, 3, 4], max_tokens=500))
    async for out in stream:
        if isinstance(out, TokenOutput):
            break
    await stream.aclose()
    await asyncio.to_thread(wait_until, lambda: not engine.scheduler.running)
    assert engine.cache.num_tokens == 0


def test_abort_by_request_id_leaves_other_requests_running(tiny_loaded, make_engine):
    engine = make_engine(tiny_loaded)
    doomed = Request([7, 8, 9], max_tokens=500)
    outputs: list = []
    engine.submit(doomed, outputs.append)
    prompt = make_prompt(6, seed=13, vocab_size=tiny_loaded.vocab_size)
    survivor = engine.stream_sync(Request(prompt, max_tokens=12), timeout=STREAM_TIMEOUT)
    first = [next(survivor), next(survivor)]
    engine.abort(doomed.request_id)
    rest = list(survivor)
    assert generated(first + rest)[0] == reference_greedy(tiny_loaded.model, prompt, 12)[0]
    wait_until(lambda: not engine.scheduler.running)
    assert not any(out.finish_reason for out in outputs if not isinstance(out, PromptOutput))
    assert all(entry.ids[:3] != (7, 8, 9) for entry in engine.cache.entries.values())


# ---- validation -----------------------------------------------------------------------
@pytest.mark.parametrize("request_kwargs, error, words", [
    ({"prompt_ids": []}, InvalidRequestError, "empty"),
    ({"prompt_ids": [1, 2048]}, InvalidRequestError, "2048"),
    ({"prompt_ids": [-1]}, InvalidRequestError, "-1"),
    ({"prompt_ids": [1, 2], "max_tokens": -1}, InvalidRequestError, "-1"),
    ({"prompt_ids": [1] * 1000, "max_tokens": 25}, ContextLengthError, "1024"),
    ({"prompt_ids": [1, 2, 3], "score_from": 4}, InvalidRequestError, "score_from"),
])
def test_check_request_names_what_the_engine_cannot_run(tiny_loaded, request_kwargs, error, words):
    """The rules a boundary (the in-process client) checks once; the engine itself trusts requests."""
    with pytest.raises(error, match=words):
        check_request(Request(**request_kwargs), tiny_loaded.vocab_size, tiny_loaded.context_length)


def test_check_request_accepts_a_request_that_fills_the_context(tiny_loaded):
    full = Request([1] * 1000, max_tokens=24, score_from=1000)
    assert check_request(full, tiny_loaded.vocab_size, tiny_loaded.context_length) is None


def test_all_tokens_masked_fails_with_constraint_error(tiny_loaded, make_engine):
    from lmql_backends.errors import ConstraintError

    engine = make_engine(tiny_loaded)
    mask = torch.zeros(tiny_loaded.vocab_size, dtype=torch.bool)
    with pytest.raises(ConstraintError):
        collect(engine, Request([1, 2], max_tokens=3, processors=(make_mask_processor(mask),)))
    assert generated(collect(engine, Request([1, 2], max_tokens=2)))[0]  # still serving


# ---- faults ---------------------------------------------------------------------------
def fail_once(monkeypatch, engine: Engine, method: str) -> list[int]:
    """Make the runner's `method` raise on its next call only; returns the call count."""
    original = getattr(engine.runner, method)
    calls = [0]

    def faulty(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("simulated forward fault")
        return original(*args, **kwargs)

    monkeypatch.setattr(engine.runner, method, faulty)
    return calls


def test_prefill_fault_fails_only_that_request(tiny_loaded, make_engine, monkeypatch):
    engine = make_engine(tiny_loaded)
    prompt = make_prompt(8, seed=14, vocab_size=tiny_loaded.vocab_size)
    running = engine.stream_sync(Request(prompt, max_tokens=15), timeout=STREAM_TIMEOUT)
    first = [next(running), next(running)]  # its prefill is done; it now decodes
    fail_once(monkeypatch, engine, "prefill")
    with pytest.raises(EngineError, match="simulated forward fault"):
        collect(engine, Request(make_prompt(9, seed=15, vocab_size=2048), max_tokens=4))
    assert generated(first + list(running))[0] == reference_greedy(tiny_loaded.model, prompt, 15)[0]
    assert generated(collect(engine, Request(prompt[:5], max_tokens=3)))[0] == reference_greedy(
        tiny_loaded.model, prompt[:5], 3)[0]
    assert engine.stats().num_failed_requests == 1


def test_decode_fault_fails_the_batch_and_the_engine_keeps_serving(tiny_loaded, make_engine, monkeypatch):
    engine = make_engine(tiny_loaded)
    fail_once(monkeypatch, engine, "decode")
    prompt = make_prompt(8, seed=16, vocab_size=tiny_loaded.vocab_size)
    with pytest.raises(EngineError, match="simulated forward fault"):
        collect(engine, Request(prompt, max_tokens=5))
    tokens, logprobs = generated(collect(engine, Request(prompt, max_tokens=5)))
    expected_tokens, expected_logprobs = reference_greedy(tiny_loaded.model, prompt, 5)
    assert tokens == expected_tokens
    assert_close(logprobs, expected_logprobs)
    assert engine.stats().num_failed_requests == 1


def test_failed_request_leaves_nothing_in_the_cache(tiny_loaded, make_engine, monkeypatch):
    engine = make_engine(tiny_loaded)
    fail_once(monkeypatch, engine, "decode")
    with pytest.raises(EngineError):
        collect(engine, Request([3, 1, 4, 1, 5], max_tokens=5))
    wait_until(lambda: not engine.scheduler.running)
    assert engine.cache.num_tokens == 0


# ---- bounded cache --------------------------------------------------------------------
def test_lru_bound_is_respected_while_serving(tiny_loaded, make_engine):
    engine = make_engine(tiny_loaded, cache_tokens=64)
    for i in range(12):
        prompt = make_prompt(10 + 3 * i, seed=60 + i, vocab_size=tiny_loaded.vocab_size)
        tokens, _ = generated(collect(engine, Request(prompt, max_tokens=4)))
        assert tokens == reference_greedy(tiny_loaded.model, prompt, 4)[0]
        assert engine.cache.num_tokens <= engine.cache.max_tokens == 64
        assert engine.stats().cache_tokens == engine.cache.num_tokens
    assert engine.cache.num_tokens > 0


# ---- statistics -----------------------------------------------------------------------
def test_stats_count_tokens_and_cache_hits(tiny_loaded, make_engine):
    engine = make_engine(tiny_loaded)
    fresh = engine.stats()
    assert (fresh.num_generated_tokens, fresh.num_prompt_tokens, fresh.num_steps, fresh.cache_hit_rate) == (0, 0, 0, 0.0)
    prompt = make_prompt(20, seed=17, vocab_size=tiny_loaded.vocab_size)
    collect(engine, Request(prompt, max_tokens=8))
    stats = engine.stats()
    assert stats.num_generated_tokens == 8 and stats.num_prompt_tokens == 20
    assert stats.num_steps >= 8 and stats.tokens_per_second > 0
    assert stats.cache_tokens == 27 and stats.cache_hit_rate == 0.0
    collect(engine, Request(prompt + [1], max_tokens=2))
    stats = engine.stats()
    assert stats.num_cached_prompt_tokens == 20 and stats.num_prompt_tokens == 21
    assert stats.cache_hit_rate == pytest.approx(20 / (20 + 21))
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.num_failed_requests == 0


def test_stats_show_queue_depth_and_batch_size(tiny_loaded, make_engine):
    engine = make_engine(tiny_loaded, max_num_seqs=2)
    release = threading.Event()
    snapshots: list = []

    def first_emit(out):
        if isinstance(out, TokenOutput):
            release.wait(STREAM_TIMEOUT)  # hold the engine thread until every request is queued
            snapshots.append(engine.stats())

    engine.submit(Request([1, 2, 3], max_tokens=10), first_emit)
    queues = []
    for i in range(3):
        outputs: list = []
        queues.append(outputs)
        engine.submit(Request([4 + i, 5, 6], max_tokens=10), outputs.append)
    release.set()
    wait_until(lambda: len(snapshots) == 10 and all(q and q[-1].finish_reason for q in queues))
    during = snapshots[3]  # several steps in: both slots are busy, two requests wait
    assert during.num_running == 2 and during.num_waiting == 2
    assert during.last_batch_size == 2
    assert all(out.finish_reason == "length" for out in (q[-1] for q in queues))
    after = engine.stats()
    assert after.num_running == 0 and after.num_waiting == 0
    assert after.num_generated_tokens == 40


# ---- shutdown -------------------------------------------------------------------------
def test_stop_cancels_requests_in_flight_and_refuses_new_ones(tiny_loaded, make_engine):
    from lmql_backends.errors import RequestCancelledError

    engine = make_engine(tiny_loaded, max_num_seqs=1)
    running = engine.stream_sync(Request([1, 2, 3], max_tokens=1000), timeout=STREAM_TIMEOUT)
    next(running)  # the first request runs; the next ones wait behind it
    queued: list[list] = [[], []]
    for i, outputs in enumerate(queued):
        engine.submit(Request([4 + i, 5], max_tokens=1000), outputs.append)
    engine.stop()
    with pytest.raises(RequestCancelledError):
        list(running)
    for outputs in queued:
        assert isinstance(outputs[-1], ErrorOutput) and isinstance(outputs[-1].error, RequestCancelledError)
    with pytest.raises(RequestCancelledError, match="shutting down"):
        engine.submit(Request([1, 2]), lambda out: None)


def test_re_running_cached_per_token_requests_grows_the_kv_in_place(tiny_loaded, make_engine, monkeypatch):
    engine = make_engine(tiny_loaded)
    prompt = make_prompt(21, seed=5, vocab_size=tiny_loaded.vocab_size)
    run_legacy_client(engine, tiny_loaded.model, prompt, 12)
    copies, copy_past = [], runner.copy_past
    monkeypatch.setattr(runner, "copy_past", lambda *args: copies.append(args[-1]) or copy_past(*args))
    cached = run_legacy_client(engine, tiny_loaded.model, prompt, 12)  # the same 12 rows again
    assert cached == [len(prompt) - 1 + i for i in range(12)]
    assert copies == [len(prompt) - 1]  # the past is copied out of the stored entry once, not per token
