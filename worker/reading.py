"""Reading new entries from a model's lanes, over all its shards (docs/CONTRACTS.md, "Delivery").

One read_lanes.lua call per shard (each touches one slot of a cluster), in one pipelined round trip. With
one shard the script alone keeps the lane priorities and floors; with several, what each shard gives is
planned first from every lane's unread count (`lanes.plan_reads`), so the shards together keep them. When no
lane has anything, the reader waits in a blocking XREADGROUP on each shard's lanes at once.
"""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from inferq.shared.aio import cancel_and_wait
from inferq.shared.codec import text
from inferq.shared.connection import execute_all
from inferq.shared.keys import GROUP, LANES, group_counts
from inferq.worker import scripts
from inferq.worker.claims import Entry, pairs
from inferq.worker.lanes import LaneShares, plan_reads

BLOCK_MS = 1000  # how long one idle wait for new entries lasts
_UNKNOWN = 1 << 30  # a lag Redis cannot tell: read the lane as if it had plenty


def unread(groups: object) -> int:
    """The group's lag in one lane stream, from XINFO GROUPS (0 for a stream not made yet)."""
    counts = group_counts(groups)
    if counts is None:
        return 0
    lag = counts[1]
    return _UNKNOWN if lag is None else lag  # unknown: maybe any number


class LaneReader:
    def __init__(self, redis: Redis, shards: list[list[str]], consumer: str, lanes: LaneShares) -> None:
        self.redis = redis
        self.shards = shards  # each shard's lane streams, highest priority first
        self.streams = [stream for lanes in shards for stream in lanes]
        self.consumer = consumer
        self.lanes = lanes
        self._turn = 0  # the shard offered a lane's work first next time: shards take turns
        self._waits: dict[int, asyncio.Task[list[Entry]]] = {}  # shard -> its blocking read, while one runs

    async def read(self, free: int) -> list[Entry]:
        """Up to `free` new entries (a few more when a blocking wait on several lanes took them)."""
        reserved = self.lanes.reservations(free)
        if len(self.shards) == 1:
            calls = [(self.shards[0], [GROUP, self.consumer, free, *reserved])]
        else:
            plan = plan_reads(await self._unread(), free, reserved, self._turn % len(self.shards))
            self._turn += 1
            calls = [(lanes, [GROUP, self.consumer, sum(n), *n]) for lanes, n in zip(self.shards, plan, strict=True)]
            calls = [call for call in calls if call[1][2]]
        got = [0] * len(LANES)
        entries: list[Entry] = []
        replies = await scripts.READ_LANES.run_all(self.redis, calls, raise_errors=True)
        for (lanes, _), found in zip(calls, replies, strict=True):
            for i, eid, f in found:
                got[int(i) - 1] += 1
                entries.append((lanes[int(i) - 1], text(eid), pairs(f), 1))
        self.lanes.record(reserved, got)
        return entries or await self._wait(free)

    async def _unread(self) -> list[list[int]]:
        """Each shard's entries no worker has read yet, per lane (one pipelined round trip)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in self.streams:
                pipe.xinfo_groups(stream)
            replies = iter(await execute_all(self.redis, pipe))
        return [[unread(next(replies)) for _ in lanes] for lanes in self.shards]

    async def _wait(self, free: int) -> list[Entry]:
        """Nothing new in any lane: wait for the next entries and take them in the same round trip (a blocking
        XREADGROUP on every lane of a shard, one per shard at once), so an idle worker starts a request one
        round trip after it is admitted. No lane hands out more than its share of the free slots, or one (with
        few free, up to one entry per lane: the engine queues the few over its slots briefly). Idle, there is no
        lane to favour: the floors and priorities apply again from the next read, once there is work to share.
        A shard's read that took nothing yet stays out for the next wait; none is cut short (what it takes is
        this worker's then): a drain waits at most BLOCK_MS for them (`collect_waits`), and runs what they took."""
        count = max(free // len(self.streams), 1)
        for shard, lanes in enumerate(self.shards):
            if shard not in self._waits:
                read = self._blocking_read(lanes, count)
                self._waits[shard] = asyncio.create_task(read, name=f"inferq-read-{shard}")
        await asyncio.wait(self._waits.values(), return_when=asyncio.FIRST_COMPLETED)
        return await self.collect_waits(wait=False)

    async def _blocking_read(self, lanes: list[str], count: int) -> list[Entry]:
        streams = dict.fromkeys(lanes, ">")
        replies = await self.redis.xreadgroup(GROUP, self.consumer, streams, count=count, block=BLOCK_MS)
        return [(text(stream), text(eid), fields, 1) for stream, entries in replies or [] for eid, fields in entries]

    async def collect_waits(self, *, wait: bool) -> list[Entry]:
        """What the shards' blocking reads that ended took (with `wait`, all of them, once ended). A read that
        failed is raised (an outage: the caller backs off) only if none took anything."""
        if wait and self._waits:
            await asyncio.wait(self._waits.values())
        entries: list[Entry] = []
        failure: BaseException | None = None
        for shard, task in list(self._waits.items()):
            if not task.done():
                continue
            del self._waits[shard]
            if task.cancelled():
                continue
            if task.exception() is None:
                entries += task.result()
            else:
                failure = task.exception()
        if failure is not None and not entries and not wait:
            raise failure
        return entries

    async def close(self) -> None:
        for read in list(self._waits.values()):
            if not read.done():
                await cancel_and_wait(read)
            elif not read.cancelled():
                read.exception()  # seen: a read that failed as the worker stops is no news
        self._waits.clear()
