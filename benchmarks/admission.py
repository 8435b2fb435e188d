"""Admission throughput: submits through the capped admission script vs. raw pipelined XADD, same server.

    python benchmarks/admission.py --requests 20000 --batch 256

Three figures, side by side, against one fresh embedded valkey-server:
  raw XADD         pipelined XADD of the same requests, msgpacked (the limit: no checks, no result hash)
  admit.lua        the admission path for bulk callers (Admitter.admit_many): lane cap, lag and tenant
                   checks, XADD, the queued result with its TTL, `batch` requests per script call
  client.submit    one submit per caller, `batch` callers at once: validation, msgpack, a task and a reply
                   route per request, the same script (their submits of one loop turn share a call)
The bar (issue 4): admission with the check within 2x of raw XADD.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time
import uuid

from common import temp_server

from inferq.producer import InferenceClient
from inferq.producer.admission import Admitter
from inferq.shared import aio
from inferq.shared.codec import pack
from inferq.shared.schemas import GenerationRequest
from inferq.shared.settings import load_settings


def request(i: int, model: str) -> GenerationRequest:
    return GenerationRequest(
        id=uuid.uuid4().hex, model=model, prompt=f"benchmark prompt number {i} " * 4, max_tokens=64,
        created_at=time.time(), reply_channel="inferq:t:bench",
    )  # fmt: skip


async def raw_xadd(url: str, n: int, batch: int, tag: str) -> float:
    from redis.asyncio import Redis

    requests = [request(i, "raw") for i in range(n)]
    async with Redis.from_url(url) as r:
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            async with r.pipeline(transaction=False) as pipe:
                for q in requests[start : start + batch]:
                    pipe.xadd(f"raw{tag}:q", {"m": pack(q.payload())})  # packed here, as admission packs
                await pipe.execute()
        return n / (time.perf_counter() - t0)


async def script_only(url: str, n: int, batch: int, tag: str) -> float:
    from redis.asyncio import Redis

    settings = load_settings(redis_url=url, key_prefix=f"script{tag}", max_queue_len=n + 1)
    requests = [request(i, "script") for i in range(n)]
    async with Redis.from_url(url) as r:
        admitter = Admitter(r, settings)
        admitter.start()
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            await admitter.admit_many(requests[start : start + batch])
        rate = n / (time.perf_counter() - t0)
        await admitter.stop()
    return rate


async def client_submit(url: str, n: int, batch: int, tag: str) -> float:
    settings = load_settings(redis_url=url, key_prefix=f"client{tag}", max_queue_len=n + 1)
    async with InferenceClient(settings) as client:
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            await asyncio.gather(
                *(client.submit(prompt=f"benchmark prompt number {i} " * 4, model="client", max_tokens=64)
                  for i in range(start, min(start + batch, n)))
            )  # fmt: skip
        return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--batch", type=int, default=256, help="submits in flight at once (one pipeline)")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    server, _ = temp_server()
    rates: dict[str, list[float]] = {"raw XADD": [], "admit.lua": [], "client.submit": []}
    try:
        for n in range(args.rounds):  # fresh keys each round: every lane starts empty
            rates["raw XADD"].append(aio.run(raw_xadd(server.url, args.requests, args.batch, str(n))))
            rates["admit.lua"].append(aio.run(script_only(server.url, args.requests, args.batch, str(n))))
            rates["client.submit"].append(aio.run(client_submit(server.url, args.requests, args.batch, str(n))))
    finally:
        server.stop()
    print(f"machine: {platform.machine()}, Python {platform.python_version()}; {args.requests} requests, "
          f"batch {args.batch}, best of {args.rounds} rounds")  # fmt: skip
    raw = max(rates["raw XADD"])
    print(f"{'path':<16}{'per second':>12}{'raw / this':>12}  all rounds")
    for name, values in rates.items():
        best = max(values)
        print(f"{name:<16}{best:>12.0f}{raw / best:>12.2f}  {', '.join(f'{v:.0f}' for v in values)}")


if __name__ == "__main__":
    main()
