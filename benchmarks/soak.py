"""Soak: two workers, thousands of requests, one worker SIGKILLed and restarted again and again.

    python benchmarks/soak.py --engine standin --requests 2000 --rate 100 --kill-every 3
    python benchmarks/soak.py --engine vllm --model tiny --requests 2000 --rate 40 --kill-every 8

A steady worker and a victim serve one queue; every --kill-every seconds (after the victim is ready) the
victim and its engine get SIGKILL mid-generation and a new victim starts. Requests are submitted at --rate
per second, half streaming tokens, half non-streaming with a durable reply stream; the kills go on until
every request has ended. At the end it prints
submitted / done / failed / lost / duplicated: lost (no final state) and duplicated (two final writes, or
two reply-stream records for one request) must both be 0. Re-runs (a request started again after its
worker died) are expected and counted separately.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from collections import Counter

from common import spawn_worker, temp_server, wait_ready

from inferq.producer import InferenceClient, RequestHandle
from inferq.shared import aio
from inferq.shared.codec import unpack
from inferq.shared.keys import Keys, bulk_request_id
from inferq.shared.schemas import Result
from inferq.shared.settings import load_settings

PREFIX = "soak"


async def soak(args: argparse.Namespace) -> dict[str, object]:
    server, data = temp_server()
    keys = Keys(PREFIX)
    env = {"INFERQ_CLAIM_IDLE_MS": str(args.claim_idle_ms), "INFERQ_HEARTBEAT_S": "0.5"}
    engine = ["--engine", args.engine, "--model", args.model, "--max-inflight", str(args.max_inflight)]
    settings = load_settings(redis_url=server.url, key_prefix=PREFIX, model=args.model, request_timeout_s=600)
    procs = {}

    def start(name: str) -> None:
        procs[name] = spawn_worker(server.url, PREFIX, name, engine, data / f"{name}.log", env)

    kills = 0
    try:
        async with InferenceClient(settings) as client:
            start("steady")
            start("victim-0")
            for name in list(procs):
                await wait_ready(client.redis, PREFIX, name, procs[name], data / f"{name}.log")

            async def killer() -> None:  # until every request has ended: takeovers happen under fire too
                nonlocal kills
                while True:
                    await asyncio.sleep(args.kill_every)
                    victim = f"victim-{kills}"
                    os.killpg(procs[victim].pid, signal.SIGKILL)  # the worker and its engine core
                    procs[victim].wait()
                    kills += 1
                    start(f"victim-{kills}")
                    name = f"victim-{kills}"
                    await wait_ready(client.redis, PREFIX, name, procs[name], data / f"{name}.log")

            async def follow(handle: RequestHandle) -> Result:
                if handle.request.stream:
                    async for _ in handle.tokens(timeout=args.timeout):
                        pass
                return await handle.result(timeout=args.timeout)

            killing = asyncio.create_task(killer())
            handles: list[RequestHandle] = []
            followers = []
            t0 = time.perf_counter()
            for i in range(args.requests):
                stream = i % 2 == 0
                handle = await client.submit(
                    prompt=f"soak request {i}", request_id=bulk_request_id("soak", 0, str(i)),
                    max_tokens=args.max_tokens, temperature=0, stream=stream,
                    reply_stream=None if stream else keys.done("soak"),
                )  # fmt: skip
                handles.append(handle)
                followers.append(asyncio.create_task(follow(handle)))
                await asyncio.sleep(max(0.0, t0 + (i + 1) / args.rate - time.perf_counter()))
            results = await asyncio.gather(*followers, return_exceptions=True)
            wall = time.perf_counter() - t0
            killing.cancel()
            states = Counter(r.status if isinstance(r, Result) else "lost" for r in results)
            records = Counter(unpack(f[b"m"])["id"] for _, f in await client.redis.xrange(keys.done("soak")))
            twice = {h.id for h in handles if records[h.id] > 1}
            for h in handles:
                if await client.redis.hget(keys.result(h.id), "duplicates"):
                    twice.add(h.id)
            reruns = sum(1 for r in results if isinstance(r, Result) and r.attempts > 1)
            backlog = sum([await client.redis.xlen(q) for q in keys.queues(args.model)])
            pending = 0
            for q in keys.queues(args.model):
                pending += sum(int(g["pending"]) for g in await client.redis.xinfo_groups(q))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            proc.wait()
        server.stop()
    return {
        "engine": args.engine, "model": args.model, "requests": args.requests, "kills": kills,
        "submitted": len(handles), "done": states["done"], "failed": states["failed"],
        "lost": states["lost"], "duplicated": len(twice), "re-run after a kill": reruns,
        "left in streams": backlog, "left pending": pending, "wall_s": round(wall, 1),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", default="standin", choices=["standin", "vllm"])
    p.add_argument("--model", default="tiny")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--rate", type=float, default=100.0, help="requests submitted per second")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-inflight", type=int, default=64)
    p.add_argument("--kill-every", type=float, default=3.0, help="seconds between kills, after the victim is ready")
    p.add_argument("--claim-idle-ms", type=int, default=2000)
    p.add_argument("--timeout", type=float, default=600.0)
    args = p.parse_args()
    report = aio.run(soak(args))
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(report))
    if report["lost"] or report["duplicated"]:
        raise SystemExit(1)


if __name__ == "__main__":  # vLLM spawns its engine core: keep the child from re-running this
    main()
