"""End to end with a real instruct model: SmolLM2-135M-Instruct knows the capital of France."""

from __future__ import annotations

import os

import openai
import psutil
from redis.asyncio import Redis

from inferq.producer import InferenceClient
from inferq.shared.schemas import GenerationRequest
from inferq.shared.settings import Settings
from tests.conftest import drained

QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write one sentence about the sea."]


async def as_vllm_ships(settings: Settings, model_path: str) -> tuple[list[str], list[str]]:
    """The answers of vLLM as it ships (its model in a process of its own) in this process, and its processes."""
    from inferq.worker.vllm_engine import VllmEngine

    engine = VllmEngine(model_path, settings.merged(model="smollm2", max_inflight=8), as_shipped=True)
    await engine.start()
    try:
        titles = [" ".join(p.cmdline()) for p in psutil.Process(os.getpid()).children(recursive=True)]
        answers = []
        for i, question in enumerate(QUESTIONS):
            req = GenerationRequest(
                id=f"shipped-{i}", model="smollm2", messages=[{"role": "user", "content": question}], max_tokens=32,
                temperature=0,
            )  # fmt: skip
            answers.append("".join([d.text async for d in engine.generate(req)]))
    finally:
        await engine.stop()
    return answers, titles


async def test_smollm2_answers_paris_through_the_queue(
    settings: Settings, redis: Redis, start_worker, start_gateway
) -> None:
    from inferq.worker.models import prepare_model

    path = prepare_model("smollm2", settings.data_dir)
    start_worker("--model", "smollm2", "--max-inflight", "8")
    async with InferenceClient(settings.merged(model="smollm2")) as client:
        handle = await client.submit(messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=32, temperature=0)
        streamed = "".join([e.text async for e in handle.tokens(timeout=120)])
        result = await handle.result(timeout=60)
        others = [
            await client.submit(messages=[{"role": "user", "content": q}], max_tokens=32, temperature=0)
            for q in QUESTIONS[1:]
        ]
        answers = [result.text] + [(await h.result(timeout=120)).text for h in others]
    assert result.status == "done" and result.finish_reason == "stop"
    assert "Paris" in result.text and streamed == result.text
    assert await drained(redis, settings, "smollm2") == (0, 0)

    # The same question through the OpenAI-compatible gateway, with the official SDK, whole and streamed.
    gateway = start_gateway()
    question = [{"role": "user", "content": QUESTIONS[0]}]
    async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0) as sdk:
        assert [m.id async for m in sdk.models.list()] == ["smollm2"]
        whole = await sdk.chat.completions.create(model="smollm2", messages=question, max_tokens=32, temperature=0)  # type: ignore[arg-type]
        chunks = await sdk.chat.completions.create(
            model="smollm2", messages=question, max_tokens=32, temperature=0, stream=True,  # type: ignore[arg-type]
        )  # fmt: skip
        streamed_text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
        # vLLM's ignore_eos, as `vllm bench serve` sends it: past the answer's end, up to max_tokens.
        endless = await sdk.chat.completions.create(
            model="smollm2", messages=question, max_tokens=40, temperature=0, extra_body={"ignore_eos": True},  # type: ignore[arg-type]
        )  # fmt: skip
    assert whole.choices[0].message.content == result.text and "Paris" in streamed_text
    assert streamed_text == result.text and whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens < 40  # type: ignore[union-attr]
    assert (endless.usage.completion_tokens, endless.choices[0].finish_reason) == (40, "length")  # type: ignore[union-attr]
    assert endless.choices[0].message.content.startswith(result.text)  # type: ignore[union-attr]

    # The worker runs the model in vLLM's engine core (worker/vllm_private.py); greedy, it answers word for word
    # as vLLM as it ships does, whose engine core hands each step to a model process.
    shipped, titles = await as_vllm_ships(settings, str(path))
    assert any(t.startswith("VLLM::Worker") for t in titles), titles
    assert answers == shipped
