"""The worker's queue logic with the deterministic stand-in engine (the engine-facing paths are tested on
real vLLM in test_vllm.py): delivery, ordering, poison input, reply streams, batching, shutdown."""

from __future__ import annotations

import asyncio
import signal

import msgpack
from redis.asyncio import Redis

from inferq.producer import InferenceClient
from inferq.producer.client import QUIET_S
from inferq.shared.codec import pack, unpack
from inferq.shared.keys import Keys
from inferq.shared.settings import Settings
from inferq.worker.consumer import Worker
from inferq.worker.standin import StandInEngine
from tests.conftest import drained, wait_until

MODEL = "fake"


async def test_concurrent_streams_arrive_complete_and_in_order(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    start_worker("--engine", "standin", "--model", MODEL, "--max-inflight", "32")
    handles = [await client.submit(prompt=f"req {i}", model=MODEL, max_tokens=5 + i % 7) for i in range(60)]

    async def consume(h):  # type: ignore[no-untyped-def]
        events = [e async for e in h.tokens()]
        return events, await h.result(timeout=30)

    for h, (events, result) in zip(handles, await asyncio.gather(*(consume(h) for h in handles)), strict=True):
        n = 5 + int(h.request.prompt.split()[1]) % 7  # type: ignore[union-attr]
        assert [e.seq for e in events] == list(range(n))
        assert [e.finished for e in events] == [False] * (n - 1) + [True]
        assert "".join(e.text for e in events) == result.text == "".join(f"t{i} " for i in range(n))
        assert (result.status, result.finish_reason, result.usage.completion_tokens) == ("done", "length", n)
        assert result.usage.prompt_tokens == 2 and result.attempts == 1 and result.worker == "w0"
        t = result.timings
        assert t.queued_at <= t.started_at <= t.first_token_at <= t.finished_at  # type: ignore[operator]
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_a_stream_read_late_still_yields_every_event(
    client: InferenceClient, settings: Settings, start_worker
) -> None:
    """A caller that starts reading tokens() only after the request ended (busy elsewhere: the events wait in its
    queue) gets every event: time that passed before it read is not mistaken for silence from the worker."""
    handle = await client.submit(prompt="late reader", model=MODEL, max_tokens=4)
    await asyncio.sleep(3 * QUIET_S)  # queued longer than tokens() waits before asking the store, with no worker yet
    start_worker("--engine", "standin", "--model", MODEL)

    async def ended() -> bool:
        return (await client.get(handle.id)).final

    await wait_until(ended, 30, "the request to end")
    events = [e async for e in handle.tokens()]
    assert [e.seq for e in events] == [0, 1, 2, 3] and not handle.gap
    assert "".join(e.text for e in events) == (await handle.result(timeout=5)).text == "t0 t1 t2 t3 "


async def test_non_streaming_and_reply_stream(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    start_worker("--engine", "standin", "--model", MODEL)
    done_stream = Keys(settings.key_prefix).done("job1")
    handle = await client.submit(prompt="bulk line", model=MODEL, max_tokens=3, stream=False, reply_stream=done_stream)
    result = await handle.result(timeout=30)
    assert result.text == "t0 t1 t2 "
    records = await redis.xrange(done_stream)
    assert len(records) == 1
    record = unpack(records[0][1][b"m"])
    assert (record["id"], record["status"], record["text"], record["completion_tokens"]) == (
        handle.id,
        "done",
        "t0 t1 t2 ",
        3,
    )
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_poison_entries_fail_with_reason_and_worker_keeps_serving(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    keys = Keys(settings.key_prefix)
    stream = keys.queue(MODEL)
    await redis.xgroup_create(stream, "workers", id="0", mkstream=True)
    good = {"v": 1, "model": MODEL, "prompt": "ok", "max_tokens": 2}
    await redis.xadd(stream, {"m": b"\xc1 not msgpack"})
    await redis.xadd(stream, {"m": msgpack.packb({**good, "id": "wrong-version", "v": 9})})
    await redis.xadd(
        stream, {"m": msgpack.packb({k: v for k, v in good.items() if k != "prompt"} | {"id": "no-prompt"})}
    )
    await redis.xadd(stream, {"other": b"field"})
    await redis.xadd(stream, {"m": pack({**good, "id": "engine-refuses", "prompt": "fail"})})
    await redis.xadd(stream, {"m": pack({**good, "id": "engine-raises", "prompt": "crash"})})
    before = await client.submit(prompt="good before", model=MODEL, max_tokens=2)
    start_worker("--engine", "standin", "--model", MODEL)
    after = await client.submit(prompt="good after", model=MODEL, max_tokens=2)
    assert (await before.result(timeout=30)).status == "done"
    assert (await after.result(timeout=30)).status == "done"

    refused = await client.get("engine-refuses")
    assert refused.status == "failed" and "stand-in engine refuses" in (refused.error or "")
    raised = await client.get("engine-raises")
    assert raised.status == "failed" and "engine error: RuntimeError: stand-in engine crashed" in (raised.error or "")
    # An entry that decodes but fails validation still has a usable id: its result ends `failed` too.
    wrong = await client.get("wrong-version")
    assert wrong.status == "failed" and "unsupported schema version 9" in (wrong.error or "")
    assert (await client.get("no-prompt")).status == "failed"
    # Undecodable bytes have no id to trust, so only the DLQ records those.
    dlq = await redis.xrange(keys.dlq(MODEL))
    reasons = [fields[b"error"].decode() for _, fields in dlq]
    assert len(reasons) == 6
    assert any("undecodable msgpack" in r for r in reasons)
    assert any("unsupported schema version 9" in r for r in reasons)
    assert any("exactly one of prompt or messages" in r for r in reasons)
    assert any("no 'm' field" in r for r in reasons)
    assert any("stand-in engine refuses" in r for r in reasons)
    assert any("stand-in engine crashed" in r for r in reasons)
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_worker_reads_no_more_than_its_free_slots(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    handles = [await client.submit(prompt=f"p{i}", model=MODEL, max_tokens=400, stream=False) for i in range(6)]
    start_worker("--engine", "standin", "--model", MODEL, "--max-inflight", "2")
    stream = Keys(settings.key_prefix).queue(MODEL)
    # While the first two run (400 steps of 1 ms), the worker owns exactly two entries.
    for _ in range(200):
        pending = (await redis.xpending(stream, "workers"))["pending"]
        if pending:
            break
        await asyncio.sleep(0.01)
    assert pending == 2
    results = [await h.result(timeout=60) for h in handles]
    assert all(r.status == "done" for r in results)
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_a_worker_fills_its_free_slots_read_batch_at_a_time(
    settings: Settings, client: InferenceClient, redis: Redis
) -> None:
    """10 queued, 10 free slots, read_batch 4: three reads of 4, 4 and 2, back to back (each read's entries start
    while the next read runs), and the worker holds all 10."""
    handles = [await client.submit(prompt=f"p{i}", model=MODEL, max_tokens=1000, stream=False) for i in range(10)]
    conn = Redis.from_url(settings.redis_url or "")
    worker = Worker(settings.merged(max_inflight=10, read_batch=4), StandInEngine(step_s=0.001), conn, model=MODEL)
    reads: list[tuple[int, int]] = []  # (free slots asked for, entries read)
    three = asyncio.Event()
    read = worker.reader.read

    async def recorded(free: int):  # type: ignore[no-untyped-def]
        entries = await read(free)
        reads.append((free, len(entries)))
        if len(reads) == 3:
            three.set()
        return entries

    worker.reader.read = recorded  # type: ignore[method-assign]
    async with worker:
        runner = asyncio.create_task(worker.run())
        await asyncio.wait_for(three.wait(), 10)
        assert reads[:3] == [(4, 4), (4, 4), (2, 2)]
        assert (await redis.xpending(Keys(settings.key_prefix).queue(MODEL), "workers"))["pending"] == 10
        results = await asyncio.gather(*(h.result(timeout=30) for h in handles))
        worker.stop_reading()
        await runner
        await worker.drain(5)
    await conn.aclose()
    assert [r.status for r in results] == ["done"] * 10
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_sigterm_drains_in_flight_then_exits_zero(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    worker = start_worker("--engine", "standin", "--model", MODEL)
    handle = await client.submit(prompt="long", model=MODEL, max_tokens=1000)
    events = handle.tokens()
    first = await events.__anext__()  # running now
    assert first.seq == 0
    worker.signal(signal.SIGTERM)
    rest = [e async for e in events]
    assert rest[-1].finished and len(rest) == 999
    assert (await handle.result(timeout=30)).status == "done"
    assert await asyncio.to_thread(worker.wait) == 0
    late = await client.submit(prompt="after shutdown", model=MODEL, max_tokens=1)
    assert (await client.get(late.id)).status == "queued"  # nobody took it: it waits for the next worker
    assert await redis.exists(Keys(settings.key_prefix).worker("w0")) == 0  # heartbeat removed


async def test_one_engine_step_is_one_redis_transaction(
    settings: Settings, client: InferenceClient, redis: Redis
) -> None:
    """In-process worker: 50 requests x 20 tokens are 1,000 token events, sent in far fewer transactions."""
    engine = StandInEngine(step_s=0.002)
    conn = Redis.from_url(settings.redis_url or "")
    async with Worker(settings.merged(max_inflight=64), engine, conn, model=MODEL, consumer="inproc") as worker:
        runner = asyncio.create_task(worker.run())
        handles = [await client.submit(prompt=f"p{i}", model=MODEL, max_tokens=20) for i in range(50)]
        results = await asyncio.gather(*(h.result(timeout=30) for h in handles))
        worker.stop_reading()
        await runner
        await worker.drain(5)
    await conn.aclose()
    assert all(r.status == "done" and r.usage.completion_tokens == 20 for r in results)
    assert worker.outbox.batches < 1000 / 5, worker.outbox.batches
    assert await drained(redis, settings, MODEL) == (0, 0)


def test_sync_client_streams_and_waits(settings: Settings, start_worker) -> None:
    from inferq.producer import SyncInferenceClient

    start_worker("--engine", "standin", "--model", MODEL)
    with SyncInferenceClient(settings) as client:
        handle = client.submit(prompt="from sync code", model=MODEL, max_tokens=3)
        assert [e.text for e in handle.tokens()] == ["t0 ", "t1 ", "t2 "]
        assert handle.result(timeout=30).text == "t0 t1 t2 "
        assert client.generate(prompt="again", model=MODEL, max_tokens=2, timeout=30).text == "t0 t1 "
