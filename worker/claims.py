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
    def __init__(self, redis: Redis, settings: Settings, streams: list[str], consumer: str) -> None:
        self.redis = redis
        self.streams = streams
        self.consumer = consumer
        self.keys = Keys(settings.key_prefix)
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
        suspect waits that this worker could take once idle)."""
        found, waiting = await scripts.CLAIM(
            self.redis, self.streams, [GROUP, self.consumer, self.idle_ms, free, int(idle)]
        )
        # Full haul (or a suspect taken, or one waiting): there may be more, look again next time; otherwise
        # look again in half an idle window.
        suspect = any(int(e[4]) for e in found)
        wait_s = 0.0 if len(found) >= free or waiting or suspect else self.idle_ms / 2000
        self._next_takeover = time.monotonic() + wait_s
        entries = [(self.streams[int(i) - 1], text(eid), pairs(f), int(n)) for i, eid, f, n, _ in found]
        return entries, suspect, bool(waiting)

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
        keys = [*self.streams, *(self.keys.worker(name) for name in names)]
        removed = await scripts.REAP(self.redis, keys, [GROUP, self.idle_ms, len(self.streams), *names])
        return [text(name) for name in removed]
