"""`inferq bench capacity`: how many requests per second the queue carries end to end through one Redis, where it
saturates, and what each request costs Redis.

Stand-in workers whose engine costs nothing (INFERQ_STANDIN_STEP_MS=0, one token a request) serve producers
that run in processes of their own, each an InferenceClient; a request counts once its producer holds the
result. Two loads, each measured after a warm-up, all processes up before the clock starts:

- closed loop: each producer process runs P callers that submit their next request when the last one ended;
- open loop: requests at a fixed offered rate, raised step by step until the queue falls behind (served less
  than 95% of the offered rate): the saturation point.

Per cell: requests/s end to end, latency p50/p99 (submit to result in hand; the engine adds nothing, so it is
all the queue's), Redis CPU, and per request the commands Redis ran and its socket reads (one per round trip
a client or worker made, pipelines counted once), and the CPU time each kind of process spent on it (workers,
producers, Redis: what a box of N cores can carry is N over their sum). Beside it, raw pipelined XADD/s on the
same server. With `--rounds N` every cell runs N times, each round on a fresh server and fresh workers, and
shows its median round with every round's requests/s.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import statistics
import time
from multiprocessing.connection import Connection
from typing import Any

from inferq.bench.idle import cpu_seconds
from inferq.bench.queue import MODEL, raw_xadd_per_s
from inferq.bench.server import temporary_server
from inferq.bench.stats import spread
from inferq.producer.client import InferenceClient
from inferq.producer.local import local_worker
from inferq.shared import aio
from inferq.shared.settings import Settings, load_settings
from inferq.worker.vllm_children import handed_down

_WARMUP_REQUESTS = 200  # per producer process, before it says it is ready
_GRACE_S = 10.0  # how long requests still out at the end of an open-loop cell may take to come back
_TICK_S = 0.005  # the open loop releases the requests due every 5 ms
_BEHIND = 0.95  # an open-loop cell served less than this share of its offered rate: saturated


# ---- one producer process --------------------------------------------------------------------------------
def _producer(url: str, prefix: str, mode: str, load: float, seconds: float, conn: Connection) -> None:
    """A producer process: warm up, say ready, wait for go, run `seconds` of `mode` load, send what it saw."""
    settings = load_settings(redis_url=url, key_prefix=prefix, model=MODEL)
    conn.send(aio.run(_produce(settings, mode, load, seconds, conn)))
    conn.close()


async def _produce(settings: Settings, mode: str, load: float, seconds: float, conn: Connection) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    async with InferenceClient(settings) as client:

        async def one(record: bool) -> None:
            nonlocal errors
            t0 = time.perf_counter()
            try:
                handle = await client.submit(prompt="capacity", model=MODEL, max_tokens=1, stream=False, wait=True)
                result = await handle.result(timeout=60)
            except Exception:
                errors += record
                return
            if result.status != "done":
                errors += record
            elif record:
                latencies.append(time.perf_counter() - t0)

        warm = asyncio.Semaphore(32)

        async def warm_one() -> None:
            async with warm:
                await one(False)

        await asyncio.gather(*(warm_one() for _ in range(_WARMUP_REQUESTS)))
        conn.send("ready")
        await asyncio.to_thread(conn.recv)  # go
        start = time.perf_counter()
        stop = start + seconds
        if mode == "closed":

            async def caller() -> None:
                while time.perf_counter() < stop:
                    await one(True)

            await asyncio.gather(*(caller() for _ in range(int(load))))
        else:
            tasks: list[asyncio.Task[None]] = []
            total = int(load * seconds)
            while len(tasks) < total:
                # Every request due by now goes; then one tick's sleep (not one timer per request: the load
                # generator shares the box's CPU with what it measures).
                due = min(int((time.perf_counter() - start) * load) + 1, total)
                tasks += [asyncio.create_task(one(True)) for _ in range(due - len(tasks))]
                await asyncio.sleep(_TICK_S)
            await asyncio.wait(tasks, timeout=_GRACE_S) if tasks else None
        wall = time.perf_counter() - start
    return {"latencies": latencies, "errors": errors, "wall_s": wall}


# ---- the bench -------------------------------------------------------------------------------------------
async def _redis_counters(client: InferenceClient) -> dict[str, float]:
    """Redis's CPU seconds, commands run (those scripts run included), socket reads, and calls per command."""
    cpu, stats = await client.redis.info("cpu"), await client.redis.info("stats")
    calls, persistence = await client.redis.info("commandstats"), await client.redis.info("persistence")
    return {
        "cpu_s": float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
        # rewrites started so far: those done, and the one running
        "aof_rewrites": sum(float(persistence.get(k, 0)) for k in ("aof_rewrites", "aof_rewrite_in_progress")),
        "commands": float(stats["total_commands_processed"]),
        "reads": float(stats["total_reads_processed"]),
        **{f"cmd {name.removeprefix('cmdstat_')}": float(c["calls"]) for name, c in calls.items()},
        **{f"usec {name.removeprefix('cmdstat_')}": float(c["usec"]) for name, c in calls.items()},
    }


async def _cell(
    client: InferenceClient, url: str, procs: int, mode: str, load: float, seconds: float, pids: dict[str, list[int]]
) -> dict:
    """One measurement: `procs` producer processes, each with `load` callers (closed) or `load` requests/s (open).
    `pids`: the workers' and Redis's processes, whose CPU is counted with the producers'."""
    context = multiprocessing.get_context("spawn")
    pipes, children = [], []
    for _ in range(procs):
        ours, theirs = context.Pipe()
        child = context.Process(
            target=_producer, args=(url, client.settings.key_prefix, mode, load, seconds, theirs), daemon=True
        )
        child.start()
        pipes.append(ours)
        children.append(child)
    try:
        for pipe in pipes:
            assert await asyncio.to_thread(pipe.recv) == "ready"
        pids = {**pids, "producers": [child.pid for child in children if child.pid is not None]}
        cpu_before = {kind: cpu_seconds(of) for kind, of in pids.items()}
        before, t0 = await _redis_counters(client), time.perf_counter()
        for pipe in pipes:
            pipe.send("go")
        reports = [await asyncio.to_thread(pipe.recv) for pipe in pipes]
        wall = time.perf_counter() - t0
        after = await _redis_counters(client)
        cpu = {kind: cpu_seconds(of) - cpu_before[kind] for kind, of in pids.items()}
    finally:
        for child in children:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
    latencies = [x for r in reports for x in r["latencies"]]
    times, done = spread(latencies), len(latencies)
    per = max(done, 1)
    return {
        "mode": mode, "producer_procs": procs, "load": load,
        "offered_per_s": load * procs if mode == "open" else None,
        "completed": done, "errors": sum(r["errors"] for r in reports),
        "requests_per_s": done / max(r["wall_s"] for r in reports),
        "p50_ms": times["p50"], "p99_ms": times["p99"],
        "redis_cpu_pct": 100 * (after["cpu_s"] - before["cpu_s"]) / wall,
        "commands_per_request": (after["commands"] - before["commands"]) / per,
        "round_trips_per_request": (after["reads"] - before["reads"]) / per,
        # Each a child process of Redis that writes its whole dataset: its CPU is counted in redis's (not in
        # redis_cpu_pct, which is the server's own), and on a box this small it takes a core from the rest.
        "aof_rewrites": int(after["aof_rewrites"] - before["aof_rewrites"]),
        # CPU time per request completed, per kind of process (a producer's includes its loop's idle turns)
        "cpu_us_per_request": {kind: round(1e6 * seconds / per, 1) for kind, seconds in cpu.items()},
        "calls_per_request": _per_request(before, after, "cmd ", per),  # behind commands_per_request, most first
        # Redis's time in each command, most first: a script's (EVALSHA) includes the commands it ran, and EXEC
        # the commands of its transaction, which are also counted under their own names.
        "redis_us_per_request": _per_request(before, after, "usec ", per),
    }  # fmt: skip


def _per_request(before: dict[str, float], after: dict[str, float], kind: str, per: int) -> dict[str, float]:
    """What each command added to the `kind` counters (calls or usec) during the cell, per request, most first."""
    grown = {name: after[name] - before.get(name, 0.0) for name in after if name.startswith(kind)}
    ranked = sorted((name for name, added in grown.items() if added > 0), key=lambda name: -grown[name])
    return {name.removeprefix(kind): round(grown[name] / per, 2) for name in ranked}


async def bench_capacity(
    base: Settings,
    *,
    workers: int,
    producer_procs: int,
    closed: list[int],
    rates: list[float],
    seconds: float,
    rounds: int = 1,
    on_row: Any = lambda row: None,
) -> dict[str, Any]:
    """`rounds` rounds, each on a fresh server and workers: closed-loop cells (`closed`: callers per producer
    process), then open-loop cells at rising `rates` (requests/s in all) until one falls behind. A cell's row is
    its median round's (by requests/s), with every round's requests/s beside it: on a shared box the same cell
    can differ by a third from one minute to the next, and one round cannot tell a change from that."""
    runs = []
    for _ in range(rounds):
        runs.append(await _round(base, workers, producer_procs, closed, rates, seconds, on_row))
    cells: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for run in runs:
        for row in run["rows"]:
            cells.setdefault((row["mode"], row["load"]), []).append(row)
    rows = []
    for same in cells.values():
        ranked = sorted(same, key=lambda row: row["requests_per_s"])
        rows.append({**ranked[(len(ranked) - 1) // 2], "rounds_requests_per_s": [r["requests_per_s"] for r in same]})
    saturated = [run["saturated_at_offered_per_s"] for run in runs]
    return {
        "raw_xadd_per_s": statistics.median(run["raw_xadd_per_s"] for run in runs), "workers": workers,
        "producer_procs": producer_procs, "seconds_per_cell": seconds, "rounds": rounds,
        "server_allocator": runs[0]["allocator"],
        # the lowest offered rate any round fell behind at (None: every round kept up with every rate)
        "saturated_at_offered_per_s": min((rate for rate in saturated if rate), default=None),
        "rounds_saturated_at": saturated, "rows": rows, "runs": runs,
    }  # fmt: skip


async def _round(
    base: Settings, workers: int, procs: int, closed: list[int], rates: list[float], seconds: float, on_row: Any
) -> dict[str, Any]:
    server = temporary_server()
    settings = load_settings(redis_url=server.url, key_prefix="capacity", model=MODEL, data_dir=base.data_dir)
    rows: list[dict[str, Any]] = []
    saturated_at = None
    try:
        async with InferenceClient(settings) as client, contextlib.AsyncExitStack() as fleet:
            raw = await raw_xadd_per_s(client)
            allocator = server.allocator()
            pids: dict[str, list[int]] = {"workers": [], "redis": [server.pid() or 0]}
            with handed_down("INFERQ_STANDIN_STEP_MS", "0"):  # the workers started inside inherit it
                for _ in range(workers):
                    worker = await fleet.enter_async_context(
                        local_worker(settings, model=MODEL, engine="standin", args=("--max-inflight", "1024"))
                    )
                    pids["workers"].append(worker.proc.pid)
            for callers in closed:
                rows.append(await _cell(client, server.url, procs, "closed", callers, seconds, pids))
                on_row(rows[-1])
            for rate in rates:
                row = await _cell(client, server.url, procs, "open", rate / procs, seconds, pids)
                rows.append(row)
                on_row(row)
                if row["requests_per_s"] < _BEHIND * rate or row["errors"]:
                    saturated_at = rate
                    break
    finally:
        server.stop()
    return {"raw_xadd_per_s": raw, "allocator": allocator, "saturated_at_offered_per_s": saturated_at, "rows": rows}


def _cpu_cell(row: dict[str, Any]) -> str:
    cpu: dict[str, float] = row.get("cpu_us_per_request", {})
    kinds = ("workers", "producers", "redis")
    if any(kind not in cpu for kind in kinds):
        return "-"
    parts = [cpu[kind] for kind in kinds]
    return f"{' / '.join(f'{p:.0f}' for p in parts)} = {sum(parts):.0f}"


def capacity_table(report: dict[str, Any]) -> str:
    rounds = report.get("rounds", 1)
    lines = [
        f"raw pipelined XADD on this server: {report['raw_xadd_per_s']:,.0f}/s; {report['workers']} stand-in "
        f"worker(s), {report['producer_procs']} producer process(es), {report['seconds_per_cell']:g} s a cell"
        + (
            f"; each cell the median of {rounds} rounds (each on a fresh server), every round's requests/s beside it"
            if rounds > 1
            else ""
        ),
        f"{'load':>16}{'requests/s':>12}{'p50 ms':>9}{'p99 ms':>9}{'redis CPU %':>13}{'cmds/req':>10}"
        f"{'trips/req':>11}{'CPU us/req worker/producer/redis':>34}{'errors':>8}" + ("  rounds" if rounds > 1 else ""),
    ]
    for r in report["rows"]:
        closed = r["mode"] == "closed"
        load = f"closed {r['load'] * r['producer_procs']:g}" if closed else f"open {r['offered_per_s']:g}/s"
        lines.append(
            f"{load:>16}{r['requests_per_s']:>12,.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['redis_cpu_pct']:>13.0f}"
            f"{r['commands_per_request']:>10.1f}{r['round_trips_per_request']:>11.1f}{_cpu_cell(r):>34}{r['errors']:>8}"
            + (f"  {' / '.join(f'{x:,.0f}' for x in r['rounds_requests_per_s'])}" if rounds > 1 else "")
        )
    rewrites = sum(r.get("aof_rewrites", 0) for run in report.get("runs", [report]) for r in run["rows"])
    lines.append(
        f"AOF rewrites during the cells: {rewrites} (the server persists as shipped: AOF, fsync every second; the "
        "rewrites' CPU is in redis's us/req, not in its CPU %); the server's malloc: "
        f"{report.get('server_allocator') or 'unknown'}"
    )
    top = report["rows"][-1]["calls_per_request"] if report["rows"] else {}
    lines.append("commands per request in the last cell: " + ", ".join(f"{k} {v:g}" for k, v in list(top.items())[:10]))
    spent = report["rows"][-1].get("redis_us_per_request", {}) if report["rows"] else {}
    lines.append(
        "Redis us per request by command in the last cell (a script's time includes its commands', EXEC's its "
        "transaction's): " + ", ".join(f"{k} {v:g}" for k, v in list(spent.items())[:8])
    )
    if report["saturated_at_offered_per_s"]:
        by_round = report.get("rounds_saturated_at", [])
        behind = ", ".join("kept up" if rate is None else f"{rate:,.0f}/s" for rate in by_round)
        lines.append(
            f"saturated: the open loop fell behind at {report['saturated_at_offered_per_s']:,.0f}/s offered"
            + (f" (by round: {behind})" if rounds > 1 else "")
        )
    return "\n".join(lines)
