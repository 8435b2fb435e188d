"""Redis's time a request, by Lua script: where `inferq bench capacity`'s EVALSHA time goes.

    python benchmarks/script_cost.py --requests 10000

One fresh embedded server, one stand-in worker (an engine that costs nothing) and a bulk caller that admits the
requests in batches (`enqueue_many`, up to 256 a script call, as a busy lane's submits go). Redis's SLOWLOG at
threshold 0 records every command it runs with its duration; the script calls are told apart by their SHA.
Prints µs of Redis time a request for each script (admission, the worker's read, start and finish) and for the
other commands. SLOWLOG costs Redis a little per command, so the sum is above what `bench capacity` reports;
the split between scripts is what this is for.
"""

from __future__ import annotations

import argparse
from collections import Counter

from common import admit_and_drain, one_worker

from inferq.producer.admission import ADMIT
from inferq.shared import aio
from inferq.worker import scripts


async def measure(n: int) -> tuple[Counter[str], Counter[str]]:
    """(µs, calls) by script or command over admitting and draining `n` requests."""
    args = ["--engine", "standin", "--max-inflight", "256"]
    async with one_worker("sc", "benchq", args, {"INFERQ_STANDIN_STEP_MS": "0"}) as client:
        redis = client.redis
        await redis.config_set("slowlog-max-len", 30 * n)  # every command of the run, scripts' own included
        await redis.config_set("slowlog-log-slower-than", 0)
        await redis.slowlog_reset()
        built = await admit_and_drain(client, "benchq", n)
        await redis.config_set("slowlog-log-slower-than", 10_000)
        log = await redis.slowlog_get(30 * n)
        ended = Counter([(await client.get(request.id)).status for request in built])
        if ended != Counter(done=n):
            raise SystemExit(f"not every request ended done: {dict(ended)}")
    names = {script.sha: script.name for script in (ADMIT, scripts.READ_LANES, scripts.START, scripts.FINISH)}
    spent: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    for entry in log:
        words = entry["command"].split()
        name = words[0].decode().lower()
        if name == "evalsha":
            name = names.get(words[1].decode(), "another script")
        spent[name] += entry["duration"]
        calls[name] += 1
    return spent, calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=10_000, help="requests to admit and drain")
    n = p.parse_args().requests
    spent, calls = aio.run(measure(n))
    print(f"Redis time a request over {n:,} requests (SLOWLOG at 0), by script or command:")
    for name, us in spent.most_common():
        if us / n >= 0.05:
            print(f"  {name:24s} {us / n:7.2f} µs   ({calls[name]:,} calls, {us / calls[name]:,.1f} µs a call)")
    print(f"  {'in all':24s} {sum(spent.values()) / n:7.2f} µs")


if __name__ == "__main__":
    main()
