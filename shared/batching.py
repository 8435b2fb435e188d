"""Calls made by many coroutines at once, sent to Redis together.

Calls made in the same event-loop turn (128 submits answering at once, a worker starting the batch of
entries it just read) are collected and sent as one batch: one write and one round trip for the lot
instead of one each. `Batcher` does the collecting; a subclass says how a batch is sent.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any, Generic, TypeVar

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from inferq.shared.aio import cancel_and_wait

C = TypeVar("C")  # what one caller asks for


class Batcher(Generic[C]):
    def __init__(self, name: str) -> None:
        self.name = name
        self._calls: list[tuple[C, asyncio.Future[Any]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"inferq-{self.name}")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        for _, fut in self._calls:
            fut.cancel()
        self._calls = []

    async def call(self, item: C) -> Any:
        """Queue one call and wait for its answer; an error of the batch (connection lost) or of this call
        (a script error) is raised to this caller."""
        if self._task is None:
            raise RuntimeError(f"{self.name} batcher not started")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls.append((item, fut))
        self._wake.set()
        return await fut

    async def send(self, items: list[C]) -> list[Any]:
        """Send a batch; one answer (or exception instance) per item, in order."""
        raise NotImplementedError

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0)  # let the other calls of this loop turn join the batch
            calls, self._calls = self._calls, []
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


class ScriptRunner:
    """A Lua script run by SHA in pipelines; a NOSCRIPT reply (first use on a server, or the server
    restarted) loads it and sends the pipeline again: NOSCRIPT means that call did nothing, so repeating
    it is safe."""

    def __init__(self, redis: Redis, source: str) -> None:
        self.redis = redis
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def run_all(self, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        for attempt in range(2):
            async with self.redis.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    pipe.evalsha(self.sha, len(keys), *keys, *args)
                results = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in results):
                await self.redis.script_load(self.source)
                continue
            return list(results)
        raise AssertionError("unreachable")


class BatchedScript(Batcher[tuple[list[str], list[Any]]]):
    """One Lua script; concurrent calls go out as one pipeline of EVALSHA."""

    def __init__(self, redis: Redis, source: str, name: str) -> None:
        super().__init__(name)
        self._runner = ScriptRunner(redis, source)

    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        return await self.call((keys, args))

    async def send(self, items: list[tuple[list[str], list[Any]]]) -> list[Any]:
        return await self._runner.run_all(items)
