"""Does the vLLM worker starve its neighbours? One request at a time through inferq, once per
INFERQ_WORKER_NICE value, side by side: how late each request's first token event reaches the client
after the worker had it (a burst: every event of the request arrives at its end), and how often a thread
in this (client) process that sleeps 2 ms wakes more than 20 ms late.

    python benchmarks/stall_probe.py --model tiny --requests 300 --nice 0,5
"""

from __future__ import annotations

import argparse
import threading
import time

from common import first_event, one_worker

from inferq.bench.online import fixed_prompts
from inferq.bench.stats import spread
from inferq.shared import aio

LATE_S = 0.020  # a 2 ms sleep this late, or a first event this long after the worker had it, is a stall


class SleepProbe:
    """A thread that sleeps 2 ms at a time and counts the wake-ups that came more than LATE_S late."""

    def __init__(self) -> None:
        self.late: list[float] = []
        self.wakes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.perf_counter()
            time.sleep(0.002)
            self.wakes += 1
            if (late := time.perf_counter() - t - 0.002) > LATE_S:
                self.late.append(late)

    def __enter__(self) -> SleepProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def one_setting(model: str, nice: int, requests: int) -> dict[str, float]:
    lags: list[float] = []
    extra = {"INFERQ_WORKER_NICE": str(nice)}
    async with one_worker("stall", model, ["--no-bulk-jobs"], extra) as client:
        with SleepProbe() as probe:
            for prompt in fixed_prompts(requests, 16, 32):
                first, timings = await first_event(
                    client, prompt=prompt.text, model=model, max_tokens=32, temperature=0
                )
                worker_first = timings.first_token_at
                if first is not None and worker_first is not None:
                    lags.append(first - worker_first)
    s = spread(lags)
    return {
        "nice": nice,
        "requests": len(lags),
        "bursts": sum(lag > LATE_S for lag in lags),
        "lag p50 ms": s["p50"],
        "lag p99 ms": s["p99"],
        "late wake-ups": len(probe.late),
        "worst wake-up ms": max(probe.late, default=0.0) * 1e3,
    }


async def main(args: argparse.Namespace) -> None:
    rows = [await one_setting(args.model, nice, args.requests) for nice in args.nice]
    print(f"model {args.model}, {args.requests} requests one at a time, 32 tokens each")
    print(f"{'INFERQ_WORKER_NICE':<22}" + "".join(f"{r['nice']:>12.0f}" for r in rows))
    for key in ("requests", "bursts", "lag p50 ms", "lag p99 ms", "late wake-ups", "worst wake-up ms"):
        print(f"{key:<22}" + "".join(f"{r[key]:>12.1f}" for r in rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--nice", type=lambda v: [int(x) for x in v.split(",")], default=[0, 5])
    aio.run(main(parser.parse_args()))
