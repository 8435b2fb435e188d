"""End to end with a real instruct model: SmolLM2-135M-Instruct knows the capital of France."""

from __future__ import annotations

from redis.asyncio import Redis

from producer import InferenceClient
from shared.settings import Settings
from tests.conftest import drained


async def test_smollm2_answers_paris_through_the_queue(settings: Settings, redis: Redis, start_worker) -> None:
    from worker.models import prepare_model

    prepare_model("smollm2", settings.data_dir)
    start_worker("--model", "smollm2", "--max-inflight", "8")
    async with InferenceClient(settings.merged(model="smollm2")) as client:
        handle = await client.submit(
            messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=32, temperature=0
        )
        streamed = "".join([e.text async for e in handle.tokens(timeout=120)])
        result = await handle.result(timeout=60)
    assert result.status == "done" and result.finish_reason == "stop"
    assert "Paris" in result.text and streamed == result.text
    assert await drained(redis, settings, "smollm2") == (0, 0)
