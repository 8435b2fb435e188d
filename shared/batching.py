"""Lua scripts called by many coroutines at once, sent together.

Calls made in the same event-loop turn (128 submits answering at once, a worker starting the batch of
entries it just read) go out as one pipeline of EVALSHA: one write and one round trip for the lot instead
of one each. A NOSCRIPT reply (first use on a server, or the server restarted) loads the script and sends
the batch again; NOSCRIPT means that call did nothing, so repeating it is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

Call = tuple[list[str], list[Any], asyncio.Future[Any]]


class BatchedScript:
    def __init__(self, redis: Redis, source: str, name: str) -> None:
        self.redis = redis
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self.name = name
        self._calls: list[Call] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"inferq-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for _, _, fut in self._calls:
            fut.cancel()
        self._calls = []

    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        """Run the script once; Redis errors (connection lost, script error) are raised to this caller."""
        if self._task is None:
            raise RuntimeError(f"{self.name} script batcher not started")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls.append((keys, args, fut))
        self._wake.set()
        return await fut

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0)  # let the other calls of this loop turn join the batch
            calls, self._calls = self._calls, []
            try:
                results = await self._send(calls)
            except Exception as exc:  # the callers get the error; the next batch tries again
                for _, _, fut in calls:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, _, fut), result in zip(calls, results, strict=True):
                if fut.done():
                    continue
                if isinstance(result, Exception):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)

    async def _send(self, calls: list[Call]) -> list[Any]:
        for attempt in range(2):
            async with self.redis.pipeline(transaction=False) as pipe:
                for keys, args, _ in calls:
                    pipe.evalsha(self.sha, len(keys), *keys, *args)
                results = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in results):
                await self.redis.script_load(self.source)
                continue
            return list(results)
        raise AssertionError("unreachable")
