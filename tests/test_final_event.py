"""The final event of a request submitted with stream=False carries its stored result, so that its client has the
whole result without a read of its own; and it does so only when that is the truth."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from inferq.producer import InferenceClient
from inferq.shared.batching import WITHDRAWN
from inferq.shared.codec import unpack
from inferq.shared.errors import WriteRefused
from inferq.shared.keys import GROUP, Keys, bulk_request_id
from inferq.shared.settings import Settings
from inferq.worker import scripts
from inferq.worker.metrics import WorkerMetrics
from inferq.worker.outbox import Outbox
from inferq.worker.requests import Generation, RequestWriter
from tests.conftest import drained

MODEL = "fake"


async def _result_reads(redis: Redis) -> int:
    return int((await redis.info("commandstats")).get("cmdstat_hgetall", {}).get("calls", 0))


async def test_an_unstreamed_requests_result_comes_with_its_final_event(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    start_worker("--engine", "standin", "--model", MODEL)
    reads = await _result_reads(redis)
    handles = [await client.submit(prompt=f"p{i}", model=MODEL, max_tokens=3, stream=False) for i in range(20)]
    results = [await handle.result(timeout=30) for handle in handles]
    assert await _result_reads(redis) == reads  # the client read no stored result
    for handle, result in zip(handles, results, strict=True):
        assert result == await client.get(handle.id)  # field for field what is stored
        assert (result.status, result.text, result.usage.completion_tokens) == ("done", "t0 t1 t2 ", 3)
        assert (result.model, result.worker, result.attempts) == (MODEL, "w0", 1)
        timings = result.timings
        assert timings.queued_at and timings.started_at and timings.first_token_at and timings.finished_at
    # A streamed request's final event carries no result (its client has the text): result() reads it.
    streamed = await client.submit(prompt="streamed", model=MODEL, max_tokens=2)
    events = [event async for event in streamed.tokens()]
    assert events[-1].finished and events[-1].result is None
    assert (await streamed.result(timeout=30)).text == "t0 t1 "
    assert await _result_reads(redis) == reads + 1 + len(handles)  # that read, and the gets above
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_a_run_started_again_elsewhere_sends_no_result_it_did_not_store(
    client: InferenceClient, settings: Settings, redis: Redis
) -> None:
    """A worker that stalled while its entry was taken over, and ends the request after the other worker started
    it again: its final write stores the result (nothing final was stored), but the start fields stored are the
    other run's, so its final event must not say what it alone knows. The client reads the stored result."""
    keys = Keys.of(settings)
    handle = await client.submit(prompt="taken over", model=MODEL, max_tokens=1, stream=False)
    stream = keys.queue(MODEL)
    ((_, [(entry_id, _)]),) = await redis.xreadgroup(GROUP, "a", {stream: ">"}, count=1)
    entry_id = entry_id.decode()
    entry, ttl = f"{entry_id} {stream}", settings.result_ttl_s

    def start(worker: str, started_at: str) -> tuple[list[str], list[object]]:
        return [keys.result(handle.id)], [worker, started_at, ttl, MODEL, "99.5", entry]

    assert await scripts.START.run_all(redis, [start("a", "100.5"), start("b", "200.5")]) == [
        [b"running", 1],
        [b"running", 2],
    ]
    outbox = Outbox(redis)
    outbox.start()
    try:
        writer = RequestWriter(outbox, keys, settings, "a", MODEL, WorkerMetrics(keys, MODEL))
        gen = Generation(parts=["late "], completion_tokens=1, prompt_tokens=2, finish_reason="length")
        gen.run = {"model": MODEL, "started_at": "100.5", "worker": "a", "queued_at": "99.5", "attempts": "1"}
        reads = await _result_reads(redis)
        await writer.end(stream, entry_id, handle.request, "done", gen)
        result = await handle.result(timeout=10)
    finally:
        await outbox.stop()
    assert await _result_reads(redis) == reads + 1  # the event said only that it ended: the client read the store
    assert result == await client.get(handle.id)
    assert (result.status, result.text, result.worker, result.attempts) == ("done", "late ", "b", 2)
    assert result.timings.started_at == 200.5


async def test_requests_ending_together_send_their_final_events_in_one_message(
    client: InferenceClient, settings: Settings, redis: Redis
) -> None:
    """The finishes of one outbox batch run in one EVALSHA, and finish.lua's final events go out after all of them:
    one message per reply channel with every event (shared/lua.py, `announce`), not one PUBLISH per request."""
    keys, stream, ttl = Keys.of(settings), Keys.of(settings).queue(MODEL), settings.result_ttl_s
    handles = [await client.submit(prompt=f"p{i}", model=MODEL, max_tokens=1, stream=False) for i in range(12)]
    ((_, entries),) = await redis.xreadgroup(GROUP, "a", {stream: ">"}, count=20)
    assert len(entries) == len(handles)
    starts = [
        ([keys.result(handle.id)], ["a", "100.5", ttl, MODEL, "99.5", f"{entry_id.decode()} {stream}"])
        for handle, (entry_id, _) in zip(handles, entries, strict=True)
    ]
    assert await scripts.START.run_all(redis, starts) == [[b"running", 1]] * len(handles)
    listener = redis.pubsub()
    await listener.subscribe(client.channel)
    assert (await listener.get_message(timeout=5))["type"] == "subscribe"
    outbox = Outbox(redis)
    outbox.start()
    try:
        writer = RequestWriter(outbox, keys, settings, "a", MODEL, WorkerMetrics(keys, MODEL))

        async def end(handle, entry_id: bytes) -> None:  # type: ignore[no-untyped-def]
            gen = Generation(parts=[f"{handle.id} "], completion_tokens=1, prompt_tokens=2, finish_reason="length")
            gen.run = {"model": MODEL, "started_at": "100.5", "worker": "a", "queued_at": "99.5", "attempts": "1"}
            await writer.end(stream, entry_id.decode(), handle.request, "done", gen)

        publishes = int((await redis.info("commandstats")).get("cmdstat_publish", {}).get("calls", 0))
        reads = await _result_reads(redis)
        await asyncio.gather(*(end(h, entry_id) for h, (entry_id, _) in zip(handles, entries, strict=True)))
        assert outbox.batches == 1  # the ends of one loop turn: one transaction
        results = [await handle.result(timeout=10) for handle in handles]
    finally:
        await outbox.stop()
    calls = int((await redis.info("commandstats"))["cmdstat_publish"]["calls"])
    assert calls == publishes + 1  # one PUBLISH for the twelve
    message = await listener.get_message(timeout=5)
    assert message is not None and message["type"] == "message"
    events = unpack(message["data"])["events"]
    assert [event["id"] for event in events] == [handle.id for handle in handles]  # in the order they ended
    assert await listener.get_message(timeout=0.2) is None  # and nothing else
    await listener.aclose()
    assert await _result_reads(redis) == reads  # each result came with its event
    assert [(r.status, r.text, r.worker) for r in results] == [("done", f"{h.id} ", "a") for h in handles]
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_a_waiting_client_asks_the_store_less_often_the_longer_it_waits(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    """A request waiting in a queue with no worker hears nothing. Its waiting call reads the stored result in case
    a final event was lost: tokens() after 1 s of silence, result() after 2 s, and each time twice as long after
    that (producer/client.py). Every handle asking every half second made a deep backlog of waiting clients
    cost more the deeper it got."""
    streamed = await client.submit(prompt="streamed", model=MODEL, max_tokens=3)
    unstreamed = await client.submit(prompt="unstreamed", model=MODEL, max_tokens=3, stream=False)
    reads = await _result_reads(redis)

    async def events() -> list[int]:
        return [event.seq async for event in streamed.tokens(timeout=60)]

    streaming = asyncio.create_task(events())
    waiting = asyncio.create_task(unstreamed.result(timeout=60))
    await asyncio.sleep(4.5)  # the time under test: nothing can end, there is no worker yet
    # tokens() at 1 and 3 s (next at 7), result() at 2 s (next at 6), each up to TICK_S late: three reads, where
    # it was eight
    assert await _result_reads(redis) - reads == 3
    start_worker("--engine", "standin", "--model", MODEL)
    assert await streaming == [0, 1, 2] and not streamed.gap
    assert (await waiting).text == "t0 t1 t2 "
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_a_start_that_had_not_gone_out_is_made_by_the_final_write(
    client: InferenceClient, settings: Settings, redis: Redis
) -> None:
    """An unstreamed request's start is not awaited (worker/consumer.py): it waits in the outbox, and a run that ends
    before it went out takes it back, and its final write (finish.lua) stores the start's fields and counts the
    attempt. What was true with start.lua stays true: a request cancelled while queued keeps its state, and a run
    started before counts as an attempt (and then the final event does not carry the result)."""
    keys, stream, ttl = Keys.of(settings), Keys.of(settings).queue(MODEL), settings.result_ttl_s
    handles = [await client.submit(prompt=f"p{i}", model=MODEL, max_tokens=1, stream=False) for i in range(4)]
    fresh, cancelled, restarted, sent = handles
    assert await client.cancel(cancelled.id) == "cancelled"
    ((_, entries),) = await redis.xreadgroup(GROUP, "a", {stream: ">"}, count=10)
    entry_of = {handle.id: entry_id.decode() for handle, (entry_id, _) in zip(handles, entries, strict=True)}

    def start(handle, worker: str, started_at: str) -> tuple[list[str], list[object]]:  # type: ignore[no-untyped-def]
        return [keys.result(handle.id)], [worker, started_at, ttl, MODEL, "99.5", f"{entry_of[handle.id]} {stream}"]

    assert await scripts.START.run_all(redis, [start(restarted, "b", "50.5")]) == [[b"running", 1]]
    outbox = Outbox(redis)
    outbox.start()
    try:
        writer = RequestWriter(outbox, keys, settings, "a", MODEL, WorkerMetrics(keys, MODEL))

        async def run(handle, *, wait_for_start: bool) -> None:  # type: ignore[no-untyped-def]
            ticket = outbox.add_withdrawable(scripts.START.command(*start(handle, "a", "100.5")))
            if wait_for_start:
                assert await ticket[0] == [b"running", 1]  # its batch went out before the run ended
            gen = Generation(parts=[f"{handle.id} "], completion_tokens=1, prompt_tokens=2, finish_reason="length")
            gen.run = {"model": MODEL, "started_at": "100.5", "worker": "a", "queued_at": "99.5", "attempts": "1"}
            assert await writer.end(stream, entry_of[handle.id], handle.request, "done", gen, start=ticket) == 1 - (
                handle is cancelled
            )
            assert (ticket[0].result() is WITHDRAWN) is not wait_for_start

        reads = await _result_reads(redis)
        await asyncio.gather(run(fresh, wait_for_start=False), run(cancelled, wait_for_start=False))
        await run(restarted, wait_for_start=False)
        await run(sent, wait_for_start=True)
        results = {handle.id: await handle.result(timeout=10) for handle in handles}
    finally:
        await outbox.stop()
    # The fresh one's and the one started in its own batch's events carried their results; the other two's did not.
    assert await _result_reads(redis) == reads + 2
    for handle in (fresh, sent):
        result = results[handle.id]
        assert result == await client.get(handle.id)
        assert (result.status, result.text, result.worker, result.attempts) == ("done", f"{handle.id} ", "a", 1)
        assert (result.timings.started_at, result.timings.queued_at) == (100.5, 99.5)
    assert (results[cancelled.id].status, results[cancelled.id].worker, results[cancelled.id].attempts) == (
        "cancelled", None, 0,
    )  # fmt: skip  # it never started: no attempt
    again = results[restarted.id]
    assert (again.status, again.worker, again.attempts, again.timings.started_at) == ("done", "a", 2, 100.5)
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_a_start_taken_back_by_a_refused_final_write_is_made_by_the_write_after_it(
    client: InferenceClient, settings: Settings, redis: Redis
) -> None:
    """The final write that took a start back was refused (a reply stream of the wrong type): nothing of it was
    written, so the dead-letter write after it (consumer.Worker._failed) makes the start."""
    keys, stream = Keys.of(settings), Keys.of(settings).queue(MODEL)
    await redis.set(keys.done("jobx"), "not a stream")
    handle = await client.submit(
        prompt="p", model=MODEL, max_tokens=1, stream=False, reply_stream=keys.done("jobx"),
        request_id=bulk_request_id("jobx", 0, "a"),
    )  # fmt: skip
    ((_, [(entry_id, _)]),) = await redis.xreadgroup(GROUP, "a", {stream: ">"}, count=1)
    entry_id = entry_id.decode()
    outbox = Outbox(redis)
    outbox.start()
    try:
        writer = RequestWriter(outbox, keys, settings, "a", MODEL, WorkerMetrics(keys, MODEL))
        args = ["a", "100.5", settings.result_ttl_s, MODEL, "99.5", f"{entry_id} {stream}"]
        ticket = outbox.add_withdrawable(scripts.START.command([keys.result(handle.id)], args))
        gen = Generation(parts=["t0 "], completion_tokens=1, prompt_tokens=1, finish_reason="length")
        gen.run = {"model": MODEL, "started_at": "100.5", "worker": "a", "queued_at": "99.5", "attempts": "1"}
        with pytest.raises(WriteRefused, match="WRONGTYPE"):
            await writer.end(stream, entry_id, handle.request, "done", gen, start=ticket)
        assert Outbox.was_withdrawn(ticket)  # taken back by the refused write: never sent
        assert (await client.get(handle.id)).status == "queued"  # nothing of that write landed
        bare = handle.request.model_copy(update={"reply_channel": None, "reply_stream": None})
        await writer.dead_letter(stream, entry_id, {}, "refused", 1, bare, start=ticket, run=gen.run)
    finally:
        await outbox.stop()
    result = await client.get(handle.id)
    assert (result.status, result.worker, result.attempts, result.timings.started_at) == ("failed", "a", 1, 100.5)
    assert await redis.get(keys.done("jobx")) == b"not a stream"
    assert await drained(redis, settings, MODEL) == (0, 0)
