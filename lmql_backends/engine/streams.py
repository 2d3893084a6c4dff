"""How consumers read a request's outputs, the same over the engine thread and the engine process.

`OutputStreams` builds levels two of generation (`stream`, `stream_sync`) and the event-loop
`emitter` on two primitives of its subclass: ``submit(request, emit)`` and ``abort(request_id)``.
"""

from __future__ import annotations

import asyncio
import queue
from typing import AsyncIterator, Callable, Iterator

from .delivery import Mailboxes
from .sequence import ErrorOutput, Output, Request


class OutputStreams:
    """Streams of typed outputs over ``self.submit`` and ``self.abort``."""

    _mailboxes: Mailboxes

    def submit(self, request: Request, emit: Callable[[Output], None]) -> None:
        raise NotImplementedError

    def abort(self, request_id: str) -> None:
        raise NotImplementedError

    async def stream(self, request: Request) -> AsyncIterator[Output]:
        """Level two of generation: the typed outputs of `request`, ending with a finish_reason."""
        outputs: asyncio.Queue = asyncio.Queue()
        self.submit(request, self.emitter(asyncio.get_running_loop(), outputs.put_nowait, request.request_id))
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                finished = yield_check(item)
                yield item
        finally:
            if not finished:
                self.abort(request.request_id)

    def emitter(self, loop: asyncio.AbstractEventLoop, callback: Callable[[Output], None], request_id: str):
        """An `emit` for `submit` that runs ``callback(output)`` on `loop` (one wake-up per step);
        if the loop is gone, the request is aborted."""
        mailbox = self._mailboxes.of(loop)

        def emit(item: Output) -> None:
            try:
                mailbox.post(callback, item)
            except RuntimeError:  # the consumer's loop is gone
                self.abort(request_id)

        return emit

    def stream_sync(self, request: Request, timeout: float | None = None) -> Iterator[Output]:
        """The same outputs as `stream`, for threads without an event loop."""
        outputs: queue.SimpleQueue = queue.SimpleQueue()
        self.submit(request, outputs.put)
        finished = False
        try:
            while not finished:
                item = outputs.get(timeout=timeout)
                finished = yield_check(item)
                yield item
        finally:
            if not finished:
                self.abort(request.request_id)


def yield_check(item: Output) -> bool:
    """Whether `item` ends its stream; raises the error of an ErrorOutput."""
    if isinstance(item, ErrorOutput):
        raise item.error
    return item.finish_reason is not None
