"""Kernel choice of the native forward's linear layers: buckets, timing-driven choice, forced modes."""

from __future__ import annotations

import pytest
import torch

from lmql_backends.engine import Engine, EngineConfig
from lmql_backends.engine.linear_kernels import (
    AUTO_KERNELS, MIN_SPEEDUP, NUM_TRIALS, Linear, blas_linear, bucket_of, choose_kernels, num_buckets, onednn_linear,
    onednn_packed_linear, onednn_unavailable_reason,
)
from lmql_backends.errors import InvalidRequestError
from lmql_backends.loader import load_model

HAS_ONEDNN = onednn_unavailable_reason(torch.zeros(1)) is None


def make_linear(num_in: int = 6, num_out: int = 5, bias: bool = True, seed: int = 0) -> Linear:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_in, num_out, generator=generator)
    return Linear(weight, torch.randn(num_out, generator=generator) if bias else None)


class FakeTimer:
    """Seconds per kernel: BLAS 1.0, oneDNN by a rule on the row count, the packed oneDNN kernel by
    its own rule (default: never faster than plain oneDNN); records what was timed."""

    def __init__(self, onednn_seconds, packed_seconds=None):
        self.onednn_seconds, self.packed_seconds = onednn_seconds, packed_seconds or onednn_seconds
        self.calls: list[tuple[str, tuple, int]] = []

    def __call__(self, kernel, layers: list[Linear], num_rows: int) -> float:
        self.calls.append((kernel.__name__, tuple(layers[0].weight.shape), num_rows))
        if kernel is blas_linear:
            return 1.0
        return (self.onednn_seconds if kernel is onednn_linear else self.packed_seconds)(num_rows)


def kernel_names(linear: Linear) -> list[str]:
    return [kernel.__name__ for kernel in linear.kernels]


@pytest.mark.parametrize("num_rows, bucket", [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (8, 3), (9, 4), (32, 5)])
def test_row_counts_fall_in_power_of_two_buckets(num_rows, bucket):
    assert bucket_of(num_rows) == bucket


def test_buckets_cover_every_row_count_up_to_the_maximum():
    assert [num_buckets(n) for n in (1, 2, 3, 8, 32, 33)] == [1, 2, 3, 4, 6, 7]


@pytest.mark.skipif(not HAS_ONEDNN, reason="this torch build has no oneDNN linear")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("num_rows", [1, 3, 8])
def test_every_kernel_computes_the_same_product(bias, num_rows):
    linear = make_linear(bias=bias)
    linear.pack(8)
    rows = torch.randn(num_rows, 6, generator=torch.Generator().manual_seed(1))
    expected = rows @ linear.weight + (linear.bias if bias else 0)
    for kernel in AUTO_KERNELS:
        assert torch.allclose(kernel(rows, linear), expected, atol=1e-5), kernel.__name__


@pytest.mark.skipif(not HAS_ONEDNN, reason="this torch build has no oneDNN linear")
def test_onednn_takes_a_transposed_view_without_copying_it():
    table = torch.randn(7, 4)  # an LM head: [vocab, width], multiplied as its transpose
    linear = Linear(table.t())
    rows = torch.randn(3, 4)
    assert torch.allclose(onednn_linear(rows, linear), rows @ table.t(), atol=1e-5)
    assert linear.weight.data_ptr() == table.data_ptr()


@pytest.mark.skipif(not HAS_ONEDNN, reason="this torch build has no oneDNN linear")
def test_a_packed_weight_serves_every_row_count_and_counts_its_bytes():
    linear = make_linear(num_in=64, num_out=48)
    assert linear.packed_bytes == 0
    linear.pack(16)
    assert linear.packed_bytes == 64 * 48 * 4
    for num_rows in (1, 3, 16, 40):  # packed for about 16 rows, correct for any
        rows = torch.randn(num_rows, 64)
        assert torch.allclose(onednn_packed_linear(rows, linear), rows @ linear.weight + linear.bias, atol=1e-4)


def test_auto_picks_onednn_only_where_it_is_faster_by_the_margin():
    timer = FakeTimer(lambda rows: 0.5 if rows >= 4 else 1 / MIN_SPEEDUP * 1.01)  # just short of the margin below 4
    linear = make_linear()
    choose_kernels([linear], "auto", max_rows=16, time_kernel=timer)
    assert kernel_names(linear) == ["blas_linear", "blas_linear", "onednn_linear", "onednn_linear", "onednn_linear"]
    assert linear.fallback is blas_linear  # prefills, beyond the buckets


def test_layers_of_one_shape_are_timed_together_and_share_the_choice():
    timer = FakeTimer(lambda rows: 0.5)
    passes = []

    def recording_timer(kernel, layers, num_rows):
        passes.append(list(layers))
        return timer(kernel, layers, num_rows)

    same, also_same, other = make_linear(seed=1), make_linear(seed=2), make_linear(num_in=5, num_out=6)
    choices = choose_kernels([same, also_same, other], "auto", max_rows=4, time_kernel=recording_timer)
    assert len(choices) == 2
    assert all(layers in ([same, also_same], [other]) for layers in passes)  # a pass goes through every layer of a shape
    timed_rows = sorted(rows for name, shape, rows in timer.calls if shape == (6, 5))
    assert timed_rows == sorted([1, 2, 4] * len(AUTO_KERNELS) * NUM_TRIALS)  # each kernel NUM_TRIALS times per bucket
    assert kernel_names(same) == kernel_names(also_same) == ["onednn_linear"] * 3


@pytest.mark.skipif(not HAS_ONEDNN, reason="this torch build has no oneDNN linear")
def test_the_packed_copy_is_taken_only_where_it_beats_plain_onednn_by_the_margin():
    linear = make_linear()
    timer = FakeTimer(lambda rows: 0.5, lambda rows: 0.2 if rows >= 2 else 0.5 / MIN_SPEEDUP * 1.01)
    choose_kernels([linear], "auto", max_rows=4, time_kernel=timer)
    assert kernel_names(linear) == ["onednn_linear", "onednn_packed_linear", "onednn_packed_linear"]
    assert linear.packed is not None and linear.packed_bytes == linear.weight.numel() * 4

    choose_kernels([linear], "auto", max_rows=4, time_kernel=FakeTimer(lambda rows: 0.5))
    assert kernel_names(linear) == ["onednn_linear"] * 3
    assert linear.packed is None  # a layer that does not use its packed copy does not keep it


def test_the_kernels_alternate_and_the_fastest_run_of_each_counts():
    runs = iter([5.0, 0.2, 9.0] + [0.9, 9.0, 9.0] * (NUM_TRIALS - 1))  # blas, onednn, packed, blas, ...
    order = []

    def timer(kernel, layers, num_rows):
        order.append(kernel.__name__)
        return next(runs)

    linear = make_linear()
    choose_kernels([linear], "auto", max_rows=1, time_kernel=timer)
    assert order == ["blas_linear", "onednn_linear", "onednn_packed_linear"] * NUM_TRIALS
    assert kernel_names(linear) == ["onednn_linear"]  # 0.2 * MIN_SPEEDUP <= 0.9


def test_each_row_count_runs_the_kernel_of_its_bucket():
    used = []

    def recording(name):
        def kernel(rows, linear):
            used.append((name, rows.shape[0]))
            return blas_linear(rows, linear)
        return kernel

    linear = make_linear()
    linear.kernels, linear.fallback = (recording("one"), recording("two"), recording("up to four")), recording("more")
    for batch in (1, 2, 3, 4, 7):
        x = torch.randn(batch, 6)  # [rows, width], as the forward calls it
        assert linear(x).shape == (batch, 5)
    assert used == [("one", 1), ("two", 2), ("up to four", 3), ("up to four", 4), ("more", 7)]


def test_forced_modes_set_one_kernel_for_every_row_count():
    linear = make_linear()
    choose_kernels([linear], "blas", max_rows=8, time_kernel=FakeTimer(lambda rows: 0.0))
    assert (linear.kernels, linear.fallback) == ((), blas_linear)
    if HAS_ONEDNN:
        choose_kernels([linear], "onednn", max_rows=8)
        assert (linear.kernels, linear.fallback) == ((), onednn_linear)


def test_forcing_onednn_on_weights_it_does_not_take_names_the_reason():
    linear = Linear(torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(InvalidRequestError, match="matmul 'onednn' cannot run this model: .*torch.float64"):
        choose_kernels([linear], "onednn", max_rows=8)
    choose_kernels([linear], "auto", max_rows=8, time_kernel=FakeTimer(lambda rows: 0.0))
    assert (linear.kernels, linear.fallback) == ((), blas_linear)  # auto never picks what cannot run


@pytest.mark.parametrize("bad", ["fast", "", None])
def test_an_unknown_matmul_is_refused_naming_the_value(bad):
    with pytest.raises(InvalidRequestError, match=f"matmul must be one of auto, blas, onednn, got {bad!r}"):
        EngineConfig(matmul=bad)


def test_onednn_needs_the_native_forward(tiny_model):
    with pytest.raises(InvalidRequestError, match="matmul 'onednn' applies to the native GPT-2 forward only"):
        Engine(load_model(tiny_model), EngineConfig(model_impl="transformers", matmul="onednn"))
    engine = Engine(load_model(tiny_model), EngineConfig(model_impl="transformers", matmul="blas"))
    assert engine.stats().num_onednn_linears == 0


def test_an_auto_engine_times_its_kernels_before_it_is_ready(tiny_model):
    engine = Engine(load_model(tiny_model), EngineConfig(matmul="auto")).start()
    try:
        assert engine.wait_ready(timeout=60)
        linears = engine.runner.forward.linears
        max_rows = engine.config.max_num_seqs
        assert all(len(linear.kernels) == num_buckets(max_rows) for linear in linears)
        assert all(set(linear.kernels) <= set(AUTO_KERNELS) for linear in linears)
        uses_onednn = [bool({onednn_linear, onednn_packed_linear} & set(linear.kernels)) for linear in linears]
        assert engine.stats().num_onednn_linears == sum(uses_onednn)
        assert engine.stats().packed_weight_bytes == sum(linear.packed_bytes for linear in linears)
    finally:
        engine.stop()
