"""Scheduler unit tests: admission limit, prefill budget, decode batching."""

from __future__ import annotations

import pytest

from lmql_backends.engine.scheduler import Scheduler, SchedulerConfig, length_groups
from lmql_backends.engine.sequence import Request, Sequence

pytestmark = pytest.mark.timeout(30)


def make_sequence(num_prompt: int, num_computed: int = 0) -> Sequence:
    seq = Sequence(Request(list(range(1, num_prompt + 1))), emit=lambda output: None)
    seq.num_computed = num_computed
    return seq


def make_scheduler(max_num_seqs=32, max_prefill_tokens=4096) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs, max_prefill_tokens))


def test_admit_respects_max_num_seqs():
    scheduler = make_scheduler(max_num_seqs=2)
    seqs = [make_sequence(3) for _ in range(3)]
    for seq in seqs:
        scheduler.waiting.append(seq)
    assert scheduler.admit() == seqs[:2]
    assert scheduler.running == seqs[:2]
    assert list(scheduler.waiting) == seqs[2:]
    assert scheduler.admit() == []


def test_retire_frees_a_slot_for_the_next_waiting_sequence():
    scheduler = make_scheduler(max_num_seqs=2)
    seqs = [make_sequence(3) for _ in range(3)]
    for seq in seqs:
        scheduler.waiting.append(seq)
    scheduler.admit()
    scheduler.retire(seqs[0])
    assert scheduler.admit() == [seqs[2]]
    assert scheduler.running == [seqs[1], seqs[2]]
    assert list(scheduler.waiting) == []


def test_retire_removes_a_waiting_sequence_too():
    scheduler = make_scheduler(max_num_seqs=1)
    first, second = make_sequence(2), make_sequence(2)
    scheduler.waiting.append(first)
    scheduler.waiting.append(second)
    scheduler.admit()
    scheduler.retire(second)
    assert list(scheduler.waiting) == []
    assert scheduler.running == [first]


def test_plan_batches_every_single_token_sequence_into_one_decode():
    scheduler = make_scheduler()
    decodes = [make_sequence(n, num_computed=n - 1) for n in (3, 7, 12)]
    prefill = make_sequence(5)
    for seq in [decodes[0], prefill, *decodes[1:]]:
        scheduler.waiting.append(seq)
    scheduler.admit()
    plan = scheduler.plan()
    assert plan.decodes == decodes
    assert plan.prefills == [prefill]


def test_plan_skips_sequences_with_nothing_to_compute():
    scheduler = make_scheduler()
    done = make_sequence(4, num_computed=4)
    scheduler.waiting.append(done)
    scheduler.admit()
    plan = scheduler.plan()
    assert plan.prefills == [] and plan.decodes == []


def test_prefill_budget_limits_the_tokens_prefilled_in_one_step():
    scheduler = make_scheduler(max_prefill_tokens=10)
    seqs = [make_sequence(n) for n in (6, 6, 3, 2)]
    for seq in seqs:
        scheduler.waiting.append(seq)
    scheduler.admit()
    plan = scheduler.plan()
    assert plan.prefills == [seqs[0], seqs[2]]  # 6 + 3 <= 10; the second 6 waits; then 2 does not fit
    assert sum(seq.num_new for seq in plan.prefills) <= 10


def test_first_prefill_runs_even_over_budget():
    scheduler = make_scheduler(max_prefill_tokens=4)
    big, small = make_sequence(9), make_sequence(3)
    scheduler.waiting.append(big)
    scheduler.waiting.append(small)
    scheduler.admit()
    assert scheduler.plan().prefills == [big]


def test_skipped_prefill_runs_in_a_later_step():
    scheduler = make_scheduler(max_prefill_tokens=8)
    first, second = make_sequence(6), make_sequence(6)
    scheduler.waiting.append(first)
    scheduler.waiting.append(second)
    scheduler.admit()
    assert scheduler.plan().prefills == [first]
    first.num_computed = 6
    first.ids.append(1)  # first now decodes one token per step
    plan = scheduler.plan()
    assert plan.prefills == [second] and plan.decodes == [first]


def test_find_by_request_id():
    scheduler = make_scheduler(max_num_seqs=1)
    running, waiting = make_sequence(2), make_sequence(2)
    scheduler.waiting.append(running)
    scheduler.waiting.append(waiting)
    scheduler.admit()
    assert scheduler.find(running.request.request_id) is running
    assert scheduler.find(waiting.request.request_id) is waiting
    assert scheduler.find("no-such-request") is None
    assert scheduler.has_work


def test_length_groups_batch_similar_prompts_longest_first():
    assert length_groups([16, 16, 16]) == [[0, 1, 2]]
    assert length_groups([10, 100, 60, 40, 5]) == [[1, 2], [3], [0, 4]]
    assert length_groups([]) == []
    groups = length_groups([7, 3, 12, 6, 1, 2, 9])
    assert sorted(i for g in groups for i in g) == list(range(7))  # every prompt once
    lengths = [7, 3, 12, 6, 1, 2, 9]
    assert all(lengths[i] * 2 >= lengths[g[0]] for g in groups for i in g)  # at most half padding
