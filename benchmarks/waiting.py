"""What a backlog of waiting clients costs: N requests queued with no worker, each with a caller awaiting its
result (or reading its tokens), for S seconds. Prints the client process's CPU time over the wait and how
many times the callers read the stored result (HGETALL) meanwhile: the price of waiting, with nothing to show
for it, that a gateway or service holding thousands of requests during a deep backlog pays.

    python benchmarks/waiting.py --requests 10000 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import time

from common import temp_server

from inferq.producer import InferenceClient
from inferq.shared import aio
from inferq.shared.settings import load_settings

MODEL = "waitq"


async def _reads(client: InferenceClient) -> int:
    return int((await client.redis.info("commandstats")).get("cmdstat_hgetall", {}).get("calls", 0))


async def wait(n: int, seconds: float, stream: bool) -> dict[str, float]:
    server, _ = temp_server()
    try:
        settings = load_settings(redis_url=server.url, model=MODEL, max_queue_len=n, request_timeout_s=3600)
        async with InferenceClient(settings) as client:
            handles = [await client.submit(prompt="waiting", max_tokens=1, stream=stream) for _ in range(n)]

            async def caller(handle) -> None:  # type: ignore[no-untyped-def]
                if stream:
                    async for _ in handle.tokens():
                        pass
                else:
                    await handle.result()

            reads0, cpu0 = await _reads(client), time.process_time()
            callers = [asyncio.create_task(caller(h)) for h in handles]
            await asyncio.sleep(seconds)
            cpu, reads = time.process_time() - cpu0, await _reads(client) - reads0
            for task in callers:
                task.cancel()
            await asyncio.gather(*callers, return_exceptions=True)
        return {"cpu_s": cpu, "reads": reads}
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=10_000, help="requests waiting, one caller each")
    p.add_argument("--seconds", type=float, default=20.0, help="how long they wait")
    p.add_argument("--stream", action="store_true", help="callers read tokens() instead of awaiting result()")
    args = p.parse_args()
    r = aio.run(wait(args.requests, args.seconds, args.stream))
    how = "tokens()" if args.stream else "result()"
    print(f"{args.requests:,} callers in {how}, {args.seconds:g} s with no worker: client CPU {r['cpu_s']:.2f} s "
          f"({100 * r['cpu_s'] / args.seconds:.0f}% of a core), {r['reads']:,.0f} reads of the store")  # fmt: skip


if __name__ == "__main__":
    main()
