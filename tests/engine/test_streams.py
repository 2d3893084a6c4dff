"""OutputStreams (engine/streams.py) over a hand-made engine that emits scripted outputs."""

from __future__ import annotations

import asyncio
import threading

import pytest

from lmql_backends.engine.delivery import Mailboxes
from lmql_backends.engine.sequence import ErrorOutput, PromptOutput, Request, TokenOutput
from lmql_backends.engine.streams import OutputStreams, yield_check
from lmql_backends.errors import EngineError

pytestmark = pytest.mark.timeout(30)

SCRIPT = [PromptOutput(2, 0), TokenOutput(5, -0.1), TokenOutput(6, -0.2, finish_reason="length")]


class ScriptedEngine(OutputStreams):
    """Emits `script` from another thread for every request; records aborts."""

    def __init__(self, script):
        self._mailboxes = Mailboxes()
        self.script = script
        self.aborted: list[str] = []

    def submit(self, request: Request, emit) -> None:
        threading.Thread(target=lambda: [emit(out) for out in self.script]).start()

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def test_yield_check_ends_on_a_finish_reason_and_raises_errors():
    assert not yield_check(TokenOutput(1, 0.0)) and yield_check(TokenOutput(1, 0.0, finish_reason="stop"))
    with pytest.raises(EngineError, match="broke"):
        yield_check(ErrorOutput(EngineError("broke")))


async def test_stream_yields_every_output_up_to_the_finish_and_aborts_nothing():
    engine = ScriptedEngine(SCRIPT)
    request = Request([1, 2], max_tokens=2)
    assert [out async for out in engine.stream(request)] == SCRIPT
    assert engine.aborted == []


async def test_a_consumer_that_stops_early_aborts_its_request():
    engine = ScriptedEngine(SCRIPT)
    request = Request([1, 2], max_tokens=2)
    stream = engine.stream(request)
    assert await anext(stream) == SCRIPT[0]
    await stream.aclose()
    assert engine.aborted == [request.request_id]


async def test_an_error_output_is_raised_to_the_consumer():
    engine = ScriptedEngine([PromptOutput(2, 0), ErrorOutput(EngineError("the step failed"))])
    with pytest.raises(EngineError, match="the step failed"):
        [out async for out in engine.stream(Request([1, 2], max_tokens=2))]


def test_stream_sync_gives_the_same_outputs_without_an_event_loop():
    engine = ScriptedEngine(SCRIPT)
    assert list(engine.stream_sync(Request([1, 2], max_tokens=2), timeout=10)) == SCRIPT


def test_an_emitter_whose_loop_is_gone_aborts_the_request():
    engine = ScriptedEngine(SCRIPT)
    loop = asyncio.new_event_loop()
    emit = engine.emitter(loop, lambda out: None, "req-gone")
    loop.close()
    emit(SCRIPT[0])
    assert engine.aborted == ["req-gone"]
