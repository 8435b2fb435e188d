"""Atomic admission (DESIGN.md "Admission / backpressure"), with concurrent submits sent together.

Every submit runs `admit.lua` (cap check + XADD + queued result, one atomic step). Submits issued in the
same event-loop turn — 128 callers answering at once, or a bulk job — go out as one pipeline of EVALSHA
calls: one write and one round trip for the lot, instead of one each.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

ADMIT_LUA = resources.files("producer").joinpath("admit.lua").read_text()
ADMIT_SHA = hashlib.sha1(ADMIT_LUA.encode()).hexdigest()

Call = tuple[list[str], list[Any], asyncio.Future[list[Any]]]


class Admitter:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._calls: list[Call] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="inferq-admitter")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for _, _, fut in self._calls:
            fut.cancel()
        self._calls = []

    async def admit(self, keys: list[str], args: list[Any]) -> list[Any]:
        """Run admit.lua; returns [code, queue_len, lag, entry_id] (see the script)."""
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._calls.append((keys, args, fut))
        self._wake.set()
        return await fut

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0)  # let the other submits of this loop turn join the batch
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
                    pipe.evalsha(ADMIT_SHA, len(keys), *keys, *args)
                results = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in results):
                # First use on this server, or it restarted: load the script, then send the batch again.
                # A NOSCRIPT reply means that call did nothing, so repeating it is safe.
                await self.redis.script_load(ADMIT_LUA)
                continue
            return list(results)
        raise AssertionError("unreachable")
