"""Faults on real vLLM (tiny model): a worker killed mid-run, Redis killed and restarted, the engine core
dying, requests cancelled or expired inside the engine, poison around good work. Whatever happens, every
request that got an id ends in exactly one final state and nothing is left pending."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from redis.asyncio import Redis

from inferq.producer import InferenceClient, RequestHandle
from inferq.shared.codec import unpack
from inferq.shared.embedded import EmbeddedServer
from inferq.shared.errors import RedisUnavailable
from inferq.shared.keys import GROUP, Keys
from inferq.shared.schemas import Result
from inferq.shared.settings import Settings
from tests.conftest import MODELS_DIR, drained, free_port, wait_until

TINY = ("--model", "tiny", "--max-inflight", "64")
FAST_CLAIMS = {"INFERQ_CLAIM_IDLE_MS": "2000", "INFERQ_HEARTBEAT_S": "0.5"}


async def follow(handle: RequestHandle) -> tuple[str, Result]:
    """Stream a request (if it streams) and return the streamed text with the stored result."""
    text = ""
    if handle.request.stream:
        text = "".join([e.text async for e in handle.tokens(timeout=240)])
    return text, await handle.result(timeout=240)


def check_streams(pairs: list[tuple[RequestHandle, tuple[str, Result]]]) -> None:
    for handle, (streamed, result) in pairs:
        assert result.status == "done", (handle.id, result)
        if handle.request.stream and not handle.gap:
            assert streamed == result.text  # a clean stream matches the result; after a gap, the store rules


async def test_kill_one_of_two_workers_mid_run_loses_and_duplicates_nothing(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    keys = Keys(settings.key_prefix)
    stream, done = keys.queue("tiny"), keys.done("kill-test")
    victim = start_worker(*TINY, name="victim", env=FAST_CLAIMS)
    start_worker(*TINY, name="survivor", env=FAST_CLAIMS)
    handles = [
        await client.submit(
            prompt=f"Request {i} about queues", model="tiny", max_tokens=48, temperature=0,
            stream=i % 2 == 0, reply_stream=None if i % 2 == 0 else done,
        )
        for i in range(200)
    ]  # fmt: skip
    followers = [asyncio.create_task(follow(h)) for h in handles]

    async def victim_running() -> bool:
        # Started (start.lua ran: attempt 1), not merely read: a request the victim read but never started is
        # started by the survivor as attempt 1, and the kill would then show no take-over at all.
        async with redis.pipeline(transaction=False) as pipe:
            for h in handles:
                pipe.hmget(keys.result(h.id), "status", "worker")
            states = await pipe.execute()
        return [b"running", b"victim"] in states

    await wait_until(victim_running, 60, "the victim worker to run a request")
    victim.kill()
    pairs = list(zip(handles, await asyncio.gather(*followers), strict=True))
    check_streams(pairs)
    # Exactly one result each: one durable record per non-streaming request, no second final write.
    records = Counter(unpack(f[b"m"])["id"] for _, f in await redis.xrange(done))
    assert records == Counter(h.id for h in handles if not h.request.stream)
    for h in handles:
        assert await redis.hget(keys.result(h.id), "duplicates") is None
    taken_over = [r for _, (_, r) in pairs if r.attempts > 1]
    assert taken_over and all(r.worker == "survivor" for r in taken_over)
    assert await drained(redis, settings, "tiny") == (0, 0)

    async def victim_removed() -> bool:
        return {c["name"] for c in await redis.xinfo_consumers(stream, GROUP)} == {b"survivor"}

    await wait_until(victim_removed, 30, "the dead worker to leave the group")


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(tmp_path / "valkey", free_port())
    server.start()
    yield server
    server.stop()


async def test_redis_killed_and_restarted_mid_run_every_admitted_request_ends(
    own_server: EmbeddedServer, tmp_path: Path, start_worker
) -> None:
    settings = Settings(redis_url=own_server.url, key_prefix="restart", data_dir=MODELS_DIR, request_timeout_s=240)
    worker = start_worker(*TINY, cfg=settings, env=FAST_CLAIMS)
    admitted: list[RequestHandle] = []
    refused = 0
    async with InferenceClient(settings) as client:

        async def submit(i: int) -> None:
            nonlocal refused
            try:
                admitted.append(
                    await client.submit(
                        prompt=f"Restart {i}", model="tiny", max_tokens=40, temperature=0, stream=i % 2 == 0
                    )
                )
            except RedisUnavailable:
                refused += 1

        for i in range(60):
            await submit(i)
        followers = [asyncio.create_task(follow(h)) for h in admitted]
        pid = own_server.pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        for i in range(60, 65):  # the server is down: these are refused with a clear error, not lost
            await submit(i)
        await asyncio.to_thread(own_server.start)  # same dir, same AOF
        for i in range(65, 100):
            await submit(i)
        followers += [asyncio.create_task(follow(h)) for h in admitted[len(followers) :]]
        pairs = list(zip(admitted, await asyncio.gather(*followers), strict=True))
        check_streams(pairs)
        assert refused >= 5 and len(admitted) == 100 - refused
        assert worker.proc.poll() is None, "the worker must survive the outage"
        after = await client.generate(prompt="after the restart", model="tiny", max_tokens=4, timeout=120)
        assert after.status == "done"
    async with Redis.from_url(own_server.url) as r:
        assert await drained(r, settings, "tiny") == (0, 0)


def engine_core_pids(worker_pid: int) -> list[int]:
    """The worker's child processes (vLLM's engine core is spawned as one)."""
    return [child.pid for child in psutil.Process(worker_pid).children()]


async def test_engine_core_death_stops_the_worker_and_leaves_work_pending(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    stream = Keys(settings.key_prefix).queue("tiny")
    worker = start_worker(*TINY)
    handles = [await client.submit(prompt=f"long {i}", model="tiny", max_tokens=1500) for i in range(4)]
    for h in handles:
        await h.tokens(timeout=120).__anext__()  # all running in the engine
    cores = engine_core_pids(worker.proc.pid)
    assert cores, "vLLM's engine core child process not found"
    for pid in cores:
        os.kill(pid, signal.SIGKILL)
    assert await asyncio.to_thread(worker.wait, 120) == 1
    assert "ENGINE FAILED" in worker.log()
    pending = {c["name"]: c["pending"] for c in await redis.xinfo_consumers(stream, GROUP)}
    assert pending == {b"w0": 4}  # nothing acknowledged: another worker will take them over
    assert {(await client.get(h.id)).status for h in handles} == {"running"}


async def test_worker_holds_fewer_requests_under_kv_cache_pressure_and_recovers(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    # A 2 MiB KV cache holds ~1,000 tokens of the tiny model: 24 requests of ~300 tokens cannot all fit.
    worker = start_worker(
        "--model", "tiny", "--max-inflight", "24", "--max-model-len", "512",
        env={"INFERQ_KV_CACHE_GIB": "0.002", "INFERQ_HEARTBEAT_S": "0.3"},
    )  # fmt: skip
    beat = Keys(settings.key_prefix).worker("w0")
    handles = [
        await client.submit(prompt=f"Pressure {i}", model="tiny", max_tokens=300, temperature=0, stream=False)
        for i in range(24)
    ]

    async def slots() -> int:
        return int(await redis.hget(beat, "slots") or 0)

    async def lowered() -> bool:
        return 0 < await slots() < 24

    await wait_until(lowered, 180, "the worker to take fewer requests under KV-cache pressure")
    results = [await h.result(timeout=300) for h in handles]
    assert all(r.status == "done" and r.usage.completion_tokens == 300 for r in results)

    async def recovered() -> bool:
        return await slots() == 24

    await wait_until(recovered, 60, "the slot count to come back once the cache has room")
    assert "engine load: now taking up to" in worker.log()
    assert await drained(redis, settings, "tiny") == (0, 0)
