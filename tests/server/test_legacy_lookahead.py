"""The legacy API's lookahead: the likeliest next forward is computed while the client chooses."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import requests
import torch

from lmql_backends.engine import EngineConfig
from lmql_backends.errors import RequestCancelledError
from lmql_backends.server.legacy.lookahead import Lookahead

from test_legacy_api import assert_close, forward_once, prompt_ids, reference_logits

pytestmark = pytest.mark.timeout(120)


def lookahead_counts(server) -> dict[str, float]:
    """The lmql_backends_legacy_lookahead_* gauges of /metrics."""
    text = requests.get(f"http://{server.endpoint}/metrics", timeout=30).text
    pairs = (line.split() for line in text.splitlines() if line.startswith("lmql_backends_legacy_lookahead_"))
    return {name.removeprefix("lmql_backends_legacy_lookahead_"): float(value) for name, value in pairs}


def greedy_logits(server, ids: list[int], num_tokens: int) -> list[torch.Tensor]:
    """The logits of a greedy legacy client (one forward per token, the whole sequence each time)."""
    rows = []
    for _ in range(num_tokens):
        logits = torch.tensor(forward_once(server, [ids])[0])
        rows.append(logits)
        ids = ids + [int(logits.argmax())]
    return rows


@pytest.fixture(scope="module")
def server_without_lookahead(tiny_model):
    from lmql_backends.server.app import serve

    handle = serve(tiny_model, port=0, legacy=True, background=True, legacy_lookahead=False)
    yield handle
    handle.stop()


def test_a_greedy_client_is_answered_from_lookaheads_with_the_same_logits(legacy_server, server_without_lookahead):
    ids = prompt_ids(legacy_server, "Elizabeth looked at her sister and")
    before = lookahead_counts(legacy_server)
    with_lookahead = greedy_logits(legacy_server, ids, 6)
    after = lookahead_counts(legacy_server)
    without = greedy_logits(server_without_lookahead, ids, 6)
    for got, expected in zip(with_lookahead, without):
        assert torch.allclose(got, expected, atol=1e-5)
        assert int(got.argmax()) == int(expected.argmax())
    assert after["hits"] - before["hits"] == 5  # every forward after the first was computed ahead
    assert after["started"] - before["started"] >= 5
    assert lookahead_counts(server_without_lookahead) == {}


def test_a_client_choosing_another_token_misses_and_gets_its_own_logits(legacy_server):
    ids = prompt_ids(legacy_server, "Mr. Collins bowed and")
    logits = torch.tensor(forward_once(legacy_server, [ids])[0])
    other = int(torch.topk(logits, 2).indices[1])  # not the argmax the server looked ahead with
    before = lookahead_counts(legacy_server)
    assert_close(forward_once(legacy_server, [ids + [other]])[0], reference_logits(legacy_server, ids + [other]))
    after = lookahead_counts(legacy_server)
    assert after["misses"] - before["misses"] == 1 and after["hits"] == before["hits"]


# ---- the Lookahead on its own (a stand-in engine: only its load is read) --------------------------


@dataclasses.dataclass
class EngineLoad:
    num_pending: int = 0
    config: EngineConfig = EngineConfig(max_num_seqs=8)


def peaked_logits(token: int, vocab_size: int = 10) -> torch.Tensor:
    logits = torch.zeros(vocab_size)
    logits[token] = 5.0
    return logits


async def forward_of(ids: list[int]) -> torch.Tensor:
    await asyncio.sleep(0)
    return torch.tensor([float(len(ids))])


async def test_take_returns_the_lookahead_of_exactly_that_row_once():
    lookahead = Lookahead(EngineLoad(), context_length=100, eos_token_id=9)
    lookahead.start_after("a", (1, 2), peaked_logits(3), forward_of)
    assert lookahead.take("b", (1, 2, 4)) is None
    task = lookahead.take("b", (1, 2, 3))
    assert await task == torch.tensor([3.0])
    assert lookahead.take("b", (1, 2, 3)) is None
    assert lookahead.stats() == type(lookahead.stats())(1, 1, 2)


@pytest.mark.parametrize("case", ["busy engine", "eos", "context full"])
async def test_no_lookahead_when_busy_at_eos_or_at_the_context_limit(case):
    engine = EngineLoad(num_pending=4 if case == "busy engine" else 3)
    lookahead = Lookahead(engine, context_length=3 if case == "context full" else 100, eos_token_id=9)
    lookahead.start_after("a", (1, 2, 3), peaked_logits(9 if case == "eos" else 5), forward_of)
    assert lookahead.entries == {} and lookahead.num_started == 0


async def test_a_forward_refused_when_started_leaves_no_lookahead_and_no_error():
    def refused(ids: list[int]):  # a forward that submits at once, to an engine that is stopping
        raise RequestCancelledError("the engine is shutting down")

    lookahead = Lookahead(EngineLoad(), context_length=100, eos_token_id=None)
    lookahead.start_after("a", (1, 2), peaked_logits(3), refused)
    assert lookahead.entries == {} and lookahead.num_started == 0
    assert lookahead.take("a", (1, 2, 3)) is None


async def test_the_oldest_lookahead_is_cancelled_when_over_the_limit():
    lookahead = Lookahead(EngineLoad(), context_length=100, eos_token_id=None, max_entries=2)
    lookahead.start_after("a", (1,), peaked_logits(0), forward_of)
    oldest = lookahead.entries[(1, 0)]
    for first in (2, 3):
        lookahead.start_after("a", (first,), peaked_logits(0), forward_of)
    assert list(lookahead.entries) == [(2, 0), (3, 0)]
    await asyncio.gather(oldest, return_exceptions=True)
    assert oldest.cancelled()
    await lookahead.close()
    assert lookahead.entries == {}


async def test_a_client_that_rarely_takes_the_argmax_stops_getting_lookaheads():
    lookahead = Lookahead(EngineLoad(), context_length=100, eos_token_id=None)
    row = (1,)
    for step in range(6):
        lookahead.start_after("picky", row, peaked_logits(3), forward_of)
        wasted = lookahead.entries.get((*row, 3))
        row = (*row, 4)  # never the argmax 3
        assert lookahead.take("picky", row) is None
        if wasted is not None:  # the lookahead nobody will ask for is aborted at once
            await asyncio.gather(wasted, return_exceptions=True)
            assert wasted.cancelled() and lookahead.entries == {}
    assert lookahead.num_started == 3  # scores 1 -> 0.75 -> 0.56 -> 0.42: no more after the third miss
    lookahead.start_after("greedy", (5,), peaked_logits(3), forward_of)
    assert (5, 3) in lookahead.entries  # other clients are not affected


async def test_a_client_that_takes_the_argmax_keeps_getting_lookaheads():
    lookahead = Lookahead(EngineLoad(), context_length=100, eos_token_id=None)
    row = (1,)
    for step in range(6):
        lookahead.start_after("greedy", row, peaked_logits(3), forward_of)
        row = (*row, 3)
        assert await lookahead.take("greedy", row) == torch.tensor([float(len(row))])
    assert lookahead.num_started == lookahead.num_hits == 6
