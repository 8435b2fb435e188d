"""`inferq bench queue`: what the Redis layer costs, with no model in the way. Stand-in workers
(a deterministic fake engine: one token per millisecond) serve closed-loop producers; for 1, 2, 4, 8 workers
and 1, 8, 64 producers it reports requests/s end to end, the latency added outside the engine per request
(end to end minus the engine's own time, p50/p99) and Redis's CPU. Next to it, raw pipelined XADD/s on the
same server: the limit of any queue on it."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
import uuid
from typing import Any

from inferq.bench.server import temporary_server
from inferq.producer.client import InferenceClient
from inferq.producer.local import local_worker
from inferq.shared.codec import pack
from inferq.shared.schemas import GenerationRequest
from inferq.shared.settings import Settings, load_settings

MODEL = "benchq"


async def raw_xadd_per_s(client: InferenceClient, n: int = 20_000, batch: int = 256) -> float:
    """Pipelined XADD of msgpacked requests like inferq's, no checks: the server's ceiling."""
    payloads = [
        pack(GenerationRequest(id=uuid.uuid4().hex, model=MODEL, prompt=f"prompt {i}", max_tokens=16).payload())
        for i in range(n)
    ]
    key = f"{client.settings.key_prefix}:rawxadd"
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        async with client.redis.pipeline(transaction=False) as pipe:
            for payload in payloads[start : start + batch]:
                pipe.xadd(key, {"m": payload})
            await pipe.execute()
    rate = n / (time.perf_counter() - t0)
    await client.redis.delete(key)
    return rate


async def _redis_cpu_s(client: InferenceClient) -> float:
    info = await client.redis.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def closed_loop(client: InferenceClient, producers: int, seconds: float, max_tokens: int) -> dict[str, Any]:
    """`producers` callers, each submitting its next request when the last one ended, for `seconds`."""
    added: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def producer() -> None:
        nonlocal errors
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            handle = await client.submit(
                prompt="queue bench", model=MODEL, max_tokens=max_tokens, stream=False, wait=True
            )
            result = await handle.result()
            e2e = time.perf_counter() - t0
            t = result.timings
            if result.status != "done" or t.started_at is None or t.finished_at is None:
                errors += 1
                continue
            added.append(e2e - (t.finished_at - t.started_at))  # all but the engine's own time

    cpu0, t0 = await _redis_cpu_s(client), time.perf_counter()
    await asyncio.gather(*(producer() for _ in range(producers)))
    wall = time.perf_counter() - t0
    cpu = await _redis_cpu_s(client) - cpu0
    ordered = sorted(added) or [0.0]
    return {
        "producers": producers, "completed": len(added), "errors": errors, "requests_per_s": len(added) / wall,
        "added_ms_p50": 1000 * statistics.median(ordered),
        "added_ms_p99": 1000 * ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
        "redis_cpu_pct": 100 * cpu / wall,
    }  # fmt: skip


async def _wait_workers(client: InferenceClient, n: int) -> None:
    """Until `n` heartbeats exist (a heartbeat is only visible by asking Redis)."""
    while len([k async for k in client.redis.scan_iter(match=client.keys.workers_pattern())]) < n:  # noqa: ASYNC110
        await asyncio.sleep(0.1)


async def bench_queue(
    base: Settings,
    *,
    workers: list[int],
    producers: list[int],
    seconds: float = 5.0,
    max_tokens: int = 16,
    on_row: Any = lambda row: None,
) -> dict[str, Any]:
    server = temporary_server()
    settings = load_settings(redis_url=server.url, key_prefix="benchq", model=MODEL, data_dir=base.data_dir)
    rows = []
    try:
        async with InferenceClient(settings) as client, contextlib.AsyncExitStack() as fleet:
            raw = await raw_xadd_per_s(client)
            started = 0
            for target in sorted(workers):
                while started < target:
                    await fleet.enter_async_context(
                        local_worker(settings, model=MODEL, engine="standin", args=("--max-inflight", "256"))
                    )
                    started += 1
                await _wait_workers(client, target)
                for n in producers:
                    row = {"workers": target, **await closed_loop(client, n, seconds, max_tokens)}
                    rows.append(row)
                    on_row(row)
    finally:
        server.stop()
    return {"raw_xadd_per_s": raw, "tokens_per_request": max_tokens, "seconds_per_cell": seconds, "rows": rows}
