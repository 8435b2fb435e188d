"""A worker writes only what it owns, and nothing a client adds to a queue can end another's request: a reply
write Redis refuses fails that one request (never the worker, never its other requests), and a forged entry
that names a queued request's id neither runs nor ends it (stand-in engine, real Redis and its ACLs)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from inferq.producer import InferenceClient
from inferq.shared.codec import pack
from inferq.shared.keys import Keys, bulk_request_id
from inferq.shared.settings import Settings
from tests.conftest import drained, wait_until

MODEL = "fake"


@pytest.fixture
async def narrow_worker_url(redis: Redis, settings: Settings, client: InferenceClient) -> AsyncIterator[str]:
    """A Redis user for the worker that may publish token events to the channels of clients bound to no tenant
    only (`{p}:t:` then hex): a mistake in an operator's ACL, seen from the worker as NOPERM on the channel of
    a client bound to tenant `zed`."""
    keys = Keys(settings.key_prefix)
    user = f"{settings.key_prefix}-worker"
    channels = [f"&{keys.cancel()}", f"&{keys.tokens('[0-9a-f]*')}"]
    await redis.execute_command("ACL", "SETUSER", user, "on", ">pw", f"~{settings.key_prefix}:*", *channels, "+@all")
    yield (settings.redis_url or "").replace("redis://", f"redis://{user}:pw@")
    await redis.execute_command("ACL", "DELUSER", user)


async def test_a_refused_token_channel_fails_that_request_only(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker, narrow_worker_url: str
) -> None:
    start_worker(
        "--engine", "standin", "--model", MODEL, cfg=settings.model_copy(update={"redis_url": narrow_worker_url})
    )
    async with InferenceClient(settings.model_copy(update={"tenant": "zed"})) as refused_client:
        before = await client.submit(prompt="hi", model=MODEL, max_tokens=4)
        refused = [await refused_client.submit(prompt="hi", model=MODEL, max_tokens=40) for _ in range(3)]
        tokens = [event.text async for event in before.tokens()]
        assert "".join(tokens) == "t0 t1 t2 t3 "
        for handle in refused:
            result = await handle.result(timeout=30)
            assert result.status == "failed", result
            assert "Redis refused" in (result.error or "") and "NOPERM on PUBLISH" in (result.error or ""), result.error
        after = await client.submit(prompt="hi", model=MODEL, max_tokens=4)  # the worker goes on
        assert (await after.result(timeout=30)).text == "t0 t1 t2 t3 "
    letters = await client.dead_letters(MODEL).list()
    assert sorted(letter.request.id for letter in letters if letter.request) == sorted(h.id for h in refused)
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_a_reply_stream_of_the_wrong_type_fails_that_request_only(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    keys = Keys(settings.key_prefix)
    await redis.set(keys.done("jobw"), "not a stream")  # a key of the wrong type where a job's stream goes
    start_worker("--engine", "standin", "--model", MODEL)
    broken = await client.submit(
        prompt="hi", model=MODEL, max_tokens=2, stream=False, reply_stream=keys.done("jobw"),
        request_id=bulk_request_id("jobw", 0, "a"),
    )  # fmt: skip
    fine = [await client.submit(prompt="hi", model=MODEL, max_tokens=2, stream=False) for _ in range(5)]
    result = await broken.result(timeout=30)
    assert result.status == "failed" and "WRONGTYPE" in (result.error or ""), result
    assert [(await h.result(timeout=30)).status for h in fine] == ["done"] * 5
    assert await redis.get(keys.done("jobw")) == b"not a stream"  # nothing was written into it
    assert await drained(redis, settings, MODEL) == (0, 0)


async def test_a_forged_entry_cannot_run_or_end_a_queued_request(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    """Anyone who can add to a queue can add an entry with another request's id, as a valid request or as
    poison: neither may run it, fail it, or release its tenant's count."""
    keys = Keys(settings.key_prefix)
    real = await client.submit(prompt="hi", model=MODEL, max_tokens=3, stream=False, tenant="alice")
    stream = keys.queue(MODEL)
    forged_run = {"v": 1, "id": real.id, "model": MODEL, "prompt": "hi", "max_tokens": 7, "stream": False}
    forged_poison = {"v": 1, "id": real.id, "model": MODEL, "prompt": "hi", "max_tokens": -1, "tenant": "alice"}
    await redis.xadd(stream, {"m": pack(forged_run)})
    await redis.xadd(stream, {"m": pack(forged_poison)})
    assert await redis.hget(keys.tenants(MODEL), "alice") == b"1"
    start_worker("--engine", "standin", "--model", MODEL)

    result = await real.result(timeout=30)
    assert (result.status, result.text) == ("done", "t0 t1 t2 "), result

    async def all_ended() -> bool:
        return await drained(redis, settings, MODEL) == (0, 0)

    await wait_until(all_ended, 30, "the forged entries to be dead-lettered")
    assert (await client.get(real.id)).status == "done"  # neither forged entry changed it after it ended
    letters = await client.dead_letters(MODEL).list()
    assert len(letters) == 2
    assert any("forged entry" in letter.error for letter in letters), [letter.error for letter in letters]
    assert not await redis.hexists(keys.tenants(MODEL), "alice")  # released once, by the real entry
