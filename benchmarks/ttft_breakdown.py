"""Where inferq's time to first token goes, one request at a time: the client's send to the entry's time in
the stream (admission), to the worker's start (pick-up), to the engine's first token, to its arrival at the
client (publish). From the stored result's timestamps and the client's own clock (one machine, one clock).

    python benchmarks/ttft_breakdown.py --model tiny --requests 200 [--engine standin]
"""

from __future__ import annotations

import argparse
import time

from common import first_event, one_worker  # first: it puts the repo root on sys.path

from shared import aio
from shared.benchstats import spread

PARTS = ("admission", "pick-up", "engine to first token", "publish to client", "total")


async def main(args: argparse.Namespace) -> None:
    samples: dict[str, list[float]] = {p: [] for p in PARTS}
    async with one_worker("ttft", args.model, ["--engine", args.engine]) as client:
        for i in range(args.warmup + args.requests):
            sent = time.time()
            first, t = await first_event(client, prompt=f"the queue holds requests {i}", max_tokens=8, temperature=0)
            if i < args.warmup or None in (first, t.queued_at, t.started_at, t.first_token_at):
                continue
            assert first is not None and t.queued_at and t.started_at and t.first_token_at
            parts = (
                t.queued_at - sent,
                t.started_at - t.queued_at,
                t.first_token_at - t.started_at,
                first - t.first_token_at,
                first - sent,
            )
            for name, value in zip(PARTS, parts, strict=True):
                samples[name].append(value)
    print(f"model {args.model}, engine {args.engine}, {args.requests} requests one at a time")
    print("(ms; the stream entry's time, queued_at, has 1 ms resolution)")
    print(f"{'part':<24}{'p50':>8}{'p90':>8}{'p99':>8}{'mean':>8}")
    for name, values in samples.items():
        s = spread(values)
        print(f"{name:<24}{s['p50']:>8.2f}{s['p90']:>8.2f}{s['p99']:>8.2f}{s['mean']:>8.2f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--engine", default="vllm")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    aio.run(main(p.parse_args()))
