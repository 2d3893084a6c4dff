"""Sampler unit tests on hand-made tensors: greedy, top-p, inverse-CDF draws, seeds, masks."""

from __future__ import annotations

import math

import pytest
import torch

from lmql_backends.engine.sampling import apply_processors, choose_greedy_rows, make_bias_processor
from lmql_backends.sampling import (
    SamplingParams, draw_token, make_mask_processor, pad_mask, seeded_uniform, select_token, token_logprobs,
    top_logprobs, top_p_filter,
)
from lmql_backends.errors import ConstraintError, InvalidRequestError

pytestmark = pytest.mark.timeout(30)

NEG_INF = float("-inf")


def logprobs_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([math.log(p) if p > 0 else NEG_INF for p in probs], dtype=torch.float32)


def kept(logprobs: torch.Tensor) -> set[int]:
    return {int(i) for i in torch.nonzero(logprobs > NEG_INF).flatten()}


# ---- greedy ---------------------------------------------------------------------------
def test_greedy_picks_the_argmax_and_returns_raw_logprobs():
    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    token, logprobs = select_token(logits, SamplingParams(), position=7)
    assert token == 1
    assert torch.allclose(logprobs, torch.log_softmax(logits, dim=-1))


def test_greedy_ignores_top_p_and_seed():
    logits = torch.tensor([0.1, 0.2, 5.0, 0.3])
    token, _ = select_token(logits, SamplingParams(top_p=0.1, seed=99), position=3)
    assert token == 2


def test_greedy_never_picks_a_masked_token():
    logits = torch.tensor([9.0, 1.0, 2.0])
    masked = make_mask_processor(torch.tensor([False, True, True]))((), logits)
    token, logprobs = select_token(masked, SamplingParams(), position=0)
    assert token == 2
    assert logprobs[0] == NEG_INF
    assert math.isclose(float(logprobs.exp().sum()), 1.0, rel_tol=1e-6)


# ---- top-p ----------------------------------------------------------------------------
@pytest.mark.parametrize("top_p, expected", [(0.45, {0}), (0.7, {0, 1}), (0.9, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_most_likely_set(top_p, expected):
    # token 2 is the most likely, then 0, then 3, then 1: sorted masses 0.5, 0.3, 0.15, 0.05
    probs = {2: 0.5, 0: 0.3, 3: 0.15, 1: 0.05}
    logprobs = logprobs_of([probs[i] for i in range(4)])
    by_rank = [2, 0, 3, 1]
    filtered = top_p_filter(logprobs, top_p)
    assert kept(filtered) == {by_rank[i] for i in expected}
    assert math.isclose(float(filtered.exp().sum()), 1.0, rel_tol=1e-6)


def test_top_p_renormalises_the_kept_tokens():
    filtered = top_p_filter(logprobs_of([0.6, 0.3, 0.1]), 0.8)
    assert torch.allclose(filtered.exp(), torch.tensor([2 / 3, 1 / 3, 0.0]), atol=1e-6)


def test_top_p_never_revives_masked_tokens():
    filtered = top_p_filter(logprobs_of([0.0, 0.7, 0.0, 0.3]), 0.99)
    assert kept(filtered) == {1, 3}


# ---- inverse-CDF draws ----------------------------------------------------------------
@pytest.mark.parametrize("u, expected", [(0.0, 0), (0.05, 0), (0.15, 1), (0.35, 2), (0.65, 3), (0.999999, 3)])
def test_draw_token_is_the_inverse_cdf_in_token_id_order(u, expected):
    assert draw_token(logprobs_of([0.1, 0.2, 0.3, 0.4]), u) == expected


def test_draw_token_at_u_zero_skips_leading_masked_tokens():
    assert draw_token(logprobs_of([0.0, 0.0, 0.5, 0.5]), 0.0) == 2


def test_draw_token_near_one_never_returns_a_trailing_masked_token():
    logprobs = logprobs_of([0.25, 0.75, 0.0, 0.0])
    assert draw_token(logprobs, 1.0 - 2.0 ** -53) == 1
    assert draw_token(logprobs, 1.0) == 1  # rounding at the top end falls back to the last allowed token


def test_draw_token_never_draws_masked_tokens():
    logprobs = logprobs_of([0.0, 0.2, 0.0, 0.3, 0.0, 0.5, 0.0])
    drawn = {draw_token(logprobs, i / 1000) for i in range(1000)}
    assert drawn == {1, 3, 5}


def test_draw_token_frequencies_follow_the_probabilities():
    logprobs = logprobs_of([0.1, 0.2, 0.7])
    counts = [0, 0, 0]
    for i in range(1000):
        counts[draw_token(logprobs, (i + 0.5) / 1000)] += 1
    assert counts == [100, 200, 700]


# ---- seeds ----------------------------------------------------------------------------
def test_seeded_uniform_is_in_unit_interval_and_deterministic():
    values = [seeded_uniform(seed, position) for seed in range(20) for position in range(200)]
    assert all(0.0 <= v < 1.0 for v in values)
    assert values == [seeded_uniform(seed, position) for seed in range(20) for position in range(200)]


def test_seeded_uniform_depends_on_seed_and_position():
    assert seeded_uniform(1, 5) != seeded_uniform(2, 5)
    assert seeded_uniform(1, 5) != seeded_uniform(1, 6)
    assert len({seeded_uniform(3, p) for p in range(1000)}) == 1000


def test_seeded_uniform_is_roughly_uniform():
    values = [seeded_uniform(11, p) for p in range(20000)]
    assert abs(sum(values) / len(values) - 0.5) < 0.01
    deciles = [0] * 10
    for v in values:
        deciles[int(v * 10)] += 1
    assert all(1800 < n < 2200 for n in deciles)


def test_seeded_uniform_handles_large_and_negative_seeds():
    assert 0.0 <= seeded_uniform(2**70 + 3, 10) < 1.0
    assert 0.0 <= seeded_uniform(-5, 10) < 1.0


def test_sampling_draws_with_the_uniform_of_the_absolute_position():
    logits = torch.tensor([1.0, 0.5, 2.0, -1.0, 0.0])
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=1234)
    for position in range(30):
        token, logprobs = select_token(logits, params, position)
        expected_lp = top_p_filter(torch.log_softmax(logits / 0.7, dim=-1), 0.9)
        assert torch.allclose(logprobs, expected_lp)
        assert token == draw_token(expected_lp, seeded_uniform(1234, position))
        assert select_token(logits, params, position)[0] == token


def test_different_seeds_give_different_samples():
    logits = torch.zeros(50)
    draws = {seed: [select_token(logits, SamplingParams(1.0, seed=seed), p)[0] for p in range(20)] for seed in (1, 2)}
    assert draws[1] != draws[2]


def test_temperature_sharpens_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0])
    _, hot = select_token(logits, SamplingParams(temperature=2.0, seed=0), 0)
    _, cold = select_token(logits, SamplingParams(temperature=0.5, seed=0), 0)
    assert cold[0] > hot[0]
    assert torch.allclose(cold, torch.log_softmax(logits / 0.5, dim=-1))


# ---- processors and masks -------------------------------------------------------------
def test_pad_mask_pads_with_disallowed_and_truncates():
    mask = torch.tensor([True, False, True])
    assert pad_mask(mask, 3) is mask
    assert pad_mask(mask, 5).tolist() == [True, False, True, False, False]
    assert pad_mask(mask, 2).tolist() == [True, False]


def test_mask_processor_disallows_padding_rows_of_the_logits():
    process = make_mask_processor(torch.tensor([True, True, False]))
    out = process((), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert out.tolist() == [1.0, 2.0, NEG_INF, NEG_INF, NEG_INF]


def test_bias_processor_adds_logit_bias():
    process = make_bias_processor({0: -100.0, 2: 5.0})
    out = process((), torch.tensor([1.0, 1.0, 1.0]))
    assert out.tolist() == [-99.0, 1.0, 6.0]


def test_processors_apply_in_order():
    mask = make_mask_processor(torch.tensor([True, True, False]))
    bias = make_bias_processor({2: 100.0, 1: 3.0})
    out = apply_processors((mask, bias), [1, 2], torch.tensor([0.0, 0.0, 0.0]))
    assert out.tolist() == [0.0, 3.0, NEG_INF]
    token, _ = select_token(out, SamplingParams(), 2)
    assert token == 1


def test_all_masked_raises_constraint_error():
    masked = make_mask_processor(torch.zeros(4, dtype=torch.bool))((), torch.zeros(4))
    with pytest.raises(ConstraintError, match="no token is allowed"):
        token_logprobs(masked, SamplingParams())


def test_top_logprobs_most_likely_first():
    logprobs = logprobs_of([0.1, 0.6, 0.0, 0.3])
    top = top_logprobs(logprobs, 3)
    assert [t for t, _ in top] == [1, 3, 0]
    assert math.isclose(top[0][1], math.log(0.6), rel_tol=1e-6)
    assert top_logprobs(logprobs, 0) == ()
    assert len(top_logprobs(logprobs, 10)) == 4


@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": -0.5}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
])
def test_bad_sampling_params_raise_typed_errors(kwargs, param):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param
    assert str(kwargs[param]) in str(info.value)


def test_greedy_rows_chosen_together_equal_select_token_row_by_row():
    inf = float("inf")
    logits = torch.tensor([
        [0.5, 2.0, 2.0, -1.0],  # a tie: the first maximum wins
        [-inf, -inf, 3.0, -inf],  # masked
        [1.0, 0.0, -2.0, 0.9],
    ])
    for row, choice in zip(logits, choose_greedy_rows(logits)):
        token, logprobs = select_token(row, SamplingParams(), 0)
        assert (choice.token_id, choice.logprob) == (token, float(logprobs[token]))
        assert torch.equal(choice.logprobs, logprobs)
    assert [c.token_id for c in choose_greedy_rows(logits)] == [1, 2, 0]


def test_greedy_rows_with_no_allowed_token_or_a_nan_are_left_to_select_token():
    inf = float("inf")
    logits = torch.tensor([[-inf, -inf], [float("nan"), 1.0], [0.0, 1.0]])
    choices = choose_greedy_rows(logits)
    assert choices[0] is None and choices[1] is None and choices[2].token_id == 1
    with pytest.raises(ConstraintError):
        select_token(logits[0], SamplingParams(), 0)
