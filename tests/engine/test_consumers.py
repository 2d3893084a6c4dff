"""`Consumers`: the emit table and capacity count shared by the process and upstream engines."""

from __future__ import annotations

import pytest

from lmql_backends.engine import EngineConfig
from lmql_backends.engine.consumers import Consumers
from lmql_backends.engine.sequence import ErrorOutput, TokenOutput
from lmql_backends.errors import OverloadedError, RequestCancelledError

CONFIG = EngineConfig(max_num_seqs=1, max_queue=1)


def filled(*request_ids: str) -> tuple[Consumers, dict[str, list]]:
    consumers, received = Consumers(), {}
    for request_id in request_ids:
        received[request_id] = []
        with consumers.lock:
            consumers.add_locked(request_id, received[request_id].append, CONFIG)
    return consumers, received


def test_requests_beyond_the_capacity_are_refused_and_a_forgotten_one_frees_its_slot():
    consumers, _ = filled("a", "b")
    with consumers.lock, pytest.raises(OverloadedError):
        consumers.add_locked("c", print, CONFIG)
    assert consumers.forget("a") and not consumers.forget("a")
    assert consumers.num_pending == 1 and "a" not in consumers and "b" in consumers


def test_outputs_reach_their_consumer_until_the_last_and_none_after_it():
    consumers, received = filled("a")
    consumers.deliver("a", TokenOutput(1, -0.5), abort=pytest.fail)
    consumers.deliver("a", TokenOutput(2, -0.5, finish_reason="length"), abort=pytest.fail)
    consumers.deliver("a", TokenOutput(3, -0.5), abort=pytest.fail)
    assert [out.token_id for out in received["a"]] == [1, 2]
    assert consumers.num_pending == 0 and len(consumers) == 0


def test_a_consumer_that_raises_is_aborted_and_the_others_still_receive():
    consumers, received = filled("good")
    aborted = []

    def broken(output):
        raise ValueError("a broken consumer")

    with consumers.lock:
        consumers.add_locked("bad", broken, CONFIG)
    consumers.deliver("bad", TokenOutput(1, -0.1), abort=aborted.append)
    consumers.deliver("good", TokenOutput(1, -0.1), abort=aborted.append)
    assert aborted == ["bad"] and len(received["good"]) == 1


def test_failing_all_hands_each_the_error_once_and_empties_the_table():
    consumers, received = filled("a", "b")
    error = RequestCancelledError("the engine stopped")
    consumers.fail_all(error)
    consumers.fail_all(error)
    assert all(len(outs) == 1 and isinstance(outs[0], ErrorOutput) for outs in received.values())
    assert consumers.num_pending == 0 and len(consumers) == 0
