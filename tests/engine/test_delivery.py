"""LoopMailbox: outputs posted from another thread run in order on the loop, one wake-up per batch."""

from __future__ import annotations

import asyncio
import threading

import pytest

from lmql_backends.engine.delivery import LoopMailbox, Mailboxes


async def test_items_posted_from_another_thread_arrive_in_order_with_one_wakeup_per_batch():
    loop = asyncio.get_running_loop()
    mailbox = LoopMailbox(loop)
    received: list[int] = []
    wakeups = []
    original = loop.call_soon_threadsafe

    def counting(callback, *args):
        wakeups.append(callback)
        return original(callback, *args)

    loop.call_soon_threadsafe = counting
    try:
        thread = threading.Thread(target=lambda: [mailbox.post(received.append, i) for i in range(100)])
        thread.start()
        thread.join()  # the loop is not running meanwhile: every post lands in one batch
        await asyncio.sleep(0)
    finally:
        del loop.call_soon_threadsafe
    assert received == list(range(100))
    assert len(wakeups) == 1
    mailbox.post(received.append, 100)  # after a flush, the next post wakes the loop again
    await asyncio.sleep(0)
    assert received[-1] == 100


def test_posting_to_a_closed_loop_raises_every_time():
    loop = asyncio.new_event_loop()
    mailbox = LoopMailbox(loop)
    loop.close()
    for _ in range(2):  # the first failure must not make later posts silently queue up
        with pytest.raises(RuntimeError):
            mailbox.post(print, "lost")


def test_one_mailbox_per_loop():
    mailboxes = Mailboxes()
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        assert mailboxes.of(first) is mailboxes.of(first)
        assert mailboxes.of(first) is not mailboxes.of(second)
    finally:
        first.close()
        second.close()
