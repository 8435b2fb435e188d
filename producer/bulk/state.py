"""A bulk job's state, kept in Redis so that any process can pick the job up.

The job hash (`Keys.bulk`) says where the job stands: how many input lines were fed (`fed`, a cursor into
the input), how many became requests, how far the reply stream has been counted (`tallied_to`) and the
outcome counts. Every reply-stream record stands for one input line: a request's final record, or an error
record for a line that never became a request. So the job is over when the input is fed and as many
records were counted as lines were fed, and the output is the reply stream read in order.

Nothing here grows with the input in the process's memory: duplicate custom_ids are found in a Redis hash
of their digests, a detached job's input is staged in Redis in chunks, and output goes straight to a file.
"""

from __future__ import annotations

import hashlib
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from typing import Any

from redis.asyncio import Redis

from inferq.producer.bulk.formats import SIMPLE
from inferq.shared.codec import pack, text, unpack
from inferq.shared.connection import pipeline
from inferq.shared.keys import Keys
from inferq.shared.lua import LuaScript

JOB = LuaScript("inferq.producer.bulk", "job.lua")

VALIDATING, IN_PROGRESS, FINALIZING = "validating", "in_progress", "finalizing"
COMPLETED, FAILED, CANCELLING, CANCELLED = "completed", "failed", "cancelling", "cancelled"
ENDED = frozenset({COMPLETED, FAILED, CANCELLED})
RUNNING = frozenset({VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING})
ATTACHED, DETACHED = "attached", "detached"
CHUNK_LINES = 1000  # input lines per staged chunk


@dataclass
class JobRecord:
    """The job hash, typed. Counts are of input lines (non-blank)."""

    id: str
    state: str = VALIDATING
    mode: str = DETACHED
    model: str = ""
    epoch: int = 0  # part of every request id: a job run again from scratch never meets its old results
    input: str = ""  # where the lines came from (a path), for people
    output: str = ""  # attached jobs: the output file
    format: str = ""  # the input file's format (formats.file_kind): the shape of every output record
    total: int = 0
    chunks: int = 0  # detached jobs: staged input chunks
    fed: int = 0
    feed_done: int = 0
    submitted: int = 0
    tallied_to: str = "0-0"
    done: int = 0
    failed: int = 0
    invalid: int = 0
    tokens: int = 0
    created_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    runner: str = ""
    error: str = ""

    @property
    def accounted(self) -> int:
        return self.done + self.failed + self.invalid

    @property
    def tag_defaults(self) -> tuple[str, str]:
        """The format and model a line of this job has unless it says otherwise: its tag leaves them out
        (formats.make_tag)."""
        return self.format or SIMPLE, self.model

    @property
    def all_accounted(self) -> bool:
        return bool(self.feed_done) and self.accounted >= self.fed

    def rate(self) -> float:
        """Lines per second since the job started."""
        if not self.started_at:
            return 0.0
        end = self.finished_at or time.time()
        return self.accounted / max(end - self.started_at, 1e-6)

    def eta_s(self) -> float | None:
        rate = self.rate()
        if self.state in ENDED or not rate:
            return None
        return (self.total - self.accounted) / rate

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(accounted=self.accounted, lines_per_s=round(self.rate(), 2), eta_s=self.eta_s())
        return data

    @classmethod
    def from_hash(cls, job: str, raw: dict[bytes, bytes]) -> JobRecord:
        record = cls(id=job)
        for f in fields(cls):
            value = raw.get(f.name.encode())
            if value is not None and f.name != "id":
                kind = type(getattr(record, f.name))
                setattr(record, f.name, kind(text(value)) if kind is not int else int(float(text(value))))
        return record


def digest(custom_id: str) -> str:
    return hashlib.sha256(custom_id.encode()).hexdigest()[:24]


_ZLIB = b"\x78"  # the first byte of a zlib stream (deflate, 32 KiB window)
_PRUNE = 16  # index entries a new job checks (the oldest), dropping those whose job expired


class BulkStore:
    """Redis operations on bulk jobs; one instance per client connection."""

    def __init__(self, redis: Redis, keys: Keys, ttl_s: int) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_s = ttl_s

    async def get(self, job: str) -> JobRecord | None:
        raw = await self.redis.hgetall(self.keys.bulk(job))
        return JobRecord.from_hash(job, raw) if raw else None

    async def create(self, record: JobRecord) -> None:
        """A new job record (replacing an ended one of the same id, with everything it left)."""
        values = {f.name: str(getattr(record, f.name)) for f in fields(record) if f.name != "id"}
        async with pipeline(self.redis, atomic=True) as pipe:
            pipe.delete(
                self.keys.done(record.id), self.keys.bulk_ids(record.id), self.keys.bulk_lease(record.id),
                self.keys.bulk_input(record.id),
            )  # fmt: skip
            pipe.hset(self.keys.bulk(record.id), mapping=values)  # type: ignore[arg-type]
            pipe.expire(self.keys.bulk(record.id), self.ttl_s)
            pipe.zadd(self.keys.bulk_jobs(), {record.id: record.created_at})
            pipe.zrange(self.keys.bulk_jobs(), 0, _PRUNE - 1)
            *_, oldest = await pipe.execute()
        await self._prune([text(j) for j in oldest])

    async def _prune(self, jobs: list[str]) -> None:
        """Drop from the index the jobs whose record expired: each new job checks the oldest few, so the
        index holds the jobs that exist and at most a few more."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for j in jobs:
                pipe.exists(self.keys.bulk(j))
            alive = await pipe.execute()
        gone = [j for j, exists in zip(jobs, alive, strict=True) if not exists]
        if gone:
            await self.redis.zrem(self.keys.bulk_jobs(), *gone)

    async def keep_alive(self, job: str) -> None:
        """A job that moves keeps its keys: each feed and tally renews them for `ttl_s`, so the keys of a job
        that stopped for good (its runner gone, never resumed) expire `ttl_s` after its last step."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in (self.keys.bulk(job), self.keys.done(job), self.keys.bulk_ids(job), self.keys.bulk_input(job)):
                pipe.expire(key, self.ttl_s)
            await pipe.execute()

    async def update(self, job: str, **values: Any) -> None:
        await self.redis.hset(self.keys.bulk(job), mapping={k: str(v) for k, v in values.items()})

    async def change_state(self, job: str, new: str, allowed: frozenset[str] | set[str]) -> str:
        """Move the job to `new` if its state is one of `allowed`; returns the state after the call ('' if
        there is no such job)."""
        return text(await JOB(self.redis, [self.keys.bulk(job)], ["state", new, *sorted(allowed)]))

    async def commit_feed(
        self, job: str, expected_fed: int, lines: int, requests: int, feed_done: bool, errors: list[dict[str, Any]]
    ) -> bool:
        """Record a fed batch and append its error records; False if another runner moved the job on."""
        args = ["feed", expected_fed, lines, requests, int(feed_done), *(pack(e) for e in errors)]
        fed = bool(await JOB(self.redis, [self.keys.bulk(job), self.keys.done(job)], args))
        await self.keep_alive(job)
        return fed

    async def commit_tally(self, job: str, expected: str, to: str, counts: dict[str, int]) -> bool:
        args: list[Any] = ["tally", expected, to]
        for name, n in counts.items():
            args += [name, n]
        tallied = bool(await JOB(self.redis, [self.keys.bulk(job)], args))
        await self.keep_alive(job)
        return tallied

    async def first_lines(self, job: str, numbered: list[tuple[str, int]]) -> list[int]:
        """For each (custom_id, line number), the first line the custom_id was seen on (this one if new). The
        admission adds a queued line's epoch and entry to its field ('<line> <epoch> <entry id> <lane stream>':
        admit.lua); the line comes first."""
        key = self.keys.bulk_ids(job)
        async with self.redis.pipeline(transaction=False) as pipe:
            for custom_id, number in numbered:
                pipe.hsetnx(key, digest(custom_id), number)
                pipe.hget(key, digest(custom_id))
            pipe.expire(key, self.ttl_s)
            replies = await pipe.execute()
        return [int(replies[i + 1].partition(b" ")[0]) for i in range(0, len(replies) - 1, 2)]

    async def digests(self, job: str) -> AsyncIterator[str]:
        async for field, _ in self.redis.hscan_iter(self.keys.bulk_ids(job), count=1000):
            yield text(field)

    async def records(self, job: str, after: str = "0-0", block_ms: int | None = None) -> list[tuple[str, Any]]:
        """Up to 512 reply-stream records after `after`, as (entry id, record)."""
        reply = await self.redis.xread({self.keys.done(job): after}, count=512, block=block_ms)
        return [(text(entry_id), unpack(f[b"m"])) for _, entries in reply or [] for entry_id, f in entries]

    async def stage(self, job: str, chunks: list[list[tuple[int, str]]], first: int) -> None:
        """Store input chunks `first`, `first + 1`, ... (each CHUNK_LINES (number, line) pairs), compressed: a
        file of similar lines shrinks several times, and a million-line job is held in Redis until it ends."""
        values = {str(first + i): zlib.compress(pack([list(p) for p in chunk]), 1) for i, chunk in enumerate(chunks)}
        async with pipeline(self.redis, atomic=True) as pipe:
            pipe.hset(self.keys.bulk_input(job), mapping=values)  # type: ignore[arg-type]
            pipe.expire(self.keys.bulk_input(job), self.ttl_s)
            await pipe.execute()

    async def chunk(self, job: str, number: int) -> list[tuple[int, str]] | None:
        raw = await self.redis.hget(self.keys.bulk_input(job), str(number))
        if raw is None:
            return None
        if raw[:1] == _ZLIB:  # a msgpack list never starts so: a chunk staged before compression reads as it was
            raw = zlib.decompress(raw)
        return [(int(n), str(line)) for n, line in unpack(raw)]

    async def finish(self, job: str, state: str, *, keep_output: bool) -> None:
        """The job ended: drop what only running needs, keep the record (and the output, unless the attached
        run wrote it to its file already) for `ttl_s`."""
        now = time.time()
        async with pipeline(self.redis, atomic=True) as pipe:
            pipe.hset(self.keys.bulk(job), mapping={"state": state, "finished_at": repr(now)})
            pipe.delete(self.keys.bulk_ids(job), self.keys.bulk_input(job), self.keys.bulk_lease(job))
            if keep_output:
                pipe.expire(self.keys.done(job), self.ttl_s)
            else:
                pipe.delete(self.keys.done(job))
            pipe.expire(self.keys.bulk(job), self.ttl_s)
            await pipe.execute()

    async def list(self, limit: int = 50) -> list[JobRecord]:
        """Newest first; jobs whose record expired are dropped from the index."""
        ids = [text(j) for j in await self.redis.zrevrange(self.keys.bulk_jobs(), 0, limit - 1)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for j in ids:
                pipe.hgetall(self.keys.bulk(j))
            raws = await pipe.execute()
        records = [JobRecord.from_hash(j, raw) if raw else None for j, raw in zip(ids, raws, strict=True)]
        gone = [j for j, r in zip(ids, records, strict=True) if r is None]
        if gone:
            await self.redis.zrem(self.keys.bulk_jobs(), *gone)
        return [r for r in records if r is not None]
