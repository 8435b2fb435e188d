"""Calls made by many coroutines at once, sent to Redis together.

Calls made in the same event-loop turn (128 submits answering at once, a worker starting the batch of
entries it just read, every request task of one engine step) are collected and sent as one batch: one
write and one round trip for the lot instead of one each. `Batcher` does the collecting, one batch at a
time and in order; a subclass says how a batch is sent (the admission script, the start script, the
worker's outbox).

A call's future comes from the loop the batcher started on: on Python 3.11 each asyncio.get_running_loop() is
a getpid() system call (its check for a fork), and this runs once a call, several times a request.
"""

from __future__ import annotations

import asyncio
from typing import Any, Generic, TypeVar

from redis.asyncio import Redis

from inferq.shared.aio import cancel_and_wait
from inferq.shared.connection import execute_all
from inferq.shared.lua import Call, LuaScript

C = TypeVar("C")  # what one caller asks for
# A call that may be taken back until its batch goes out: its future, and the number of that batch.
Ticket = tuple["asyncio.Future[Any]", int]
WITHDRAWN = object()  # the result of a call taken back before it went out


class Batcher(Generic[C]):
    def __init__(self, name: str) -> None:
        self.name = name
        self._calls: list[tuple[C, asyncio.Future[Any]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._batches = 0  # batches taken so far: a call submitted now goes out with batch number _batches
        self._withdrawn = 0  # calls taken back from the batch not yet taken (its futures' result is WITHDRAWN)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name=f"inferq-{self.name}")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        for _, fut in self._calls:
            fut.cancel()
        self._calls = []
        self._withdrawn = 0

    @property
    def running(self) -> bool:
        return self._task is not None

    @property
    def pending(self) -> int:
        """Calls queued and not yet sent."""
        return len(self._calls)

    def submit(self, item: C) -> asyncio.Future[Any]:
        """Queue one call; the future resolves with its answer."""
        if self._task is None or self._loop is None:
            raise RuntimeError(f"{self.name} batcher not started")
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._calls.append((item, fut))
        self._wake.set()
        return fut

    def submit_withdrawable(self, item: C) -> Ticket:
        """Queue one call that its caller may take back (`withdraw`) until its batch goes out."""
        return self.submit(item), self._batches

    def withdraw(self, ticket: Ticket) -> bool:
        """Take back a call that has not gone out: True if it was still waiting (its future's result is then
        WITHDRAWN, and nothing of it is sent); False if its batch was taken already (it is sent, or was)."""
        fut, batch = ticket
        if batch != self._batches or fut.done():
            return False
        fut.set_result(WITHDRAWN)
        self._withdrawn += 1
        return True

    @staticmethod
    def was_withdrawn(ticket: Ticket) -> bool:
        """Whether the call was taken back (by `withdraw`, now or before): nothing of it was sent."""
        fut = ticket[0]
        return fut.done() and not fut.cancelled() and fut.exception() is None and fut.result() is WITHDRAWN

    async def call(self, item: C) -> Any:
        """Queue one call and wait for its answer; an error of the batch (connection lost) or of this call
        (a script error) is raised to this caller."""
        return await self.submit(item)

    async def send(self, items: list[C]) -> list[Any]:
        """Send a batch; one answer (or exception instance) per item, in order."""
        raise NotImplementedError

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0)  # let the other calls of this loop turn join the batch
            calls, self._calls = self._calls, []
            self._batches += 1
            if self._withdrawn:  # drop the calls taken back (one whose waiter was cancelled is still sent)
                self._withdrawn = 0
                calls = [(item, fut) for item, fut in calls if not fut.done() or fut.cancelled()]
                if not calls:
                    continue
            try:
                results = await self.send([item for item, _ in calls])
            except Exception as exc:  # the callers get the error; the next batch tries again
                for _, fut in calls:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            except asyncio.CancelledError:  # stopped mid-send: its callers must not wait forever
                for _, fut in calls:
                    fut.cancel()
                raise
            for (_, fut), result in zip(calls, results, strict=True):
                if fut.done():
                    continue
                if isinstance(result, Exception):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)


class BatchedScript(Batcher[Call]):
    """One Lua script; concurrent calls go out as one pipeline of EVALSHA."""

    def __init__(self, redis: Redis, script: LuaScript) -> None:
        super().__init__(script.name)
        self.redis = redis
        self.script = script

    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        return await self.call((keys, args))

    async def send(self, items: list[Call]) -> list[Any]:
        return await self.script.run_all(self.redis, items)


class BatchedHashReads(Batcher[str]):
    """HGETALL of whole hashes (stored results): the reads of one loop turn go out as one pipeline, so many
    callers waiting on their results cost one round trip, not one each."""

    def __init__(self, redis: Redis) -> None:
        super().__init__("hash-reads")
        self.redis = redis

    async def send(self, items: list[str]) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in items:
                pipe.hgetall(key)
            return await execute_all(self.redis, pipe)
