"""Every Redis write of one engine step goes out in one transaction: never one round trip per token.

Request tasks add commands and token events without waiting; the batcher (shared.batching) wakes once per
event loop turn, gathers everything the step produced and sends it as one MULTI/EXEC pipeline, with the
events for each reply channel packed into a single PUBLISH. Callers that must know their write landed (the
final result + ack) await the future `add` returns. Batches are sent one at a time, in order.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import defaultdict
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError

from inferq.shared.batching import Batcher
from inferq.shared.codec import pack
from inferq.shared.connection import OUTAGE, Backoff, retry_outages
from inferq.shared.lua import reload_missing
from inferq.shared.schemas import SCHEMA_VERSION

log = logging.getLogger("inferq.worker")

Command = tuple[Any, ...]
Event = tuple[str, dict[str, Any]]  # (reply channel, token event)


class Outbox(Batcher[tuple[tuple[Command, ...], tuple[Event, ...]]]):
    def __init__(self, redis: Redis) -> None:
        super().__init__("outbox")
        self.redis = redis
        self.batches = 0  # how many transactions were sent (for stats and tests)

    async def stop(self, timeout_s: float | None = None) -> None:  # type: ignore[override]
        """Send what is queued (waiting at most `timeout_s` for Redis), then stop."""
        if not self.running:
            return
        try:
            await asyncio.wait_for(self.flush(), timeout_s)
        except TimeoutError:
            log.error("could not write %d queued writes before stopping (redis down?)", self.pending)
        await super().stop()

    def publish(self, channel: str, event: dict[str, Any]) -> None:
        self.submit(((), ((channel, event),)))

    def add(self, *commands: Command, events: tuple[Event, ...] = ()) -> asyncio.Future[None]:
        """Queue commands (and events after them); the future resolves once they are written."""
        return self.submit((commands, events))

    async def flush(self) -> None:
        """Until everything queued before this call is written."""
        await self.add()

    async def send(self, items: list[tuple[tuple[Command, ...], tuple[Event, ...]]]) -> list[None]:
        commands = [command for batch, _ in items for command in batch]
        events: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        for _, batch_events in items:
            for channel, event in batch_events:
                events[channel].append(event)
        while commands or events:
            results = await self._send(commands, events)
            # A script the server did not know (it restarted) ran nothing: load it and send those calls again.
            reload = functools.partial(reload_missing, self.redis, commands, results)
            refused = await retry_outages(reload, "loading a script again", log)
            commands, events = [commands[i] for i in refused], {}
        return [None] * len(items)

    async def _send(self, commands: list[Command], events: dict[str, list[dict[str, Any]]]) -> list[Any]:
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
                    if isinstance(result, Exception) and not isinstance(result, NoScriptError):
                        log.error("redis rejected %s: %s", command[0], result)  # a bug, not an outage: no retry
                return list(results)
            except (*OUTAGE, ResponseError) as exc:
                # Final results must not be lost: retry until Redis is back, or takes writes again (a refused
                # transaction, e.g. OOM or READONLY after a failover, wrote nothing). A repeated token event
                # shows up as a seq gap at the client, which then reads the stored result.
                level = logging.ERROR if isinstance(exc, ResponseError) else logging.WARNING
                delay = backoff.next()
                log.log(level, "redis write failed (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
