"""The batcher (shared/batching.py), alone: calls of one loop turn go out together, in order, and a call taken back
before its batch went out is not sent at all."""

from __future__ import annotations

import asyncio
from typing import Any

from inferq.shared.batching import WITHDRAWN, Batcher


class Recorder(Batcher[str]):
    def __init__(self) -> None:
        super().__init__("recorder")
        self.batches: list[list[str]] = []

    async def send(self, items: list[str]) -> list[Any]:
        self.batches.append(items)
        return [item.upper() for item in items]


async def test_a_call_taken_back_before_its_batch_went_out_is_not_sent() -> None:
    batcher = Recorder()
    batcher.start()
    try:
        a, kept = batcher.submit_withdrawable("a"), batcher.submit("b")
        c = batcher.submit_withdrawable("c")
        assert batcher.withdraw(a) and not batcher.withdraw(a)  # once only
        assert await kept == "B" and a[0].result() is WITHDRAWN
        assert batcher.batches == [["b", "c"]] and await c[0] == "C"
        assert not batcher.withdraw(c)  # sent already: too late to take back
        late = batcher.submit_withdrawable("d")
        await asyncio.sleep(0)  # the batcher wakes and takes the batch; the send has not answered yet
        await asyncio.sleep(0)
        assert not batcher.withdraw(late) and await late[0] == "D"
        alone = batcher.submit_withdrawable("e")
        assert batcher.withdraw(alone)
        assert await batcher.submit("f") == "F"
        assert batcher.batches == [["b", "c"], ["d"], ["f"]]  # a batch of nothing but withdrawn calls sent nothing
    finally:
        await batcher.stop()


async def test_a_call_whose_waiter_was_cancelled_is_still_sent() -> None:
    """A request task cancelled (a shutdown) while it waits on its final write: the write still goes out."""
    batcher = Recorder()
    batcher.start()
    try:
        waiter = asyncio.ensure_future(batcher.call("x"))
        await asyncio.sleep(0)  # it queued its call
        waiter.cancel()
        assert await batcher.submit("y") == "Y"
        assert batcher.batches == [["x", "y"]]
    finally:
        await batcher.stop()
