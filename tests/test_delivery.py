"""Delivery guarantees with the deterministic stand-in engine (queue logic; the engine-facing faults run on
real vLLM in test_faults.py): takeover, max_deliveries, claims, idempotency, cancellation, deadlines,
shutdown, dead letters. Every request must end in exactly one final state and leave nothing in Redis."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from redis.asyncio import Redis

from inferq.producer import InferenceClient
from inferq.shared.codec import pack, unpack
from inferq.shared.errors import RequestNotFound
from inferq.shared.keys import GROUP, Keys
from inferq.shared.settings import Settings
from tests.conftest import drained, wait_until

MODEL = "fake"
FAST_CLAIMS = {"INFERQ_CLAIM_IDLE_MS": "1000", "INFERQ_HEARTBEAT_S": "0.2"}


def standin(*extra: str) -> tuple[str, ...]:
    return ("--engine", "standin", "--model", MODEL, *extra)


async def consumers(redis: Redis, stream: str) -> dict[str, int]:
    return {c["name"].decode(): int(c["pending"]) for c in await redis.xinfo_consumers(stream, GROUP)}


async def test_dead_consumers_entries_are_taken_over_and_the_consumer_removed(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    stream = Keys(settings.key_prefix).queue(MODEL)
    handles = [await client.submit(prompt=f"p{i}", model=MODEL, max_tokens=3) for i in range(3)]
    # A worker that read them and died before running them: they sit in its pending list.
    await redis.xreadgroup(GROUP, "ghost", {stream: ">"}, count=10)
    assert await consumers(redis, stream) == {"ghost": 3}
    start_worker(*standin(), env=FAST_CLAIMS)
    results = [await h.result(timeout=30) for h in handles]
    assert [(r.status, r.text, r.attempts, r.worker) for r in results] == [("done", "t0 t1 t2 ", 1, "w0")] * 3

    async def ghost_gone() -> bool:
        return "ghost" not in await consumers(redis, stream)

    await wait_until(ghost_gone, 30, "the dead consumer to be removed from the group")
    assert await consumers(redis, stream) == {"w0": 0}
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_entry_delivered_more_than_max_deliveries_is_dead_lettered_then_retried(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    keys = Keys(settings.key_prefix)
    stream = keys.queue(MODEL)
    handle = await client.submit(prompt="crashes its workers", model=MODEL, max_tokens=2, stream=False)
    # Two workers took it and died (deliveries 1, 2); the next takeover is delivery 3 > max_deliveries=2.
    [[_, [(entry_id, _)]]] = await redis.xreadgroup(GROUP, "ghost-1", {stream: ">"})
    await redis.xclaim(stream, GROUP, "ghost-2", 0, [entry_id])
    start_worker(*standin(), env={**FAST_CLAIMS, "INFERQ_MAX_DELIVERIES": "2"})
    failed = await handle.result(timeout=30)
    assert failed.status == "failed" and "delivered 3 times without finishing (max_deliveries=2)" in (
        failed.error or ""
    )
    letters = client.dead_letters(MODEL)
    [letter] = await letters.list()
    assert (letter.deliveries, letter.entry_id, letter.stream) == (3, entry_id.decode(), stream)
    assert letter.request is not None and letter.request.id == handle.id
    assert await drained(redis, settings, MODEL) == (0, 0)

    # Retry: the original payload again, same id; the failed result is replaced and the letter removed.
    assert await letters.retry(letter.id) == handle.id
    assert await letters.size() == 0
    with pytest.raises(RequestNotFound, match="no dead letter"):  # a second retry of the same letter
        await letters.retry(letter.id)

    async def done() -> bool:
        return (await client.get(handle.id)).status == "done"

    await wait_until(done, 30, "the retried request to finish")
    result = await client.get(handle.id)
    assert (result.text, result.attempts, result.error) == ("t0 t1 ", 1, None)
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_long_generation_is_never_taken_over_while_its_worker_lives(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    # ~3.5 s of generation against a 1 s claim window and a second worker looking for idle entries.
    start_worker(*standin(), env=FAST_CLAIMS)
    start_worker(*standin(), env=FAST_CLAIMS)
    handle = await client.submit(prompt="long", model=MODEL, max_tokens=3000)
    events = [e async for e in handle.tokens(timeout=60)]
    result = await handle.result(timeout=60)
    assert [e.seq for e in events] == list(range(3000)) and not handle.gap
    assert (result.status, result.usage.completion_tokens, result.attempts) == ("done", 3000, 1)
    assert await redis.hget(Keys(settings.key_prefix).result(handle.id), "duplicates") is None
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_same_request_id_twice_is_one_request_with_one_result(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    first = await client.submit(prompt="once", model=MODEL, max_tokens=2, request_id="order-42", stream=False)
    second = await client.submit(prompt="once", model=MODEL, max_tokens=2, request_id="order-42")
    assert await redis.xlen(Keys(settings.key_prefix).queue(MODEL)) == 1
    start_worker(*standin())
    a, b = await first.result(timeout=30), await second.result(timeout=30)
    assert a == b and a.status == "done" and a.attempts == 1
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_cancelled_queued_request_is_skipped_and_never_run(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    handle = await client.submit(prompt="never mind", model=MODEL, max_tokens=5)
    done = Keys(settings.key_prefix).done("job-c")
    bulk = await client.submit(
        prompt="bulk line", model=MODEL, max_tokens=5, stream=False, reply_stream=done, tag="line 7"
    )
    assert await bulk.cancel() == "cancelled"
    assert await handle.cancel() == "cancelled"
    assert (await client.get(handle.id)).status == "cancelled"  # final at once, before any worker
    later = await client.submit(prompt="next", model=MODEL, max_tokens=1)
    start_worker(*standin())
    assert (await later.result(timeout=30)).status == "done"  # read after the cancelled one
    events = [e async for e in handle.tokens(timeout=30)]
    assert all(e.finish_reason == "cancelled" for e in events if e.finished)
    result = await handle.result(timeout=30)
    assert (result.status, result.finish_reason, result.attempts, result.text) == ("cancelled", "cancelled", 0, "")
    assert await client.cancel(handle.id) == "cancelled"  # cancelling again changes nothing
    # A bulk collector still gets its one record, written when a worker acknowledged the entry.
    [(_, fields)] = await redis.xrange(done)
    record = unpack(fields[b"m"])
    assert (record["id"], record["status"], record["tag"]) == (bulk.id, "cancelled", "line 7")  # tag kept
    assert (await bulk.result(timeout=30)).status == "cancelled"
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_an_unstreamed_request_that_ended_while_queued_stops_once_its_start_answers(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    """An unstreamed request's start is not awaited (docs/CONTRACTS.md, "Delivery"): its run begins at once, and the
    start's answer stops it. "hang" never yields a token, so only that answer ends this run: without it the entry
    would stay pending until the watchdog (an hour)."""
    hung = await client.submit(prompt="hang", model=MODEL, max_tokens=5, stream=False)
    assert await hung.cancel() == "cancelled"  # before any worker: final at once, no one hears the broadcast
    start_worker(*standin())

    async def acknowledged() -> bool:
        return await drained(redis, settings, MODEL) == (0, 0)

    await wait_until(acknowledged, 30, "the cancelled entry to be acknowledged")
    result = await hung.result(timeout=10)
    assert (result.status, result.worker, result.attempts, result.text) == ("cancelled", None, 0, "")
    assert await redis.xlen(Keys.of(settings).dlq(MODEL)) == 0


async def test_cancel_running_request_ends_stream_with_cancelled(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    start_worker(*standin())
    handle = await client.submit(prompt="go on forever", model=MODEL, max_tokens=20_000)
    events = handle.tokens(timeout=60)
    seen = [await events.__anext__()]
    assert await client.cancel(handle.id) == "running"  # the worker aborts it
    seen += [e async for e in events]
    assert seen[-1].finished and seen[-1].finish_reason == "cancelled" and seen[-1].status == "cancelled"
    assert [e.seq for e in seen] == list(range(len(seen)))
    result = await handle.result(timeout=30)
    assert result.status == "cancelled" and 0 < result.usage.completion_tokens < 20_000
    assert result.text == "".join(e.text for e in seen) and result.text.startswith("t0 ")
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_deadline_passed_in_queue_expires_without_running(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    handle = await client.submit(prompt="too late", model=MODEL, max_tokens=5, ttl=0.2)
    await asyncio.sleep(0.3)  # time must pass: the deadline is the point of the test
    start_worker(*standin())
    result = await handle.result(timeout=30)
    assert (result.status, result.finish_reason, result.attempts, result.text) == ("expired", "expired", 0, "")
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_deadline_reached_while_running_expires_with_partial_text(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    start_worker(*standin())
    handle = await client.submit(prompt="slow", model=MODEL, max_tokens=20_000, ttl=1.0, stream=False)
    result = await handle.result(timeout=30)
    assert (result.status, result.finish_reason, result.attempts) == ("expired", "expired", 1)
    assert 0 < result.usage.completion_tokens < 20_000 and result.text.startswith("t0 t1 ")
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_second_signal_exits_at_once_leaving_work_pending_for_others(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    stream = Keys(settings.key_prefix).queue(MODEL)
    first = start_worker(*standin(), env=FAST_CLAIMS)
    handles = [await client.submit(prompt=f"long {i}", model=MODEL, max_tokens=20_000) for i in range(3)]
    for h in handles:
        await h.tokens(timeout=30).__anext__()  # all three are running
    first.signal(signal.SIGTERM)
    first.signal(signal.SIGINT)
    assert await asyncio.to_thread(first.wait, 30) == 0
    assert "second signal" in first.log()
    assert await consumers(redis, stream) == {"w0": 3}  # left pending, not acknowledged
    assert {(await client.get(h.id)).status for h in handles} == {"running"}
    for h in handles:
        await client.cancel(h.id)  # the next worker takes them over and ends them cancelled
    start_worker(*standin(), env=FAST_CLAIMS)
    results = [await h.result(timeout=30) for h in handles]
    assert {r.status for r in results} == {"cancelled"}
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_engine_death_stops_the_worker_and_leaves_work_pending(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    stream = Keys(settings.key_prefix).queue(MODEL)
    worker = start_worker(*standin())
    running = await client.submit(prompt="long", model=MODEL, max_tokens=20_000)
    await running.tokens(timeout=30).__anext__()
    await client.submit(prompt="die", model=MODEL, max_tokens=1)
    assert await asyncio.to_thread(worker.wait, 30) == 1
    assert "ENGINE FAILED" in worker.log()
    assert (await consumers(redis, stream))["w0"] == 2  # both pending for the next worker
    assert (await client.get(running.id)).status == "running"


async def test_reply_stream_gets_one_record_per_request_even_when_taken_over(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    keys = Keys(settings.key_prefix)
    done = keys.done("job-7")
    handles = [
        await client.submit(prompt=f"line {i}", model=MODEL, max_tokens=2, stream=False, reply_stream=done)
        for i in range(20)
    ]
    await redis.xreadgroup(GROUP, "ghost", {keys.queue(MODEL): ">"}, count=7)
    start_worker(*standin(), env=FAST_CLAIMS)
    results = [await h.result(timeout=30) for h in handles]
    assert {r.status for r in results} == {"done"}
    ids = [unpack(fields[b"m"])["id"] for _, fields in await redis.xrange(done)]
    assert sorted(ids) == sorted(h.id for h in handles)
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_same_entry_id_in_two_lanes_runs_both(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    keys = Keys(settings.key_prefix)
    twin_id = f"{int(time.time() * 1000)}-1"  # an entry id starts with the time it was added (its wait counts)
    for lane in ("high", "normal"):  # ids are unique per stream only: two lanes can hand out the same one
        stream = keys.queue(MODEL, lane)
        await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        payload = {"v": 1, "id": f"twin-{lane}", "model": MODEL, "prompt": "twin", "max_tokens": 2}
        await redis.xadd(stream, {"m": pack(payload)}, id=twin_id)
    start_worker(*standin("--max-inflight", "4"))

    async def both_done() -> bool:
        # Entries were added behind the client's back, so a result hash exists only once the worker has one.
        statuses = [await redis.hget(keys.result(f"twin-{lane}"), "status") for lane in ("high", "normal")]  # type: ignore[misc]
        return statuses == [b"done", b"done"]

    await wait_until(both_done, 30, "both twins to finish")
    assert [(await client.get(f"twin-{lane}")).usage.completion_tokens for lane in ("high", "normal")] == [2, 2]
    assert await drained(redis, settings, MODEL) == (0, 0)
