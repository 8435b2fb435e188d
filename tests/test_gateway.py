"""The OpenAI-compatible gateway, driven by the official `openai` SDK (and aiohttp's client where the SDK
hides what is tested): a real `inferq gateway` process, a real stand-in worker, a real Redis. The answers
of a real model through it are in test_smollm2."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from redis.asyncio import Redis

from inferq.producer import InferenceClient
from inferq.producer.local import inferq_argv, worker_env
from inferq.shared.embedded import EmbeddedServer
from inferq.shared.keys import Keys
from inferq.shared.settings import Settings
from tests.conftest import GatewayProcess, free_port, wait_until

MODEL = "fake"
ACME, BOLT, NARROW = "sk-acme-0123456789abcdef", "sk-bolt-0123456789abcdef", "sk-narrow-0123456789abcdef"
CAPPED = "sk-capped-0123456789abcdef"
KEYS = {
    ACME: "acme", BOLT: "bolt", NARROW: {"tenant": "narrow", "models": ["other-model"]},
    CAPPED: {"tenant": "capped", "max_unfinished": 1},
}  # fmt: skip


@pytest.fixture
def gateway(start_worker, start_gateway) -> GatewayProcess:
    start_worker("--engine", "standin", "--model", MODEL)
    return start_gateway(env={"INFERQ_API_KEYS": json.dumps(KEYS)})  # type: ignore[no-any-return]


def sdk(gateway: GatewayProcess, key: str = ACME) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0)


CHAT = [{"role": "user", "content": "hi"}]


async def test_chat_whole_and_streamed(gateway: GatewayProcess) -> None:
    async with sdk(gateway) as client:
        whole = await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3)  # type: ignore[arg-type]
        assert whole.choices[0].message.content == "t0 t1 t2 " and whole.choices[0].finish_reason == "length"
        assert whole.choices[0].message.role == "assistant" and whole.object == "chat.completion"
        assert (whole.usage.completion_tokens, whole.usage.prompt_tokens) == (3, 1)  # type: ignore[union-attr]
        assert whole.id.startswith("acme:chatcmpl-")  # the request is the key's tenant's, with an id it made

        stream = await client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=5, stream=True, stream_options={"include_usage": True},  # type: ignore[arg-type]
        )  # fmt: skip
        chunks = [c async for c in stream]
    # The role comes with the first text (as vLLM's server sends it), not before any token exists.
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == "t0 "
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "t0 t1 t2 t3 t4 "
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishing == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5  # type: ignore[union-attr]


async def test_completions_whole_and_streamed(gateway: GatewayProcess) -> None:
    async with sdk(gateway) as client:
        whole = await client.completions.create(model=MODEL, prompt="once upon", max_tokens=2)
        pieces = await client.completions.create(model=MODEL, prompt="a", max_tokens=4, stream=True)
        streamed = [c async for c in pieces]
    assert whole.choices[0].text == "t0 t1 " and whole.object == "text_completion"
    assert "".join(c.choices[0].text for c in streamed) == "t0 t1 t2 t3 "
    assert streamed[-1].choices[0].finish_reason == "length"


async def test_models_lists_live_workers_for_the_key(gateway: GatewayProcess) -> None:
    async with sdk(gateway) as client, sdk(gateway, NARROW) as narrow:
        assert [m.id async for m in client.models.list()] == [MODEL]
        assert [m.id async for m in narrow.models.list()] == []  # this key may use only other-model
        with pytest.raises(openai.NotFoundError, match="may not use it"):
            await narrow.chat.completions.create(model=MODEL, messages=CHAT)  # type: ignore[arg-type]


async def test_errors_carry_the_status_a_client_acts_on(gateway: GatewayProcess) -> None:
    async with sdk(gateway) as client:
        with pytest.raises(openai.BadRequestError, match="logprobs") as bad:
            await client.chat.completions.create(model=MODEL, messages=CHAT, logprobs=True)  # type: ignore[arg-type]
        assert bad.value.body["param"] == "logprobs"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError, match="n must be 1"):
            await client.chat.completions.create(model=MODEL, messages=CHAT, n=2)  # type: ignore[arg-type]
        with pytest.raises(openai.BadRequestError, match="INFERQ_MAX_TOKENS_LIMIT"):
            await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10**6)  # type: ignore[arg-type]
        with pytest.raises(openai.NotFoundError, match="no worker serves model 'nobody'"):
            await client.chat.completions.create(model="nobody", messages=CHAT)  # type: ignore[arg-type]
        # With the default presence_penalty (what many clients send) nothing is refused.
        fine = await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1, presence_penalty=0)  # type: ignore[arg-type]
        assert fine.choices[0].message.content == "t0 "
    async with sdk(gateway, "sk-wrong-0123456789abcdef") as stranger:
        with pytest.raises(openai.AuthenticationError, match="unknown API key"):
            await stranger.models.list()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gateway.url}/v1/models") as answer:  # no key at all
            assert answer.status == 401 and "Authorization: Bearer" in (await answer.json())["error"]["message"]
        headers = {"Authorization": f"Bearer {ACME}"}
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (5 << 20)}]}
        async with http.post(f"{gateway.url}/v1/chat/completions", json=body, headers=headers) as answer:
            assert answer.status == 413 and "INFERQ_GATEWAY_MAX_BODY_BYTES" in (await answer.json())["error"]["message"]
        async with http.post(f"{gateway.url}/v1/chat/completions", data=b"{not json", headers=headers) as answer:
            assert answer.status == 400 and (await answer.json())["error"]["type"] == "invalid_request_error"
        for method, path, status in (("POST", "/tokenize", 404), ("GET", "/v1/chat/completions", 405)):
            async with http.request(method, f"{gateway.url}{path}", headers=headers) as answer:
                assert answer.status == status and "error" in await answer.json(), await answer.text()


async def test_a_full_queue_is_429_with_retry_after(
    start_worker, start_gateway, client: InferenceClient, client_for_results: Any
) -> None:
    start_worker("--engine", "standin", "--model", MODEL)
    gateway = start_gateway(env={"INFERQ_API_KEYS": json.dumps(KEYS), "INFERQ_MAX_QUEUE_LEN": "1"})
    hung = await client.submit(prompt="hang", model=MODEL)  # its entry fills the lane until it ends
    await wait_until(lambda: client_for_results.is_status(hung.id, "running"), 30, "the hung request to start")
    async with sdk(gateway) as sdk_client:
        with pytest.raises(openai.RateLimitError, match="full") as full:
            await sdk_client.chat.completions.create(model=MODEL, messages=CHAT)  # type: ignore[arg-type]
    assert int(full.value.response.headers["Retry-After"]) >= 1
    await hung.cancel()
    assert (await hung.result(timeout=30)).status == "cancelled"


async def test_a_key_with_a_cap_gets_429_past_it(gateway: GatewayProcess) -> None:
    async with aiohttp.ClientSession(base_url=gateway.url) as http:
        capped = {"Authorization": f"Bearer {CAPPED}", "Prefer": "respond-async"}
        body = {"model": MODEL, "prompt": "hang"}
        async with http.post("/v1/completions", json=body, headers=capped) as answer:
            assert answer.status == 202
            first = (await answer.json())["id"]
        async with http.post("/v1/completions", json=body, headers=capped) as answer:
            refused = await answer.json()
            assert answer.status == 429 and "tenant 'capped' is at its cap" in refused["error"]["message"], refused
        async with sdk(gateway, ACME) as other:  # another tenant is not held by it
            assert (await other.completions.create(model=MODEL, prompt="a", max_tokens=1)).choices[0].text == "t0 "
        async with http.post(f"/v1/requests/{first}/cancel", headers={"Authorization": f"Bearer {CAPPED}"}) as answer:
            assert answer.status == 200


async def test_past_the_deadline_is_504_and_the_request_is_cancelled(
    start_worker, start_gateway, client_for_results: Any
) -> None:
    start_worker("--engine", "standin", "--model", MODEL)
    gateway = start_gateway(env={"INFERQ_API_KEYS": json.dumps(KEYS), "INFERQ_REQUEST_TIMEOUT_S": "1"})
    async with sdk(gateway) as client:
        with pytest.raises(openai.APIStatusError) as late:
            await client.completions.create(model=MODEL, prompt="hang")  # the stand-in never answers "hang"
    assert late.value.status_code == 504
    request_id = await client_for_results.only_request("acme")
    await wait_until(lambda: client_for_results.is_status(request_id, "cancelled"), 30, "the request to be cancelled")


async def test_a_caller_that_disconnects_cancels_its_request(gateway: GatewayProcess, client_for_results: Any) -> None:
    async with aiohttp.ClientSession() as http:
        body = {"model": MODEL, "prompt": "hang", "stream": True}
        answer = await http.post(
            f"{gateway.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {ACME}"}
        )
        request_id = answer.headers["X-Request-Id"]  # with the headers, before any token (and "hang" has none)
        await wait_until(lambda: client_for_results.is_status(request_id, "running"), 30, "the request to start")
        answer.close()  # the caller goes away mid-stream
    await wait_until(lambda: client_for_results.is_status(request_id, "cancelled"), 30, "the request to be cancelled")


async def test_redis_unreachable_is_503(start_gateway, settings: Settings, tmp_path: Path) -> None:
    server = EmbeddedServer(tmp_path / "own", free_port())
    server.start()
    gateway = start_gateway(cfg=settings.model_copy(update={"redis_url": server.url}))  # no keys: loopback only
    server.stop()
    async with sdk(gateway) as client:
        with pytest.raises(openai.APIStatusError) as down:
            await client.chat.completions.create(model=MODEL, messages=CHAT)  # type: ignore[arg-type]
    assert down.value.status_code == 503 and "unavailable" in down.value.message
    async with aiohttp.ClientSession() as http, http.get(f"{gateway.url}/health") as health:
        assert health.status == 503


async def test_enqueue_and_poll_with_an_idempotency_key(gateway: GatewayProcess, client_for_results: Any) -> None:
    """For callers that cannot hold a connection: 202 with the id at once, then GET /v1/requests/{id}. A POST
    retried with the same Idempotency-Key is the same request: it runs once."""
    headers = {"Authorization": f"Bearer {ACME}", "Prefer": "respond-async", "Idempotency-Key": "order-17"}
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 3}
    async with aiohttp.ClientSession(base_url=gateway.url) as http:
        ids = []
        for _ in range(2):
            async with http.post("/v1/chat/completions", json=body, headers=headers) as answer:
                assert answer.status == 202, await answer.text()
                accepted = await answer.json()
                assert answer.headers["Location"] == f"/v1/requests/{accepted['id']}"
                ids.append(accepted["id"])
        assert ids[0] == ids[1] and ids[0].startswith("acme:chatcmpl-idem-")
        await wait_until(lambda: client_for_results.is_status(ids[0], "done"), 30, "the request to finish")
        auth = {"Authorization": f"Bearer {ACME}"}
        async with http.get(f"/v1/requests/{ids[0]}", headers=auth) as answer:
            state = await answer.json()
        assert state["status"] == "done" and state["response"]["choices"][0]["message"]["content"] == "t0 t1 t2 "
        assert state["response"]["object"] == "chat.completion"
    assert await client_for_results.attempts(ids[0]) == 1  # the retried POST ran nothing twice


async def test_one_key_cannot_see_or_cancel_another_keys_work(gateway: GatewayProcess) -> None:
    async with aiohttp.ClientSession(base_url=gateway.url) as http:
        acme, bolt = ({"Authorization": f"Bearer {key}"} for key in (ACME, BOLT))
        later = {**acme, "Prefer": "respond-async"}
        async with http.post("/v1/completions", json={"model": MODEL, "prompt": "hang"}, headers=later) as answer:
            request_id = (await answer.json())["id"]
        for method, path in (("GET", f"/v1/requests/{request_id}"), ("POST", f"/v1/requests/{request_id}/cancel")):
            async with http.request(method, path, headers=bolt) as answer:
                assert answer.status == 404, await answer.text()  # for another key it does not exist
        async with http.get(f"/v1/requests/{request_id}", headers=acme) as answer:
            assert (await answer.json())["status"] in ("queued", "running")
        async with http.post(f"/v1/requests/{request_id}/cancel", headers=acme) as answer:
            assert (await answer.json())["status"] in ("cancelled", "running")  # running: aborted by its worker

        async def cancelled() -> bool:
            async with http.get(f"/v1/requests/{request_id}", headers=acme) as answer:
                state = await answer.json()
            return state["status"] == "cancelled" and state["error"]["code"] == "cancelled"  # type: ignore[no-any-return]

        await wait_until(cancelled, 30, "the request to end cancelled")


async def test_one_websocket_carries_many_requests_and_cancels_one(gateway: GatewayProcess) -> None:
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{gateway.url}/ws/generate", headers={"Authorization": f"Bearer {ACME}"})
        await ws.send_json({"type": "generate", "id": "q1", "model": MODEL, "prompt": "a", "max_tokens": 3})
        await ws.send_json({"type": "generate", "id": "q2", "model": MODEL, "messages": CHAT, "max_tokens": 5})
        await ws.send_json({"type": "generate", "id": "q3", "model": MODEL, "prompt": "hang"})
        await ws.send_json({"type": "generate", "id": "q4", "model": "nobody", "prompt": "a"})
        await ws.send_json({"type": "cancel", "id": "q3"})
        texts: dict[str, str] = {}
        ends: dict[str, dict[str, Any]] = {}
        while len(ends) < 4:
            message = await ws.receive_json(timeout=30)
            if message["type"] == "token":
                texts[message["id"]] = texts.get(message["id"], "") + message["text"]
            else:
                ends[message["id"]] = message
        await ws.close()
    assert texts == {"q1": "t0 t1 t2 ", "q2": "t0 t1 t2 t3 t4 "}
    assert [ends[q]["status"] for q in ("q1", "q2", "q3")] == ["done", "done", "cancelled"]
    assert ends["q2"]["usage"]["completion_tokens"] == 5 and ends["q1"]["text"] == "t0 t1 t2 "
    assert ends["q4"]["type"] == "error" and ends["q4"]["error"]["code"] == "model_not_found"


async def test_metrics_count_requests_by_route_and_status(gateway: GatewayProcess) -> None:
    async with sdk(gateway) as client:
        await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1)  # type: ignore[arg-type]
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="nobody", messages=CHAT)  # type: ignore[arg-type]
    async with aiohttp.ClientSession() as http, http.get(f"{gateway.url}/metrics") as answer:
        text = await answer.text()
    assert answer.status == 200 and answer.content_type == "text/plain"
    for status in ("200", "404"):
        line = f'inferq_gateway_requests_total{{route="/v1/chat/completions",status="{status}"}} 1.0'
        assert line in text, text
    assert 'inferq_gateway_request_duration_seconds_count{route="/v1/chat/completions"} 2.0' in text


def batch_lines(n: int, *, hang: bool = False) -> bytes:
    """An OpenAI batch input of `n` chat lines (with `hang`: completions the stand-in never answers), then one
    line that is not JSON."""
    url = "/v1/completions" if hang else "/v1/chat/completions"
    body = {"prompt": "hang"} if hang else {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": url, "body": {"model": MODEL, **body}} for i in range(n)]
    return ("\n".join(json.dumps(line) for line in lines) + "\n{not json\n").encode()


async def test_the_batch_api_life_cycle(gateway: GatewayProcess) -> None:
    """files.create, batches.create, retrieve until completed, the output and error files' content, list,
    cancel, and another key seeing none of it: as the official SDK does it."""
    async with sdk(gateway, ACME) as acme, sdk(gateway, BOLT) as bolt:
        uploaded = await acme.files.create(file=("in.jsonl", batch_lines(6)), purpose="batch")
        assert uploaded.bytes > 0 and uploaded.purpose == "batch"
        assert (await acme.files.content(uploaded.id)).content == batch_lines(6)
        batch = await acme.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
            metadata={"run": "nightly"},
        )  # fmt: skip
        assert batch.status == "validating" and batch.metadata == {"run": "nightly"}

        async def ended() -> bool:
            return (await acme.batches.retrieve(batch.id)).status == "completed"

        await wait_until(ended, 60, "the batch to complete")
        done = await acme.batches.retrieve(batch.id)
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (7, 6, 1)  # type: ignore[union-attr]
        output = [json.loads(line) for line in (await acme.files.content(done.output_file_id)).text.splitlines()]  # type: ignore[arg-type]
        assert sorted(r["custom_id"] for r in output) == [f"c{i}" for i in range(6)]
        assert all(r["response"]["body"]["choices"][0]["message"]["content"] == "t0 t1 " for r in output)
        errors = [json.loads(line) for line in (await acme.files.content(done.error_file_id)).text.splitlines()]  # type: ignore[arg-type]
        assert len(errors) == 1 and errors[0]["error"] is not None
        assert [b.id async for b in acme.batches.list()] == [batch.id]

        with pytest.raises(openai.NotFoundError):
            await bolt.batches.retrieve(batch.id)
        with pytest.raises(openai.NotFoundError):
            await bolt.files.content(uploaded.id)
        assert [b.id async for b in bolt.batches.list()] == []

        slow = await acme.files.create(file=("slow.jsonl", batch_lines(20, hang=True)), purpose="batch")
        doomed = await acme.batches.create(input_file_id=slow.id, endpoint="/v1/completions", completion_window="24h")
        assert (await acme.batches.cancel(doomed.id)).status in ("cancelling", "cancelled")

        async def cancelled() -> bool:
            return (await acme.batches.retrieve(doomed.id)).status == "cancelled"

        await wait_until(cancelled, 60, "the batch to be cancelled")
        assert (await acme.files.delete(uploaded.id)).deleted
        with pytest.raises(openai.NotFoundError):
            await acme.files.retrieve(uploaded.id)


async def test_without_keys_it_refuses_to_listen_beyond_loopback(settings: Settings) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_API_KEYS")}
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=60, env=worker_env(settings, **env))
    refused = await asyncio.to_thread(run, inferq_argv("gateway", "--host", "0.0.0.0", "--port", str(free_port())))
    assert refused.returncode != 0 and "loopback only" in refused.stderr and "INFERQ_API_KEYS" in refused.stderr


@pytest.fixture
async def client_for_results(redis: Redis, settings: Settings) -> AsyncIterator[Any]:
    """What the test reads straight from Redis: the stored state of the gateway's requests."""
    keys = Keys(settings.key_prefix)

    class Reader:
        async def is_status(self, request_id: str, status: str) -> bool:
            return await redis.hget(keys.result(request_id), "status") == status.encode()  # type: ignore[no-any-return]

        async def attempts(self, request_id: str) -> int:
            return int(await redis.hget(keys.result(request_id), "attempts") or 0)  # type: ignore[misc]

        async def only_request(self, tenant: str) -> str:
            found = [k.decode() async for k in redis.scan_iter(match=keys.results_pattern(f"{tenant}:"))]
            assert len(found) == 1, found
            return found[0].removeprefix(f"{keys.prefix}:r:").rpartition(":")[0]  # less the shard's tag

    yield Reader()
