"""A hung request or a hung engine never holds work for ever (stand-in engine: the prompt "hang" never
yields a token)."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from inferq.producer import InferenceClient
from inferq.shared.errors import RequestTimeout
from inferq.shared.keys import GROUP, Keys
from inferq.shared.settings import Settings
from tests.conftest import wait_until

MODEL = "fake"
FAST_CLAIMS = {"INFERQ_CLAIM_IDLE_MS": "1000", "INFERQ_HEARTBEAT_S": "0.2"}


async def test_a_request_running_past_the_limit_ends_failed_and_the_worker_serves_on(
    client: InferenceClient, start_worker
) -> None:
    start_worker("--engine", "standin", "--model", MODEL, env={"INFERQ_MAX_RUN_S": "1"})
    hung = await client.submit(prompt="hang", model=MODEL, max_tokens=5)
    with pytest.raises(RequestTimeout) as waited:  # a worker serves the model: no hint about starting one
        await hung.result(timeout=0.2)
    assert "no live worker" not in str(waited.value)
    fine = await client.submit(prompt="fine", model=MODEL, max_tokens=5)
    assert (await fine.result(timeout=30)).status == "done"
    result = await hung.result(timeout=30)
    assert (result.status, result.finish_reason) == ("failed", "error")
    assert "INFERQ_MAX_RUN_S" in (result.error or "") and "watchdog" in (result.error or "")
    after = await client.submit(prompt="after", model=MODEL, max_tokens=2)
    assert (await after.result(timeout=30)).status == "done"


async def test_a_stalled_engine_stops_its_worker_and_others_take_its_work_over(
    client: InferenceClient, settings: Settings, redis: Redis, start_worker
) -> None:
    stream = Keys(settings.key_prefix).queue(MODEL)
    stalled = start_worker(
        "--engine", "standin", "--model", MODEL, name="stalls", env={**FAST_CLAIMS, "INFERQ_ENGINE_STALL_S": "1"}
    )
    hung = await client.submit(prompt="hang", model=MODEL, max_tokens=5)
    assert await asyncio.to_thread(stalled.wait, 60) == 1  # it stopped by itself, leaving its work
    assert "ENGINE STALLED" in stalled.log()
    pending = await redis.xpending_range(stream, GROUP, "-", "+", 10)
    assert [(p["message_id"], p["consumer"]) for p in pending] == [(pending[0]["message_id"], b"stalls")]
    assert (await client.get(hung.id)).status == "running"  # not ended: another worker will run it

    # It hangs on the entry too (the stand-in always does): let it stop quickly at the end of the test.
    start_worker(
        "--engine", "standin", "--model", MODEL, name="other", env={**FAST_CLAIMS, "INFERQ_DRAIN_TIMEOUT_S": "1"}
    )

    async def taken_over() -> bool:  # who owns an entry is only visible in Redis
        owners = await redis.xpending_range(stream, GROUP, "-", "+", 10)
        return [(p["consumer"], p["times_delivered"]) for p in owners] == [(b"other", 2)]

    await wait_until(taken_over, 30, "the other worker to take the stalled worker's entry over")
