"""How fast one worker drains a queue that is already full: the worker and Redis alone, no producer waiting.

    python benchmarks/drain.py --requests 30000 --read-batch 1000000,32 --rounds 3

Per run: a fresh embedded server, one stand-in worker (an engine that costs nothing, `--max-inflight` slots)
with `INFERQ_READ_BATCH` set to one of the values given, and a bulk caller that admits the requests (one token,
unstreamed) in batches as fast as Redis takes them; the clock runs from the first admission until the
last entry is gone. Prints requests/s and the CPU each process spent a request (the worker's, and Redis's with
the admissions'). The values take turns, `--rounds` times, so they meet the box in the same state: this
box drifts by a fifth to a third over minutes, and only runs side by side compare.
"""

from __future__ import annotations

import argparse
import time

import psutil
from common import admit_and_drain, one_worker

from inferq.bench.idle import cpu_seconds
from inferq.producer import InferenceClient
from inferq.shared import aio

MODEL = "drainq"


async def _worker_cpu(client: InferenceClient) -> float:
    """The worker's CPU seconds so far (its pid from its heartbeat; one_worker names it `w`)."""
    pid = int(await client.redis.hget(client.keys.worker("w"), "pid") or 0)
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def drain(n: int, read_batch: int, slots: int) -> dict[str, float]:
    args = ["--engine", "standin", "--max-inflight", str(slots)]
    env = {"INFERQ_STANDIN_STEP_MS": "0", "INFERQ_READ_BATCH": str(read_batch)}
    async with one_worker("drain", MODEL, args, env) as client:
        redis_pid = int((await client.redis.info("server"))["process_id"])
        worker0, redis0 = await _worker_cpu(client), cpu_seconds([redis_pid])
        start = time.perf_counter()
        built = await admit_and_drain(client, MODEL, n)
        wall = time.perf_counter() - start
        worker, redis = await _worker_cpu(client) - worker0, cpu_seconds([redis_pid]) - redis0
        done = sum([(await client.get(request.id)).status == "done" for request in built])
        if done != n:
            raise SystemExit(f"only {done:,} of {n:,} requests ended done")
    return {"per_s": n / wall, "worker_us": 1e6 * worker / n, "redis_us": 1e6 * redis / n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=30_000, help="requests to admit and drain a run")
    p.add_argument("--read-batch", default="32", help="INFERQ_READ_BATCH values to compare, comma-separated")
    p.add_argument("--slots", type=int, default=256, help="the worker's --max-inflight")
    p.add_argument("--rounds", type=int, default=1, help="runs of each value, taking turns")
    args = p.parse_args()
    values = [int(v) for v in args.read_batch.split(",")]
    print(f"{args.requests:,} requests, one stand-in worker of {args.slots} slots; CPU a request: worker / Redis")
    print(f"{'round':>5}{'read_batch':>12}{'requests/s':>12}{'worker µs':>11}{'Redis µs':>10}")
    for round_ in range(1, args.rounds + 1):
        for value in values:
            r = aio.run(drain(args.requests, value, args.slots))
            print(f"{round_:>5}{value:>12,}{r['per_s']:>12,.0f}{r['worker_us']:>11.1f}{r['redis_us']:>10.1f}")


if __name__ == "__main__":
    main()
