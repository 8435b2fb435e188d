"""Every Redis write of one engine step goes out in one transaction: never one round trip per token.

Request tasks add commands and token events without waiting; a single flusher task wakes once per event
loop turn, gathers everything the step produced and sends it as one MULTI/EXEC pipeline, with the events
for each reply channel packed into a single PUBLISH. Callers that must know their write landed (the final
result + ack) await the future `add` returns. Batches are sent one at a time, in order.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from inferq.shared.aio import cancel_and_wait
from inferq.shared.codec import pack
from inferq.shared.connection import OUTAGE, Backoff
from inferq.shared.schemas import SCHEMA_VERSION

log = logging.getLogger("inferq.worker")

Command = tuple[Any, ...]


class Outbox:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._commands: list[Command] = []
        self._events: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        self._waiters: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0  # how many transactions were sent (for stats and tests)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="inferq-outbox")

    async def stop(self, timeout_s: float | None = None) -> None:
        """Send what is queued (waiting at most `timeout_s` for Redis), then stop."""
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self.flush(), timeout_s)
        except TimeoutError:
            log.error("could not write %d queued commands before stopping (redis down?)", len(self._commands))
        await cancel_and_wait(self._task)
        self._task = None

    def publish(self, channel: str, event: dict[str, Any]) -> None:
        self._events[channel].append(event)
        self._wake.set()

    def add(self, *commands: Command, events: tuple[tuple[str, dict[str, Any]], ...] = ()) -> asyncio.Future[None]:
        """Queue commands (and events after them); the future resolves once they are written."""
        self._commands.extend(commands)
        for channel, event in events:
            self._events[channel].append(event)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._wake.set()
        return waiter

    async def flush(self) -> None:
        if self._commands or self._events:
            await self.add()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0)  # let every request task of this engine step add its output first
            commands, events, waiters = self._commands, self._events, self._waiters
            self._commands, self._events, self._waiters = [], defaultdict(list), []
            await self._send(commands, events)
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def _send(self, commands: list[Command], events: dict[str, list[dict[str, Any]]]) -> None:
        backoff = Backoff()
        while True:
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    for command in commands:
                        pipe.execute_command(*command)
                    for channel, batch in events.items():
                        pipe.publish(channel, pack({"v": SCHEMA_VERSION, "events": batch}))
                    results = await pipe.execute(raise_on_error=False)
                self.batches += 1
                for command, result in zip(commands, results, strict=False):
                    if isinstance(result, Exception):  # a bug, not an outage: say so, don't retry forever
                        log.error("redis rejected %s: %s", command[0], result)
                return
            except (*OUTAGE, ResponseError) as exc:
                # Final results must not be lost: retry until Redis is back, or takes writes again (a refused
                # transaction, e.g. OOM or READONLY after a failover, wrote nothing). A repeated token event
                # shows up as a seq gap at the client, which then reads the stored result.
                level = logging.ERROR if isinstance(exc, ResponseError) else logging.WARNING
                delay = backoff.next()
                log.log(level, "redis write failed (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
