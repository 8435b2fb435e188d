"""A worker's /metrics, /ready and JSON request logs (docs/METRICS.md), scraped over HTTP from real worker
processes on the stand-in engine, where every count is known. vLLM's own series from a vLLM worker: test_vllm.py."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from inferq.producer import InferenceClient
from inferq.shared.errors import QueueFull
from inferq.shared.keys import Keys
from inferq.shared.settings import Settings
from tests.conftest import ROOT, drained, free_port, wait_until

MODEL = "metered"
FAST_CLAIMS = {"INFERQ_CLAIM_IDLE_MS": "1000", "INFERQ_HEARTBEAT_S": "0.3"}


def documented_series() -> list[str]:
    """The inferq series docs/METRICS.md lists (first column of its tables)."""
    text = (ROOT / "docs" / "METRICS.md").read_text()
    return re.findall(r"^\| `(inferq_[a-z_]+)` \|", text, flags=re.MULTILINE)


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as response:
        assert response.status == 200 and response.content_type == "text/plain"
        body = await response.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted({"model": MODEL, **labels}.items()))), 0.0)


async def get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, await response.text()


async def test_every_documented_series_moves_by_what_happened(settings: Settings, redis: Redis, start_worker) -> None:
    cfg = settings.merged(max_queue_len=5)
    keys = Keys(cfg.key_prefix)
    async with InferenceClient(cfg) as client:
        handles = [await client.submit(prompt=f"r{i}", model=MODEL, max_tokens=3 + i, stream=False) for i in range(5)]
        for _ in range(2):
            with pytest.raises(QueueFull):
                await client.submit(prompt="one too many", model=MODEL, max_tokens=3)
        await redis.xadd(keys.queue(MODEL), {"m": b"\xc1 not msgpack"})  # poison: dead-lettered, no request
        # What a hostile producer may write beside admit.lua's counters: neither a label nor a broken scrape.
        await redis.hset(keys.refusals(MODEL), mapping={"normal:made_up": 7, "normal:tenant_cap": "many"})
        port = free_port()
        worker = start_worker(
            "--engine", "standin", "--model", MODEL, "--metrics-port", str(port), "--log-format", "json",
            "--log-requests", cfg=cfg,
        )  # fmt: skip
        results = [await h.result(timeout=30) for h in handles]
    assert [r.status for r in results] == ["done"] * 5
    await wait_until(lambda: _empty(redis, cfg), 30, "the queue to drain")

    samples = await scrape(port)
    names = {name for name, _ in samples}
    missing = [s for s in documented_series() if s not in names and f"{s}_count" not in names]
    assert documented_series() and missing == [], f"documented but not served: {missing}"
    assert value(samples, "inferq_requests_ended_total", lane="normal", status="done") == 5
    assert value(samples, "inferq_requests_ended_total", lane="normal", status="failed") == 0
    assert value(samples, "inferq_bad_entries_total", lane="normal") == 1
    assert value(samples, "inferq_generation_tokens_total") == sum(3 + i for i in range(5))
    assert value(samples, "inferq_queue_wait_seconds_count", lane="normal") == 5  # the poison never ran
    assert value(samples, "inferq_request_duration_seconds_count", lane="normal") == 5
    assert value(samples, "inferq_admissions_total", lane="normal") == 6  # five requests and the poison
    assert value(samples, "inferq_refusals_total", lane="normal", reason="queue_full") == 2
    assert {dict(labels)["reason"] for name, labels in samples if name == "inferq_refusals_total"} == {"queue_full"}
    assert value(samples, "inferq_dead_letters") == 1
    for gauge in ("inferq_lane_length", "inferq_lane_lag", "inferq_lane_pending"):
        assert value(samples, gauge, lane="normal") == 0
    assert value(samples, "inferq_slots") == cfg.max_inflight and value(samples, "inferq_requests_running") == 0
    assert any(name.startswith("process_") for name in names)  # what vllm serve's /metrics carries too
    assert await get(port, "/ready") == (200, "ready\n")
    assert await get(port, "/health") == (200, "ok\n")

    worker.stop()
    lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    assert len(lines) == len(worker.log().splitlines())  # every line a JSON object
    ended = {line["request_id"]: line for line in lines if line.get("logger") == "inferq.requests"}
    assert set(ended) >= {h.id for h in handles}
    for h in handles:
        line = ended[h.id]
        assert (line["model"], line["lane"], line["worker"], line["status"]) == (MODEL, "normal", "w0", "done")
        assert line["completion_tokens"] == h.request.max_tokens
        assert 0 <= line["queued_s"] <= line["ttft_s"] <= line["total_s"] and line["run_s"] <= line["total_s"]


async def _empty(redis: Redis, cfg: Settings) -> bool:
    return await drained(redis, cfg, MODEL) == (0, 0)


async def test_taking_over_a_dead_workers_entries_is_counted(settings: Settings, redis: Redis, start_worker) -> None:
    keys = Keys(settings.key_prefix)
    victim = start_worker("--engine", "standin", "--model", MODEL, name="victim", env=FAST_CLAIMS)
    async with InferenceClient(settings) as client:
        handles = [await client.submit(prompt=f"long {i}", model=MODEL, max_tokens=20_000) for i in range(3)]

        async def all_running() -> bool:
            states = [await redis.hget(keys.result(h.id), "status") for h in handles]
            return states == [b"running"] * 3

        await wait_until(all_running, 30, "the victim to run all three")
        victim.kill()
        port = free_port()
        start_worker(
            "--engine", "standin", "--model", MODEL, "--metrics-port", str(port), name="survivor", env=FAST_CLAIMS
        )
        results = await asyncio.gather(*(h.result(timeout=120) for h in handles))
    assert [(r.status, r.worker, r.attempts) for r in results] == [("done", "survivor", 2)] * 3
    samples = await scrape(port)
    assert value(samples, "inferq_claims_taken_over_total", lane="normal") == 3
    assert value(samples, "inferq_redeliveries_total", lane="normal") == 3
    assert value(samples, "inferq_requests_ended_total", lane="normal", status="done") == 3
    assert value(samples, "inferq_generation_tokens_total") == 3 * 20_000


async def test_a_taken_metrics_port_is_one_line_before_anything_loads(settings: Settings, start_worker) -> None:
    port = free_port()
    start_worker("--engine", "standin", "--model", MODEL, "--metrics-port", str(port))
    second = start_worker("--engine", "standin", "--model", MODEL, "--metrics-port", str(port), wait=False)
    assert second.wait(60) != 0
    last = second.log().strip().splitlines()[-1]
    assert last.startswith(f"error: cannot serve metrics on 127.0.0.1:{port}") and "--metrics-port" in last
