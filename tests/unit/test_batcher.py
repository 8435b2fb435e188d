"""The batcher (shared/batching.py), alone: calls of one loop turn go out together, in order, and a call taken back
before its batch went out is not sent at all."""

from __future__ import annotations

import asyncio
from typing import Any

from inferq.shared.batching import WITHDRAWN, Batcher


class Recorder(Batcher[str]):
    """Records each batch; a batch's answer waits until `release` is set (a send in flight)."""

    def __init__(self) -> None:
        super().__init__("recorder")
        self.batches: list[list[str]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.sending = asyncio.Event()  # set while a send waits for `release`

    async def send(self, items: list[str]) -> list[Any]:
        self.batches.append(items)
        if not self.release.is_set():
            self.sending.set()
        await self.release.wait()
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
        assert not batcher.withdraw(c)  # answered already
        # A call whose batch is out but not answered yet cannot be taken back either.
        batcher.release.clear()
        late = batcher.submit_withdrawable("d")
        await batcher.sending.wait()  # the batcher took it and waits on the send
        assert batcher.batches[-1] == ["d"] and not late[0].done() and not batcher.withdraw(late)
        batcher.release.set()
        assert await late[0] == "D"
        # A batch of nothing but calls taken back sends nothing at all.
        alone = batcher.submit_withdrawable("e")
        assert batcher.withdraw(alone)
        for _ in range(5):
            await asyncio.sleep(0)  # the batcher wakes, takes the batch, finds nothing to send
        assert batcher.pending == 0 and batcher.batches == [["b", "c"], ["d"]]
        assert await batcher.submit("f") == "F"
        assert batcher.batches == [["b", "c"], ["d"], ["f"]]
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
