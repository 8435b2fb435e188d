"""Where a request's time goes: the client's send to the entry's time in the stream (admission), to the
worker's start (pick-up), to the engine's first token, to its arrival at the client (publish); then the
engine's run to the last token, and the final result's way back to the client. From the stored result's
timestamps and the client's own clock (one machine, one clock).

One request at a time by default; with --concurrency N, N at once in a closed loop (each sends its next
request when its last one ended), as `inferq bench online` loads the queue:

    python benchmarks/ttft_breakdown.py --model tiny --requests 200 [--engine standin]
    python benchmarks/ttft_breakdown.py --model tiny --concurrency 128 --requests 2048 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import itertools

from common import Trip, one_worker, timed_request

from inferq.bench.stats import spread
from inferq.shared import aio

PARTS = (
    "admission", "pick-up", "engine to first token", "publish to client", "time to first token", "engine run",
    "final to client", "end to end",
)  # fmt: skip


def parts(trip: Trip) -> tuple[float, ...] | None:
    t, first = trip.timings, trip.first
    if first is None or not (t.queued_at and t.started_at and t.first_token_at and t.finished_at):
        return None
    return (
        t.queued_at - trip.sent,
        t.started_at - t.queued_at,
        t.first_token_at - t.started_at,
        first - t.first_token_at,
        first - trip.sent,
        t.finished_at - t.started_at,
        trip.done - t.finished_at,
        trip.done - trip.sent,
    )


async def main(args: argparse.Namespace) -> None:
    samples: dict[str, list[float]] = {p: [] for p in PARTS}
    worker_args = ["--engine", args.engine, "--max-inflight", str(max(args.concurrency, 256))]
    async with one_worker("ttft", args.model, worker_args) as client:
        numbers = itertools.count()

        async def loop(count: int, keep: bool) -> None:
            for _ in range(count):
                i = next(numbers)
                prompt = f"the queue holds requests {i}"
                trip = await timed_request(client, prompt=prompt, max_tokens=args.max_tokens, temperature=0)
                measured = parts(trip)
                if keep and measured is not None:
                    for name, value in zip(PARTS, measured, strict=True):
                        samples[name].append(value)

        per_loop = -(-args.warmup // args.concurrency)
        await asyncio.gather(*(loop(per_loop, False) for _ in range(args.concurrency)))
        per_loop = -(-args.requests // args.concurrency)
        await asyncio.gather(*(loop(per_loop, True) for _ in range(args.concurrency)))
    how = "one at a time" if args.concurrency == 1 else f"{args.concurrency} at once"
    print(f"model {args.model}, engine {args.engine}, {len(samples['admission'])} requests {how}, "
          f"{args.max_tokens} tokens each")  # fmt: skip
    print("(ms; the stream entry's time, queued_at, has 1 ms resolution)")
    print(f"{'part':<24}{'p50':>9}{'p90':>9}{'p99':>9}{'mean':>9}")
    for name, values in samples.items():
        s = spread(values)
        print(f"{name:<24}{s['p50']:>9.2f}{s['p90']:>9.2f}{s['p99']:>9.2f}{s['mean']:>9.2f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--engine", default="vllm")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight at once (closed loop)")
    p.add_argument("--max-tokens", type=int, default=8)
    aio.run(main(p.parse_args()))
