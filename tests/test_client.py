"""The producer against a real Redis: validation before anything is enqueued, atomic admission, ids."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from inferq.producer import InferenceClient, SyncInferenceClient
from inferq.shared.errors import InvalidRequest, QueueFull, RequestNotFound, RequestTimeout
from inferq.shared.keys import Keys
from inferq.shared.settings import Settings


async def _nothing_enqueued(redis: Redis, settings: Settings) -> None:
    keys = Keys(settings.key_prefix)
    assert [k async for k in redis.scan_iter(f"{keys.prefix}:*")] == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one of prompt or messages"),
        ({}, "exactly one of prompt or messages"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "a", "max_tokens": 10**6}, "above the limit"),
        ({"prompt": "a", "temperature": -1}, "temperature"),
        ({"prompt": "a", "colour": "red"}, "colour"),
        ({"messages": [{"role": "wizard", "content": "b"}]}, "role"),
        ({"prompt": "a", "priority": "urgent"}, "priority"),
        ({"prompt": "a", "seed": 2**70}, "seed"),
        ({"prompt": "a", "ttl": 0}, "ttl=0 must be a positive number"),
        ({"prompt": "a", "ttl": 5, "deadline": 1e10}, "ttl or deadline"),
        ({"prompt": "a", "request_id": "has space"}, "id"),
        ({"prompt": "a", "stream_interval": 0}, "stream_interval"),
    ],
)
async def test_invalid_requests_are_refused_before_enqueue(
    client: InferenceClient, redis: Redis, settings: Settings, kwargs: dict, message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message):
        await client.submit(**kwargs)
    await _nothing_enqueued(redis, settings)


async def test_admission_refuses_at_cap_and_keeps_what_it_took(settings: Settings, redis: Redis) -> None:
    capped = settings.merged(max_queue_len=3)
    async with InferenceClient(capped) as client:
        handles = [await client.submit(prompt=f"p{i}", max_tokens=1) for i in range(3)]
        with pytest.raises(QueueFull) as refused:
            await client.submit(prompt="one too many")
    assert refused.value.queue_len == 3 and refused.value.retry_after_s > 0
    stream = Keys(settings.key_prefix).queue("tiny")
    assert await redis.xlen(stream) == 3  # nothing trimmed, nothing extra
    for h in handles:
        stored = await client_get(settings, h.id)
        assert stored.status == "queued"  # model and queued_at are recorded when it starts


async def client_get(settings: Settings, request_id: str):  # type: ignore[no-untyped-def]
    async with InferenceClient(settings) as c:
        return await c.get(request_id)


async def test_same_request_id_is_one_request(client: InferenceClient, redis: Redis, settings: Settings) -> None:
    await client.submit(prompt="first", request_id="order-42")
    await client.submit(prompt="second", request_id="order-42")
    assert await redis.xlen(Keys(settings.key_prefix).queue("tiny")) == 1


async def test_unknown_result_and_timeout(client: InferenceClient) -> None:
    with pytest.raises(RequestNotFound, match="no request 'nope'"):
        await client.get("nope")
    handle = await client.submit(prompt="nobody serves this model", model="no-worker-model")
    with pytest.raises(RequestTimeout, match="inferq result"):
        await handle.result(timeout=0.3)
    assert (await client.get(handle.id)).status == "queued"


def test_sync_client_submits_and_reads(settings: Settings) -> None:
    with SyncInferenceClient(settings) as client:
        handle = client.submit(prompt="from sync code", request_id="sync-1")
        assert client.get(handle.id).status == "queued"
        with pytest.raises(InvalidRequest):
            client.submit(prompt="")


async def test_status_finds_models_and_workers_in_their_indexes_not_by_scanning(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    keys = Keys(settings.key_prefix)
    await client.submit(prompt="waits", model="unserved", max_tokens=1)  # queued, and no worker for it
    start_worker("--engine", "standin", "--model", "fake", name="w-fake")
    scans = await _calls(redis, "scan")
    report = await client.stats()
    assert await _calls(redis, "scan") == scans  # found in two small sorted sets, however many keys there are
    assert sorted(report["models"]) == ["fake", "unserved"]
    assert report["models"]["unserved"]["lanes"]["normal"]["length"] == 1
    assert [w["name"] for w in report["models"]["fake"]["workers"]] == ["w-fake"]
    # A model whose queue is gone and that no worker serves leaves the index at the next look.
    await redis.delete(*keys.queues("unserved"))
    assert sorted((await client.stats())["models"]) == ["fake"]
    assert await redis.zscore(keys.models_index(), "unserved") is None


async def _calls(redis: Redis, command: str) -> int:
    return int((await redis.info("commandstats")).get(f"cmdstat_{command}", {}).get("calls", 0))
