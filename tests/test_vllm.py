"""The engine-facing path on real vLLM (CPU build) with the tiny model, through a real worker process."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from producer import InferenceClient
from shared.keys import Keys
from shared.settings import Settings
from tests.conftest import WorkerProcess, drained


@pytest.fixture
async def tiny(tiny_worker: WorkerProcess) -> Settings:
    return tiny_worker.settings


async def test_streamed_tokens_match_stored_result(tiny: Settings, redis: Redis) -> None:
    async with InferenceClient(tiny) as client:
        handle = await client.submit(prompt="The queue holds requests", max_tokens=24, temperature=0, model="tiny")
        events = [e async for e in handle.tokens(timeout=60)]
        result = await handle.result(timeout=60)
    assert [e.seq for e in events] == list(range(len(events)))
    assert events[-1].finished and not any(e.finished for e in events[:-1])
    assert result.status == "done" and result.finish_reason == "length"
    assert "".join(e.text for e in events) == result.text != ""
    assert sum(len(e.token_ids) for e in events) == result.usage.completion_tokens == 24
    assert result.usage.prompt_tokens > 0
    assert result.worker == "tiny-0" and result.attempts == 1
    async with Redis.from_url(tiny.redis_url or "") as r:
        assert await drained(r, tiny, "tiny") == (0, 0)


async def test_greedy_is_deterministic_and_batched_requests_all_finish(tiny: Settings) -> None:
    async with InferenceClient(tiny) as client:
        handles = [
            await client.submit(
                prompt=f"Request number {i % 4}", max_tokens=16, temperature=0, model="tiny", stream=i % 2 == 0
            )
            for i in range(32)
        ]
        results = await asyncio.gather(*(h.result(timeout=120) for h in handles))
    assert all(r.status == "done" and r.usage.completion_tokens == 16 for r in results)
    # Same prompt, greedy: same text, whichever batch it ran in.
    for i in range(4):
        assert len({r.text for j, r in enumerate(results) if j % 4 == i}) == 1


async def test_chat_messages_use_the_chat_template(tiny: Settings) -> None:
    async with InferenceClient(tiny) as client:
        chat = await client.generate(
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
            max_tokens=4, temperature=0, model="tiny",
        )  # fmt: skip
        plain = await client.generate(prompt="Hello!", max_tokens=4, temperature=0, model="tiny")
    # The template wraps the two messages in ChatML markers: many more prompt tokens than the bare text.
    assert chat.usage.prompt_tokens > plain.usage.prompt_tokens + 8


async def test_stop_strings_and_seeded_sampling(tiny: Settings) -> None:
    async with InferenceClient(tiny) as client:
        a = await client.generate(prompt="Hello", max_tokens=12, temperature=1.0, seed=7, model="tiny")
        b = await client.generate(prompt="Hello", max_tokens=12, temperature=1.0, seed=7, model="tiny")
        assert a.text == b.text
        cut = a.text[3:6]
        stopped = await client.generate(
            prompt="Hello", max_tokens=12, temperature=1.0, seed=7, stop=[cut], model="tiny"
        )
    assert stopped.finish_reason == "stop" and cut not in stopped.text and a.text.startswith(stopped.text)


async def test_too_long_prompt_fails_with_reason_and_dead_letters(tiny: Settings, redis: Redis) -> None:
    async with InferenceClient(tiny) as client:
        handle = await client.submit(prompt="word " * 3000, max_tokens=8, model="tiny")
        events = [e async for e in handle.tokens(timeout=60)]
        result = await handle.result(timeout=60)
        ok = await client.generate(prompt="still serving", max_tokens=2, model="tiny")
    assert events == []  # the stream ended without tokens; the stored result says why
    assert result.status == "failed" and "exceeds the model's context of 2048 tokens" in (result.error or "")
    assert ok.status == "done"
    async with Redis.from_url(tiny.redis_url or "") as r:
        dlq = await r.xrange(Keys(tiny.key_prefix).dlq("tiny"))
        assert any(b"exceeds the model's context" in fields[b"error"] for _, fields in dlq)
        assert await drained(r, tiny, "tiny") == (0, 0)
