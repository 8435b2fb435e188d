"""Every key inferq leaves in Redis goes away by itself or has a bound (docs/CONTRACTS.md, "Keys"): after a
whole life cycle (requests done, cancelled while queued and while running, expired with and without a
worker, dead-lettered, a bulk job run attached and one detached), no key of the prefix is left without a TTL
except the bounded ones the contract names (stand-in engine, real Redis, real arq runner)."""

from __future__ import annotations

from pathlib import Path

from redis.asyncio import Redis

from inferq.producer import InferenceClient
from inferq.producer.bulk.attached import BulkJob
from inferq.producer.bulk.detached import BulkJobs
from inferq.producer.bulk.state import COMPLETED
from inferq.shared.keys import LANES, Keys
from inferq.shared.settings import Settings
from tests.conftest import drained, wait_until
from tests.test_bulk import write_lines
from tests.test_bulk_detached import FAST_STEPS, job_where

MODEL = "fake"
UNSERVED = "nobody-serves-this"


async def test_a_queued_request_past_its_deadline_expires_with_no_worker(
    client: InferenceClient, settings: Settings, redis: Redis
) -> None:
    handle = await client.submit(prompt="hi", model=UNSERVED, ttl=0.3, stream=False)
    result = await handle.result(timeout=30)  # no worker will ever read it
    assert (result.status, result.finish_reason) == ("expired", "expired"), result
    assert "deadline" in (result.error or "")
    keys = Keys(settings.key_prefix)
    assert 0 < await redis.ttl(keys.result(handle.id)) <= settings.result_ttl_s + 1
    assert (await client.get(handle.id)).status == "expired"  # stored, not only computed
    assert await redis.xlen(keys.queue(UNSERVED)) == 1  # the entry waits for a worker to acknowledge it


async def test_every_key_of_a_whole_life_cycle_has_a_ttl_or_a_bound(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker, tmp_path: Path
) -> None:
    keys = Keys(settings.key_prefix)
    # Before any worker: one request cancelled while queued, one past its deadline, one for nobody.
    cancelled_queued = await client.submit(prompt="hi", model=MODEL, stream=False)
    assert await cancelled_queued.cancel() == "cancelled"
    expired = await client.submit(prompt="hi", model=MODEL, ttl=0.2, stream=False)
    never = await client.submit(prompt="hi", model=UNSERVED, ttl=0.2, stream=False)
    assert (await never.result(timeout=30)).status == "expired"  # so `expired`, queued before it, is past too
    start_worker("--engine", "standin", "--model", MODEL, env=FAST_STEPS)

    done = await client.submit(prompt="hi", model=MODEL, max_tokens=3, tenant="alice")
    failed = await client.submit(prompt="fail", model=MODEL, stream=False)
    hung = await client.submit(prompt="hang", model=MODEL)  # yields nothing until cancelled
    await wait_until(lambda: _status(client, hung.id, "running"), 30, "the hung request to start")
    assert await hung.cancel() == "running"  # marked; its worker aborts it in the engine
    statuses = [(await h.result(timeout=30)).status for h in (cancelled_queued, expired, done, failed, hung)]
    assert statuses == ["cancelled", "expired", "done", "failed", "cancelled"]

    attached_in, detached_in = tmp_path / "attached.jsonl", tmp_path / "detached.jsonl"
    write_lines(attached_in, [{"custom_id": f"a{i}", "prompt": "x", "max_tokens": 2} for i in range(6)] + ["{bad"])
    write_lines(detached_in, [{"custom_id": f"d{i}", "prompt": "x", "max_tokens": 2} for i in range(20)])
    progress = await BulkJob(client, attached_in, tmp_path / "attached.out", model=MODEL).run()
    assert (progress.done, progress.invalid) == (6, 1)
    jobs = BulkJobs(client)
    job = await jobs.submit(detached_in, model=MODEL)
    ended = await job_where(jobs, job.id, lambda j: j.state == COMPLETED, "the detached job to end")
    assert ended.done == 20
    assert await drained(redis, settings, MODEL) == (0, 0)

    unbounded = []
    async for raw in redis.scan_iter(match=f"{settings.key_prefix}:*", count=1000):
        key = raw.decode()
        if await redis.ttl(key) > 0:
            continue
        bound = await _bound(redis, settings, keys, key)
        if bound is None:
            unbounded.append((key, (await redis.type(key)).decode()))
        else:
            assert bound, f"{key} is past its bound"
    assert unbounded == [], "keys with neither a TTL nor a bound in the contract"


async def _status(client: InferenceClient, request_id: str, status: str) -> bool:
    return (await client.get(request_id)).status == status


async def _bound(redis: Redis, settings: Settings, keys: Keys, key: str) -> bool | None:
    """None if `key` is not one of the bounded keys without a TTL (docs/CONTRACTS.md, "Keys"); else whether
    it is within its bound."""
    for model in (MODEL, UNSERVED):
        if key in (keys.queue(model, lane) for lane in LANES):  # refused at the cap, never trimmed
            return await redis.xlen(key) <= settings.lane_cap(key.rpartition(":")[2])
        if key == keys.dlq(model):  # trimmed to dlq_max_len, oldest first
            return await redis.xlen(key) <= settings.dlq_max_len
        if key == keys.dlq_dropped(model):  # one number
            return (await redis.type(key)) == b"string"
        if key == keys.refusals(model):  # LANE:REASON fields
            fields = {f.decode() for f in await redis.hkeys(key)}  # type: ignore[misc]
            return fields <= {f"{lane}:{why}" for lane in LANES for why in ("queue_full", "lag_cap", "tenant_cap")}
        if key == keys.tenants(model):  # one field per tenant with unfinished requests, gone at zero
            return all(int(v) > 0 for v in (await redis.hgetall(key)).values())  # type: ignore[misc]
    if key == keys.bulk_jobs():  # the jobs that exist, and at most a few the next job prunes
        members = [m.decode() for m in await redis.zrange(key, 0, -1)]
        return all([await redis.exists(keys.bulk(j)) for j in members])
    if key == keys.arq_queue():  # arq's queue of bulk steps: those not yet run
        return await redis.zcard(key) <= 1
    return None
