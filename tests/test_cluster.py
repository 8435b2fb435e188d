"""inferq on a real Redis Cluster: three masters (each with a replica) of the embedded server on loopback, a
URL naming one node, lanes split into three shard streams. Stand-in workers; every check reads Redis back."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis, RedisCluster

from inferq.producer import InferenceClient, RequestHandle
from inferq.producer.bulk.attached import BulkJob
from inferq.producer.ops import stats
from inferq.producer.ops.dead_letters import DeadLetters
from inferq.shared.codec import pack
from inferq.shared.connection import open_redis
from inferq.shared.errors import RedisUnavailable
from inferq.shared.keys import GROUP, LANES, Keys
from inferq.shared.settings import Settings
from tests.cluster import LocalCluster
from tests.conftest import MODELS_DIR, drained, wait_until

MODEL = "fake"
SHARDS = 3
FAST_CLAIMS = {"INFERQ_CLAIM_IDLE_MS": "1000", "INFERQ_HEARTBEAT_S": "0.2"}
STANDIN = ("--engine", "standin", "--model", MODEL)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    nodes = LocalCluster(tmp_path_factory.mktemp("cluster"), masters=3, replicas=1)
    nodes.start()
    yield nodes
    nodes.stop()


@pytest.fixture
def settings(cluster: LocalCluster, prefix: str) -> Settings:
    return Settings(
        redis_url=cluster.url, key_prefix=prefix, shards=SHARDS, data_dir=MODELS_DIR, model=MODEL, request_timeout_s=60
    )


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = await open_redis(settings)
    yield client
    await client.aclose()


async def test_a_node_url_is_enough_and_requests_spread_over_the_masters(
    cluster: LocalCluster, client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    assert isinstance(client.redis, RedisCluster)  # it asked the server, and took the cluster client
    via_replica = await open_redis(settings.model_copy(update={"redis_url": cluster.replicas[-1].url}))
    assert isinstance(via_replica, RedisCluster) and len(via_replica.get_primaries()) == 3  # any node will do
    await via_replica.aclose()
    start_worker(*STANDIN, "--max-inflight", "32")
    handles = [await client.submit(prompt=f"req {i}", model=MODEL, max_tokens=4 + i % 5) for i in range(90)]

    async def consume(h):  # type: ignore[no-untyped-def]
        return [e async for e in h.tokens()], await h.result(timeout=30)

    keys = Keys.of(settings)
    for h, (events, result) in zip(handles, await asyncio.gather(*(consume(h) for h in handles)), strict=True):
        n = 4 + int(h.request.prompt.split()[1]) % 5  # type: ignore[union-attr]
        assert [e.seq for e in events] == list(range(n))
        assert "".join(e.text for e in events) == result.text == "".join(f"t{i} " for i in range(n))
        assert (result.status, result.attempts) == ("done", 1)
    # Each shard's lanes sit on a master of their own, and the requests used every shard.
    cluster_redis: RedisCluster = redis  # type: ignore[assignment]
    owners = {cluster_redis.get_node_from_key(keys.queue(MODEL, "normal", s)).name for s in range(SHARDS)}
    assert len(owners) == SHARDS
    assert Counter(keys.shard_of(h.id) for h in handles).keys() == set(range(SHARDS))
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_status_sums_the_shards_and_a_worker_drains_them_highest_lane_first(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    low = [await client.submit(prompt="low", model=MODEL, max_tokens=1, priority="low") for _ in range(12)]
    high = [await client.submit(prompt="high", model=MODEL, max_tokens=1, priority="high") for _ in range(12)]
    keys = Keys.of(settings)
    report = (await stats.collect(redis, keys, [MODEL]))["models"][MODEL]
    assert {lane: report["lanes"][lane]["length"] for lane in LANES} == {"high": 12, "normal": 0, "low": 12}
    per_shard = [await redis.xlen(keys.queue(MODEL, "low", s)) for s in range(SHARDS)]
    assert sum(per_shard) == 12 and max(per_shard) < 12  # spread, and summed by status
    start_worker(*STANDIN, "--max-inflight", "1", env={"INFERQ_LANE_MIN_SHARE": "0"})
    results = {h.id: await h.result(timeout=30) for h in [*low, *high]}
    started = sorted(results, key=lambda i: results[i].timings.started_at or 0)
    assert set(started[:12]) == {h.id for h in high}  # every shard's high lane before any low one
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_cancel_and_deadline_end_requests_on_any_shard(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    expiring = [
        await client.submit(prompt=f"late {i}", model=MODEL, max_tokens=2, ttl=0.3, request_id=f"late-{i}")
        for i in range(6)
    ]  # fixed ids, so that which shards they land in is fixed too
    await asyncio.sleep(0.5)  # past their deadline before any worker exists: what is asserted is the state
    start_worker(*STANDIN)
    hanging = [await client.submit(prompt="hang", model=MODEL, max_tokens=5, request_id=f"hang-{i}") for i in range(6)]

    async def all_running() -> bool:
        return all([(await client.get(h.id)).status == "running" for h in hanging])

    await wait_until(all_running, 30, "the hanging requests to start")
    for h in hanging:
        await h.cancel()
    assert [(await h.result(timeout=30)).status for h in hanging] == ["cancelled"] * 6
    assert [(await h.result(timeout=30)).status for h in expiring] == ["expired"] * 6
    assert {Keys.of(settings).shard_of(h.id) for h in hanging + expiring} == set(range(SHARDS))
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_dead_letters_of_every_shard_listed_shown_and_purged(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    start_worker(*STANDIN)
    keys = Keys.of(settings)
    # Three in each shard (random ids left a shard without one about one run in twenty).
    ids = [i for shard in range(SHARDS) for i in itertools.islice(
        (f"dead-{n}" for n in itertools.count() if keys.shard_of(f"dead-{n}") == shard), 3)]  # fmt: skip
    failed = [await client.submit(prompt="fail", model=MODEL, max_tokens=2, request_id=i) for i in ids]
    assert [(await h.result(timeout=30)).status for h in failed] == ["failed"] * 9
    # A forged entry in the wrong shard's stream: refused, and nothing written in another slot.
    stray = next(f"stray-{i}" for i in range(100) if keys.shard_of(f"stray-{i}") != 0)
    entry = {"v": 1, "id": stray, "model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": False}
    await redis.xadd(keys.queue(MODEL, "normal", 0), {"m": pack(entry)})
    letters = DeadLetters(redis, keys, client._admitter, MODEL)

    async def ten_letters() -> bool:
        return await letters.size() == 10

    await wait_until(ten_letters, 30, "ten dead letters")
    assert not await redis.exists(keys.result(stray))
    listed = await letters.list(count=100)
    assert len(listed) == 10 and len({letter.id for letter in listed}) == 10
    assert {letter.id.rpartition("@")[2] for letter in listed} == {"0", "1", "2"}
    added = [tuple(int(n) for n in letter.id.partition("@")[0].split("-")) for letter in listed]
    assert added == sorted(added)  # in the order the shards' streams took them, all shards merged
    page = await letters.list(count=4)
    rest = await letters.list(count=100, after=page[-1].id)
    assert [x.id for x in page + rest] == [x.id for x in listed]  # paging across shards loses and repeats nothing
    shown = await letters.show(listed[0].id)
    assert shown.id == listed[0].id and "refuse" in shown.error
    assert await letters.purge() == 10 and await letters.size() == 0


async def test_an_attached_bulk_job_answers_every_line_once(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker, tmp_path: Path
) -> None:
    start_worker(*STANDIN)
    lines = tmp_path / "in.jsonl"
    lines.write_text("".join(json.dumps({"custom_id": f"c{i}", "prompt": f"line {i}", "max_tokens": 2}) + "\n"
                             for i in range(60)))  # fmt: skip
    out = tmp_path / "out.jsonl"
    job = BulkJob(client, lines, out, model=MODEL)
    progress = await job.run()
    assert (progress.total, progress.done, progress.failed, progress.invalid) == (60, 60, 0, 0)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert Counter(r["custom_id"] for r in records) == Counter(f"c{i}" for i in range(60))
    assert all(r["text"] == "t0 t1 " for r in records)
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_a_refused_token_channel_fails_that_request_only(
    cluster: LocalCluster, client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    """A worker whose Redis user may not publish to one client's channel (an operator's ACL mistake: NOPERM):
    as on one server (tests/test_ownership.py), that client's streamed requests end `failed` saying why and go to
    the DLQ, and the worker serves the others. Here a PUBLISH is no part of a transaction, so its refusal comes in
    its own reply."""
    keys = Keys.of(settings)
    user = f"{settings.key_prefix}-worker"
    rules = ["on", ">pw", f"~{settings.key_prefix}:*", f"&{keys.cancel()}", f"&{keys.tokens('[0-9a-f]*')}", "+@all"]
    live = [node for node in cluster.nodes if node not in cluster.dead]
    for node in live:  # each node keeps its own users
        cluster.client(node).execute_command("ACL", "SETUSER", user, *rules)
    try:
        narrow = (settings.redis_url or "").replace("redis://", f"redis://{user}:pw@")
        start_worker(*STANDIN, cfg=settings.model_copy(update={"redis_url": narrow}))
        async with InferenceClient(settings.model_copy(update={"tenant": "zed"})) as refused_client:
            before = await client.submit(prompt="hi", model=MODEL, max_tokens=4)
            refused = [await refused_client.submit(prompt="hi", model=MODEL, max_tokens=40) for _ in range(3)]
            assert "".join([event.text async for event in before.tokens()]) == "t0 t1 t2 t3 "
            for handle in refused:
                result = await handle.result(timeout=30)
                assert result.status == "failed", result
                assert "Redis refused" in (result.error or "") and "NOPERM" in (result.error or ""), result.error
                assert result.usage.completion_tokens < 40  # stopped, not run to its end for nobody
            # Unstreamed, it publishes only its final event, after its result landed: that result stands, and the
            # client, hearing nothing, reads it.
            quiet = await refused_client.submit(prompt="hi", model=MODEL, max_tokens=2, stream=False)
            assert (await quiet.result(timeout=30)).text == "t0 t1 "
            after = await client.submit(prompt="hi", model=MODEL, max_tokens=4)  # the worker goes on
            assert (await after.result(timeout=30)).text == "t0 t1 t2 t3 "
        letters = await client.dead_letters(MODEL).list()
        assert sorted(letter.request.id for letter in letters if letter.request) == sorted(h.id for h in refused)
        await client.dead_letters(MODEL).purge()
        assert await drained(redis, settings, MODEL) == (0, 0)
    finally:
        for node in live:
            cluster.client(node).execute_command("ACL", "DELUSER", user)


async def test_kill_9_of_a_worker_its_entries_taken_over_on_every_shard(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    victim = start_worker(*STANDIN, name="victim", env={**FAST_CLAIMS, "INFERQ_STANDIN_STEP_MS": "100"})
    handles = [await client.submit(prompt=f"r{i}", model=MODEL, max_tokens=30, stream=False) for i in range(30)]
    keys = Keys.of(settings)

    async def victim_runs_every_shard() -> bool:
        states = [await redis.hmget(keys.result(h.id), "status", "worker") for h in handles]
        shards = {keys.shard_of(h.id) for h, s in zip(handles, states, strict=True) if s == [b"running", b"victim"]}
        return shards == set(range(SHARDS))

    await wait_until(victim_runs_every_shard, 30, "the victim to run requests of every shard")
    victim.kill()
    start_worker(*STANDIN, name="survivor", env=FAST_CLAIMS)
    results = [await h.result(timeout=60) for h in handles]
    assert [r.status for r in results] == ["done"] * 30
    assert all(r.text == "".join(f"t{i} " for i in range(30)) for r in results)
    taken = [r for r in results if r.attempts > 1]
    assert taken and all(r.worker == "survivor" for r in taken)
    assert {keys.shard_of(r.id) for r in taken} == set(range(SHARDS))
    for h in handles:
        assert await redis.hget(keys.result(h.id), "duplicates") is None
    assert await drained(redis, settings, MODEL) == (0, 0)

    async def victim_removed() -> bool:
        names = set()
        for lanes in keys.all_queues(MODEL):
            for stream in lanes:
                if await redis.exists(stream):
                    names |= {c["name"] for c in await redis.xinfo_consumers(stream, GROUP)}
        return names == {b"survivor"}

    await wait_until(victim_removed, 30, "the dead worker to leave every shard's group")


async def resubmitting(client: InferenceClient, request_id: str) -> RequestHandle:
    """A submit as the client's RedisUnavailable says to make it: again, with the same id, until it lands (the
    first command after a failover meets the dead master's closed connection)."""
    for _ in range(50):
        try:
            return await client.submit(prompt=request_id, model=MODEL, max_tokens=3, request_id=request_id)
        except RedisUnavailable:
            await asyncio.sleep(0.2)
    raise AssertionError(f"{request_id} never landed")


async def test_a_killed_master_its_replica_takes_over_and_the_queue_goes_on(
    cluster: LocalCluster, client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    """Last in the module: it leaves the cluster with a master fewer replicas."""
    start_worker(*STANDIN)
    before = [await client.submit(prompt=f"before {i}", model=MODEL, max_tokens=3) for i in range(30)]
    assert [(await h.result(timeout=30)).status for h in before] == ["done"] * 30

    async def synced() -> bool:  # what is asserted below is what the replicas had: see CONTRACTS "Redis Cluster"
        return cluster.synced()

    await wait_until(synced, 30, "the replicas to have every write")
    cluster.kill(cluster.masters[0])
    await asyncio.to_thread(cluster.wait_promoted)  # its replica took over (cluster-node-timeout 2 s)
    after = [await resubmitting(client, f"after-{i}") for i in range(30)]
    assert [(await h.result(timeout=60)).text for h in after] == ["t0 t1 t2 "] * 30
    assert [(await client.get(h.id)).status for h in before] == ["done"] * 30  # nothing replicated was lost
    assert {Keys.of(settings).shard_of(h.id) for h in after} == set(range(SHARDS))
    assert await drained(redis, settings, MODEL) == (0, 0)
