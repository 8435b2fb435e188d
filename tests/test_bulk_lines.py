"""A bulk job's queued line has no result hash: its entry is kept in the job's id hash (producer/admit.lua), a
fifth of the bytes. What a result hash did for a queued request still holds for such a line: a replayed
feed adds nothing twice, a reader sees it queued, a cancel ends it once, a forged entry can neither run nor
end it, and its tenant's count goes down once however it ends."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from inferq.producer import InferenceClient
from inferq.producer.admission import ADMITTED, EXISTS
from inferq.producer.bulk.state import BulkStore, JobRecord, digest
from inferq.shared.codec import pack, unpack
from inferq.shared.errors import RequestNotFound
from inferq.shared.keys import Keys, bulk_request_id
from inferq.shared.schemas import GenerationRequest
from inferq.shared.settings import Settings
from tests.conftest import drained, wait_until

MODEL = "fake"
JOB = "bj-lines"


async def feed(client: InferenceClient, lines: int, *, named: bool = False, **params: Any) -> list[GenerationRequest]:
    """What a bulk runner does with a batch: note each custom_id's first line in the job's id hash, then admit
    the lines as requests of the job, whose ids say its reply stream (`named`: the entries name it too, as
    entries made before the runner left it out do)."""
    store = BulkStore(client.redis, client.keys, ttl_s=3600)
    if await store.get(JOB) is None:
        await store.create(JobRecord(id=JOB, model=MODEL, created_at=time.time()))
    numbered = [(f"c{i}", i + 1) for i in range(lines)]
    assert await store.first_lines(JOB, numbered) == [n for _, n in numbered]  # a replay sees its own lines
    reply_stream = client.keys.done(JOB) if named else None
    return [
        client.build_request(
            request_id=bulk_request_id(JOB, 0, digest(custom_id)),
            prompt=f"line {n}",
            model=MODEL,
            max_tokens=2,
            reply_stream=reply_stream,
            **params,
        )
        for custom_id, n in numbered
    ]


async def replies(redis: Redis, keys: Keys) -> dict[str, dict[str, Any]]:
    """The job's reply-stream records by request id; each id at most once."""
    records = [unpack(f[b"m"]) for _, f in await redis.xrange(keys.done(JOB))]
    by_id = {r["id"]: r for r in records}
    assert len(by_id) == len(records), "a line answered twice"
    return by_id


async def all_answered(redis: Redis, settings: Settings, lines: int) -> dict[str, dict[str, Any]]:
    """The job's records once there are `lines` of them and the model's queue is empty."""
    keys = Keys.of(settings)

    async def ended() -> bool:
        return len(await replies(redis, keys)) == lines and await drained(redis, settings, MODEL) == (0, 0)

    await wait_until(ended, 30, f"{lines} lines to be answered and the queue to empty")
    return await replies(redis, keys)


async def test_a_queued_bulk_line_is_kept_in_its_jobs_id_hash_and_runs_once(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    keys = Keys.of(settings)
    await redis.hset(keys.tenants(MODEL), "acme", 10)  # ten unfinished requests of the tenant elsewhere
    requests = await feed(client, 5, tenant="acme")
    assert [a.code for a in await client.enqueue_many(requests)] == [ADMITTED] * 5
    queued = {e.decode(): unpack(f[b"m"]) for e, f in await redis.xrange(keys.queue(MODEL))}
    assert all("reply_stream" not in line for line in queued.values())  # the worker takes it from the id
    entries = {line["id"]: entry for entry, line in queued.items()}
    marks = await redis.hgetall(keys.bulk_ids(JOB))
    for n, request in enumerate(requests, 1):
        assert not await redis.exists(keys.result(request.id))  # no result hash while it is queued
        ids_key, ref = keys.bulk_line(request.id) or ("", "")
        assert ids_key == keys.bulk_ids(JOB) and ref == f"{digest(f'c{n - 1}')} 0"
        assert marks[ref.split()[0].encode()].decode() == f"{n} 0 {entries[request.id]} {keys.queue(MODEL)}"
        assert (await client.get(request.id)).status == "queued"
    # The same custom_id in another run (epoch) of the job is another request: not this queued one.
    with pytest.raises(RequestNotFound):
        await client.get(bulk_request_id(JOB, 1, digest("c0")))
    with pytest.raises(RequestNotFound):
        await client.cancel(bulk_request_id(JOB, 1, digest("c0")))

    # A feed replayed after a crash: the runner's first_lines still reads its line numbers, nothing is added.
    again = await feed(client, 5, tenant="acme")
    assert [a.code for a in await client.enqueue_many(again)] == [EXISTS] * 5
    assert await redis.xlen(keys.queue(MODEL)) == 5
    assert await redis.hget(keys.tenants(MODEL), "acme") == b"15"

    start_worker("--engine", "standin", "--model", MODEL)
    answered = await all_answered(redis, settings, 5)
    marks = await redis.hgetall(keys.bulk_ids(JOB))
    for n, request in enumerate(requests, 1):
        assert answered[request.id]["status"] == "done"
        stored = await redis.hgetall(keys.result(request.id))
        assert stored[b"status"] == b"done" and stored[b"attempts"] == b"1"
        assert stored[b"entry"].decode() == f"{entries[request.id]} {keys.queue(MODEL)}"  # start.lua copied it
        assert marks[digest(f"c{n - 1}").encode()] == str(n).encode()  # the id hash let go of it
    assert await redis.hget(keys.tenants(MODEL), "acme") == b"10"  # each line released its count once
    # A line that ended is not queued again when its result is gone (it expired): nothing to read or cancel.
    assert await client.cancel(requests[0].id) == "done"
    await redis.delete(keys.result(requests[0].id))
    with pytest.raises(RequestNotFound):
        await client.get(requests[0].id)
    with pytest.raises(RequestNotFound):
        await client.cancel(requests[0].id)


async def test_a_cancelled_or_expired_bulk_line_ends_once_and_a_forged_entry_runs_nothing(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    keys = Keys.of(settings)
    await redis.hset(keys.tenants(MODEL), "acme", 10)  # ten unfinished requests of the tenant elsewhere
    cancelled, kept, late = await feed(client, 3, named=True, tenant="acme")
    late = late.model_copy(update={"deadline": time.time() + 0.3})
    assert [a.code for a in await client.enqueue_many([cancelled])] == [ADMITTED]
    # Ahead of the real entry in the queue, so a worker meets it first, while the line has no result hash.
    forged = {"v": 1, "id": kept.id, "model": MODEL, "prompt": "forged", "max_tokens": 7, "stream": False,
              "reply_stream": keys.done(JOB)}  # fmt: skip
    await redis.xadd(keys.queue(MODEL), {"m": pack(forged)})
    assert [a.code for a in await client.enqueue_many([kept, late])] == [ADMITTED] * 2

    assert await client.cancel(cancelled.id) == "cancelled"
    assert await client.cancel(cancelled.id) == "cancelled"  # a second cancel finds it ended
    assert await redis.hget(keys.result(cancelled.id), "entry") is not None  # the worker can tell it is its own
    with pytest.raises(RequestNotFound):  # a line never admitted has nothing to cancel
        await client.cancel(bulk_request_id(JOB, 0, digest("never-fed")))
    await asyncio.sleep(max(late.deadline - time.time(), 0) + 0.05)  # type: ignore[operator]  # past its deadline
    start_worker("--engine", "standin", "--model", MODEL)
    answered = await all_answered(redis, settings, 3)  # and the forged entry dead-lettered: the queue is empty
    marks = await redis.hgetall(keys.bulk_ids(JOB))
    assert sorted(marks.values()) == [b"1", b"2", b"3"]  # each line's state is its result hash now
    assert answered[kept.id]["status"] == "done" and answered[kept.id]["completion_tokens"] == 2  # not the forgery
    assert answered[cancelled.id]["status"] == "cancelled"
    assert answered[late.id]["status"] == "expired"
    for line in (cancelled, kept, late):  # each result names its own entry, however the line ended
        assert (await redis.hget(keys.result(line.id), "entry") or b"").endswith(keys.queue(MODEL).encode())
    letters = await client.dead_letters(MODEL).list()
    forgeries = [letter.request for letter in letters if "forged entry" in letter.error]
    assert [(r.id, r.prompt) for r in forgeries if r is not None] == [(kept.id, "forged")], letters
    assert await redis.hget(keys.tenants(MODEL), "acme") == b"10"  # each of the three released its count once
