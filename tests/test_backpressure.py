"""Backpressure and priority with the stand-in engine: bounded lanes, QueueFull with a retry-after, waiting
producers, priority lanes with a floor for the lower ones, per-tenant caps, the admission script racing
at the cap, and the numbers `inferq status` shows."""

from __future__ import annotations

import asyncio
import json

import pytest
from redis.asyncio import Redis

from inferq.producer import InferenceClient
from inferq.shared.errors import QueueFull
from inferq.shared.keys import GROUP, Keys, group_counts
from inferq.shared.settings import Settings
from tests.conftest import drained
from tests.test_cli import inferq

MODEL = "fake"


def standin(*extra: str) -> tuple[str, ...]:
    return ("--engine", "standin", "--model", MODEL, *extra)


async def test_flood_of_producers_never_grows_a_lane_past_its_cap(
    settings: Settings, redis: Redis, start_worker
) -> None:
    cfg = settings.merged(max_queue_len=100)
    stream = Keys(settings.key_prefix).queue(MODEL)
    start_worker(*standin("--max-inflight", "8"))
    admitted, refusals = [], []
    sizes: list[int] = []
    flooding = True

    async def sample() -> None:
        while flooding:
            sizes.append(await redis.xlen(stream))
            await asyncio.sleep(0.002)

    clients = [InferenceClient(cfg) for _ in range(20)]
    for c in clients:
        await c.start()

    async def producer(n: int) -> None:
        for i in range(60):
            try:
                admitted.append(await clients[n].submit(prompt=f"{n}-{i}", model=MODEL, max_tokens=20, stream=False))
            except QueueFull as exc:
                refusals.append(exc)

    sampler = asyncio.create_task(sample())
    await asyncio.gather(*(producer(n) for n in range(20)))
    flooding = False
    await sampler
    assert max(sizes) <= 100 and len(sizes) > 10
    assert refusals and all(r.retry_after_s > 0 and r.queue_len >= 100 for r in refusals)
    assert len(admitted) + len(refusals) == 1200
    results = [await h.result(timeout=60) for h in admitted]  # every admitted request completes
    assert {r.status for r in results} == {"done"} and len({r.id for r in results}) == len(admitted)
    for c in clients:
        await c.close()
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_waiting_producers_all_get_through_once_the_worker_drains(
    settings: Settings, redis: Redis, start_worker
) -> None:
    cfg = settings.merged(max_queue_len=10)
    start_worker(*standin("--max-inflight", "4"))

    async def producer(n: int) -> list[str]:
        async with InferenceClient(cfg) as client:
            handles = [
                await client.submit(prompt=f"{n}-{i}", model=MODEL, max_tokens=30, wait=True, wait_timeout=60)
                for i in range(10)
            ]
            return [(await h.result(timeout=60)).status for h in handles]

    statuses = await asyncio.gather(*(producer(n) for n in range(5)))
    assert [s for batch in statuses for s in batch] == ["done"] * 50
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_high_lane_starts_first_and_lower_lanes_still_progress(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    handles = {lane: [] for lane in ("low", "normal", "high")}
    for lane in handles:  # low queued first: order of arrival must not beat priority
        for i in range(30):
            handles[lane].append(
                await client.submit(prompt=f"{lane} {i}", model=MODEL, max_tokens=3, priority=lane, stream=False)
            )
    start_worker(*standin("--max-inflight", "1"), env={"INFERQ_LANE_MIN_SHARE": "0.1"})
    started = []
    for lane, hs in handles.items():
        for h in hs:
            result = await h.result(timeout=60)
            assert result.status == "done"
            started.append((result.timings.started_at, lane))
    first = [lane for _, lane in sorted(started)[:30]]
    assert first.count("high") >= 22  # the high lane gets the lion's share while it has work ...
    assert first.count("normal") >= 2 and first.count("low") >= 2  # ... and the others their floor
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_tenant_at_its_cap_is_refused_while_another_is_admitted(
    settings: Settings, redis: Redis, start_worker
) -> None:
    cfg = settings.merged(tenant_cap=3)
    keys = Keys(settings.key_prefix)
    async with InferenceClient(cfg) as client:
        mine = [await client.submit(prompt=f"a{i}", model=MODEL, max_tokens=2, tenant="acme") for i in range(3)]
        with pytest.raises(QueueFull) as refused:
            await client.submit(prompt="a3", model=MODEL, max_tokens=2, tenant="acme")
        assert refused.value.tenant == "acme" and "tenant 'acme' is at its cap" in str(refused.value)
        other = await client.submit(prompt="b0", model=MODEL, max_tokens=2, tenant="globex")
        assert await redis.hgetall(keys.tenants(MODEL)) == {b"acme": b"3", b"globex": b"1"}
        start_worker(*standin())
        for h in [*mine, other]:
            assert (await h.result(timeout=30)).status == "done"
        assert await redis.hgetall(keys.tenants(MODEL)) == {}  # released as each request was acknowledged
        again = await client.submit(prompt="a4", model=MODEL, max_tokens=2, tenant="acme")
        assert (await again.result(timeout=30)).status == "done"
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_admissions_racing_at_cap_minus_one_never_pass_the_cap(settings: Settings, redis: Redis) -> None:
    cfg = settings.merged(max_queue_len=50)
    stream = Keys(settings.key_prefix).queue(MODEL)
    async with InferenceClient(cfg) as client:
        for i in range(49):
            await client.submit(prompt=f"fill {i}", model=MODEL, max_tokens=1)
    clients = [InferenceClient(cfg) for _ in range(4)]
    for c in clients:
        await c.start()
    outcomes = await asyncio.gather(
        *(c.submit(prompt=f"race {i}", model=MODEL, max_tokens=1) for c in clients for i in range(50)),
        return_exceptions=True,
    )
    for c in clients:
        await c.close()
    assert sum(not isinstance(o, BaseException) for o in outcomes) == 1
    assert all(isinstance(o, QueueFull) for o in outcomes if isinstance(o, BaseException))
    assert await redis.xlen(stream) == 50


async def test_group_counts_read_pending_and_lag_and_fall_back_where_redis_cannot_tell_the_lag(
    settings: Settings, redis: Redis
) -> None:
    stream = Keys(settings.key_prefix).queue(MODEL)
    assert group_counts(await redis.xinfo_groups(stream) if await redis.exists(stream) else []) is None
    await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    ids = [await redis.xadd(stream, {"m": b"-"}) for _ in range(5)]
    await redis.xreadgroup(GROUP, "w", {stream: ">"}, count=2)
    assert group_counts(await redis.xinfo_groups(stream), 5) == (2, 3)  # Redis's own lag
    await redis.xdel(stream, ids[-1])  # an entry the group never read: Redis no longer knows the lag
    groups = await redis.xinfo_groups(stream)
    assert groups[0]["lag"] is None
    assert group_counts(groups, await redis.xlen(stream)) == (2, 2)  # length less pending
    assert group_counts(groups) == (2, None)  # no length: unknown, said so


async def test_status_shows_lanes_workers_and_dead_letters(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    start_worker(*standin("--max-inflight", "2"))
    running = [await client.submit(prompt=f"long {i}", model=MODEL, max_tokens=20_000) for i in range(2)]
    for h in running:
        await h.tokens(timeout=30).__anext__()
    await client.submit(prompt="waits", model=MODEL, max_tokens=1, priority="low")
    await redis.xadd(Keys(settings.key_prefix).dlq(MODEL), {"payload": b"x", "error": "boom"})
    report = (await client.stats())["models"][MODEL]
    normal, low = report["lanes"]["normal"], report["lanes"]["low"]
    assert (normal["length"], normal["pending"], normal["lag"]) == (2, 2, 0)
    assert (low["length"], low["pending"], low["lag"]) == (1, 0, 1)
    assert normal["oldest_pending_s"] is not None and normal["oldest_pending_s"] >= 0
    assert [(c["name"], c["pending"]) for c in normal["consumers"]] == [("w0", 2)]
    assert report["dlq"] == 1
    [w] = report["workers"]
    assert (w["name"], w["capacity"], w["slots"], w["engine"]) == ("w0", 2, 2, "standin")

    out = await inferq(settings, "status", "--json")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)["models"][MODEL]
    assert shown["lanes"]["low"]["length"] == 1 and shown["dlq"] == 1
    table = await inferq(settings, "status")
    assert table.returncode == 0 and MODEL in table.stdout and "w0" in table.stdout
    for h in running:
        await h.cancel()


async def test_lag_cap_refuses_when_too_much_is_unread(settings: Settings, redis: Redis) -> None:
    cfg = settings.merged(max_lag=3)
    async with InferenceClient(cfg) as client:
        for i in range(3):
            await client.submit(prompt=f"unread {i}", model=MODEL, max_tokens=1)
        with pytest.raises(QueueFull) as refused:
            await client.submit(prompt="one too many", model=MODEL, max_tokens=1)
    assert (refused.value.queue_len, refused.value.lag) == (3, 3) and "3 unread" in str(refused.value)
    assert await redis.xlen(Keys(settings.key_prefix).queue(MODEL)) == 3


async def test_each_lane_has_its_own_cap(settings: Settings, redis: Redis) -> None:
    cfg = settings.merged(lane_caps={"low": 2})
    async with InferenceClient(cfg) as client:
        for i in range(2):
            await client.submit(prompt=f"low {i}", model=MODEL, max_tokens=1, priority="low")
        with pytest.raises(QueueFull):
            await client.submit(prompt="low 2", model=MODEL, max_tokens=1, priority="low")
        for i in range(3):  # the normal lane keeps max_queue_len
            await client.submit(prompt=f"normal {i}", model=MODEL, max_tokens=1)
    keys = Keys(settings.key_prefix)
    assert (await redis.xlen(keys.queue(MODEL, "low")), await redis.xlen(keys.queue(MODEL))) == (2, 3)


def test_lane_caps_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="unknown lane 'urgent'"):
        Settings(lane_caps={"urgent": 5})
