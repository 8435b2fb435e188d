"""Who owns which entry (docs/CONTRACTS.md, "Delivery"): renew our claims, take over the dead's, remove the dead.

A running worker resets the idle time of every entry it runs several times per `claim_idle_ms`, so a long
generation is never taken over; an entry idle longer than that belongs to a consumer that died (or lost
Redis for that long) and any worker with a free slot takes it over with XAUTOCLAIM.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from inferq.shared.codec import text
from inferq.shared.keys import GROUP, Keys
from inferq.shared.settings import Settings
from inferq.worker import scripts

# (lane stream, entry id, fields, deliveries so far including this one)
Entry = tuple[str, str, dict[bytes, bytes], int]


def pairs(flat: list[Any]) -> dict[bytes, bytes]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


class Claims:
    def __init__(self, redis: Redis, settings: Settings, shards: list[list[str]], consumer: str) -> None:
        self.redis = redis
        self.shards = shards  # each shard's lane streams, highest priority first: one script call per shard
        self.streams = [stream for lanes in shards for stream in lanes]
        self.consumer = consumer
        self.keys = Keys.of(settings)
        self.idle_ms = settings.claim_idle_ms
        # Renew three times per idle window (and at least every heartbeat): two missed renewals are harmless.
        self.renew_interval_s = min(settings.heartbeat_s, settings.claim_idle_ms / 3000)
        self._next_takeover = 0.0  # monotonic time of the next look for abandoned entries
        self._next_reap = 0.0

    def takeover_due(self) -> bool:
        return time.monotonic() >= self._next_takeover

    async def take_over(self, free: int, *, idle: bool) -> tuple[list[Entry], bool, bool]:
        """Up to `free` entries idle longer than claim_idle_ms, now ours, highest lane first. An entry that
        went down with a worker more than once is a suspect (a poison pill?): it is taken alone, and only when
        this worker runs nothing (`idle`). Returns (entries, whether the one entry is a suspect, whether a
        suspect waits that this worker could take once idle). The shards are looked at in order."""
        entries: list[Entry] = []
        suspect = waiting = False
        for lanes in self.shards:
            if len(entries) >= free or suspect:
                break
            idle_now = idle and not entries
            found, waits = await scripts.CLAIM(
                self.redis, lanes, [GROUP, self.consumer, self.idle_ms, free - len(entries), int(idle_now)]
            )
            suspect = any(int(e[4]) for e in found)
            waiting = waiting or bool(waits)
            entries += [(lanes[int(i) - 1], text(eid), pairs(f), int(n)) for i, eid, f, n, _ in found]
        # Full haul (or a suspect taken, or one waiting): there may be more, look again next time; otherwise
        # look again in half an idle window.
        wait_s = 0.0 if len(entries) >= free or waiting or suspect else self.idle_ms / 2000
        self._next_takeover = time.monotonic() + wait_s
        return entries, suspect, waiting

    async def renew(self, owned: dict[str, list[str]]) -> list[tuple[str, str]]:
        """Reset the idle time of the entries we run; returns (stream, id) of those another worker took over."""
        if not owned:
            return []
        calls = [([stream], [GROUP, self.consumer, *ids]) for stream, ids in owned.items()]
        replies = await scripts.RENEW.run_all(self.redis, calls, raise_errors=True)
        return [(stream, text(eid)) for stream, lost in zip(owned, replies, strict=True) for eid in lost]

    async def reap(self) -> list[str]:
        """Remove consumers that own nothing, were idle a whole claim window and have no heartbeat."""
        if time.monotonic() < self._next_reap:
            return []
        self._next_reap = time.monotonic() + self.idle_ms / 1000
        # Candidates from XINFO here; the script checks each again (and its heartbeat key, passed as a KEY)
        # and deletes it in one step, so no entry can be handed to it in between.
        candidates: set[str] = set()
        for stream in self.streams:
            with contextlib.suppress(ResponseError):  # no stream or group yet
                for c in await self.redis.xinfo_consumers(stream, GROUP):
                    name = text(c["name"])
                    if name != self.consumer and int(c["pending"]) == 0 and int(c["idle"]) > self.idle_ms:
                        candidates.add(name)
        if not candidates:
            return []
        names = sorted(candidates)
        # No heartbeat: the consumer's process is gone. (Names are unique per process; one that came back with a
        # given name reads, so it is not idle, and the script's own check keeps it.)
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.exists(self.keys.worker(name))
            beating = await pipe.execute()
        names = [name for name, beats in zip(names, beating, strict=True) if not beats]
        if not names:
            return []
        calls = [(lanes, [GROUP, self.idle_ms, *names]) for lanes in self.shards]
        removed = {
            text(name) for reply in await scripts.REAP.run_all(self.redis, calls, raise_errors=True) for name in reply
        }
        return sorted(removed)
